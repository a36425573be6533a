"""The model zoo: parameter and multiply-add counts against PyTorch's count of the same
models, the published architecture, and sizing from the input shape and class count."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys

import numpy as np
import pytest
from conftest import ROOT

from dptrain.errors import UserError
from dptrain.nn import PRESETS, Context, Sequential, layer_from_spec, preset_layers

#: PyTorch 2.13.0+cpu on the same models, 10 classes, one 32x32x3 sample:
#: ``sum(p.numel() for p in model.parameters())`` and the multiply-adds of every Conv2d
#: and Linear counted by forward hooks (scripts/torch_reference_counts.py prints them).
#: ResNet-20/56 are 0.27 M / 0.85 M in He et al. 2016, table 6.
TORCH = {"resnet20": (272_474, 40_813_184), "resnet56": (855_770, 125_747_840),
         "resnet18": (11_173_962, 555_422_720), "vgg11": (9_231_114, 152_769_536)}


def build(name: str, shape: tuple[int, ...] = (32, 32, 3), classes: int = 10) -> Sequential:
    return Sequential([layer_from_spec(s) for s in preset_layers(name, classes)], shape,
                      "float32")


def multiply_adds(m: Sequential) -> int:
    return sum(leaf.flops_per_sample() for leaf in m.leaf_layers()
               if leaf.kind in ("conv2d", "dense")) // 2


@pytest.mark.parametrize("name", sorted(TORCH))
def test_counts_match_pytorch(name):
    m = build(name)
    assert (m.num_params, multiply_adds(m)) == TORCH[name]
    assert m.output_shape == (10,)
    # the summary's total is every layer's FLOPs: the products (2 per multiply-add) and
    # the elementwise work of batch norms, ReLUs, merges and pooling on top
    assert m.flops_per_sample() > 2 * TORCH[name][1]


@pytest.mark.parametrize("name,n", [("resnet20", 3), ("resnet56", 9)])
def test_cifar_resnets_are_he_et_al_section_4_2(name, n):
    m = build(name)
    convs = [leaf for leaf in m.leaf_layers() if leaf.kind == "conv2d"]
    main = [c for c in convs if ".shortcut." not in c.name]
    # 6n + 2 weighted layers: a 3x3 stem, 6n 3x3 convolutions, the dense layer
    assert len(main) + 1 == 6 * n + 2
    assert all(c.kernel_hw == (3, 3) and not c.bias for c in main)
    assert [c.filters for c in main] == [16] + [16] * 2 * n + [32] * 2 * n + [64] * 2 * n
    projections = [c for c in convs if ".shortcut." in c.name]
    assert [(c.kernel_hw, c.stride_hw, c.filters) for c in projections] == \
        [((1, 1), (2, 2), 32), ((1, 1), (2, 2), 64)]
    shapes = {leaf.out_shape for leaf in m.leaf_layers() if leaf.kind == "batchnorm"}
    assert shapes == {(32, 32, 16), (16, 16, 32), (8, 8, 64)}
    bns = [leaf for leaf in m.leaf_layers() if leaf.kind == "batchnorm"]
    assert len(bns) == len(convs) and all(b.sync for b in bns)
    assert [leaf.kind for leaf in m.leaf_layers()][-2:] == ["global_avgpool2d", "dense"]


def test_resnet18_and_vgg11_shapes():
    r = build("resnet18")
    convs = [leaf for leaf in r.leaf_layers() if leaf.kind == "conv2d"]
    assert convs[0].kernel_hw == (3, 3) and convs[0].stride_hw == (1, 1)  # small-image stem
    assert len([c for c in convs if ".shortcut." not in c.name]) + 1 == 18
    assert {leaf.out_shape for leaf in r.leaf_layers() if leaf.kind == "batchnorm"} == \
        {(32, 32, 64), (16, 16, 128), (8, 8, 256), (4, 4, 512)}
    v = build("vgg11")
    assert [leaf.filters for leaf in v.leaf_layers() if leaf.kind == "conv2d"] == \
        [64, 128, 256, 256, 512, 512, 512, 512]
    pools = [leaf.out_shape for leaf in v.leaf_layers() if leaf.kind == "maxpool2d"]
    assert pools == [(16, 16, 64), (8, 8, 128), (4, 4, 256), (2, 2, 512), (1, 1, 512)]
    assert len([leaf for leaf in v.leaf_layers() if leaf.kind == "batchnorm"]) == 8


@pytest.mark.parametrize("name", sorted(PRESETS))
@pytest.mark.parametrize("shape,classes", [((12, 12, 1), 7), ((8, 8, 3), 3)])  # odd sizes
def test_every_preset_is_sized_from_the_input_and_the_classes(name, shape, classes):
    m = build(name, shape, classes)
    m.initialize(0)
    x = np.random.default_rng(0).standard_normal((2, *shape)).astype(np.float32)
    out = m.forward(x, Context(training=False))
    assert out.shape == (2, classes) and np.isfinite(out).all()


def test_unknown_preset_names_the_zoo():
    with pytest.raises(UserError, match="known: mlp, cnn, resnet20, resnet56, resnet18, vgg11"):
        preset_layers("resnet50", 10)


@pytest.mark.skipif(importlib.util.find_spec("torch") is None,
                    reason="PyTorch is not installed (it is no dependency of dptrain); the "
                           "literals in TORCH come from scripts/torch_reference_counts.py")
def test_torch_reference_script_prints_the_literals():
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "torch_reference_counts.py")],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    got = {r["model"]: (r["params"], r["multiply_adds_32x32x3"])
           for r in map(json.loads, proc.stdout.splitlines())}
    assert got == TORCH
