"""Layer and block specs written wrong: one line naming the layer, where it sits in the
nesting, and what is wrong, in the spec's own words (never Python's); every option of
every layer fed bad values."""

from __future__ import annotations

import inspect
import json
import math

import numpy as np
import pytest
from conftest import run_dptrain

from dptrain.errors import UserError
from dptrain.nn import LAYERS, Context, Sequential, check_batch_fits, layer_from_spec

RELU = {"type": "relu"}


@pytest.mark.parametrize("spec,message", [
    ({"type": "dense", "unit": 10},
     "layer 'dense' has no option 'unit' (did you mean 'units'?)"),
    ({"type": "dense"}, "layer 'dense' needs option 'units'"),
    ({"type": "dense", "units": "ten"},
     "layer 'dense': units must be a positive integer, not 'ten'"),
    ({"type": "conv2d", "filters": 3, "kernal": 3},
     "layer 'conv2d' has no option 'kernal' (did you mean 'kernel'?)"),
    ({"type": "relu", "alpha": 0.1}, "layer 'relu' has no option 'alpha' (it takes no options)"),
    ({"type": "dropout", "p": 0.1}, "layer 'dropout' has no option 'p' (its options: rate)"),
    ({"type": "residual", "main": [{"type": "dense", "unit": 3}]},
     "layer 'dense' (in residual main[0]) has no option 'unit' (did you mean 'units'?)"),
    ({"type": "residual", "main": [RELU], "shorcut": []},
     "layer 'residual' has no option 'shorcut' (did you mean 'shortcut'?)"),
    ({"type": "residual"}, "layer 'residual' needs option 'main'"),
    ({"type": "residual", "main": RELU},
     "layer 'residual': main must be a list of layers, not {'type': 'relu'}"),
    ({"type": "residual", "main": []}, "layer 'residual': main must hold at least one layer"),
    ({"type": "residual", "main": ["relu"]},
     "a layer must be a table like {type = \"relu\"} (in residual main[0]), not 'relu'"),
    ({"type": "residual", "main": [{"units": 3}]},
     "a layer spec needs a 'type' key (in residual main[0]): {'units': 3}"),
    ({"type": "repeat", "n": 2, "block": {"type": "concat", "branches": [
        [{"type": "dense", "units": 2, "bais": True}], []]}},
     "layer 'dense' (in repeat block[0] > concat branches[0][0]) has no option 'bais' "
     "(did you mean 'bias'?)"),
    ({"type": "repeat", "n": 2, "block": [RELU, {"type": "residual", "main": [
        {"type": "conv2d", "filters": "16"}]}]},
     "layer 'conv2d' (in repeat block[1] > residual main[0]): filters must be a positive "
     "integer, not '16'"),
    ({"type": "repeat", "n": 0, "block": RELU},
     "layer 'repeat': n must be a positive integer, not 0"),
    ({"type": "repeat", "block": RELU}, "layer 'repeat' needs option 'n'"),
    ({"type": "repeat", "n": 2, "block": []},
     "layer 'repeat': block must be a layer or a non-empty list of layers"),
    ({"type": "concat", "branches": [[RELU]]},
     "layer 'concat': branches must be a list of at least two lists of layers, not "
     "[[{'type': 'relu'}]]"),
    ({"type": "add", "branchs": [[], []]},
     "layer 'add' has no option 'branchs' (did you mean 'branches'?)"),
    ({"type": "resdual", "main": []}, "unknown layer type 'resdual' (did you mean 'residual'?)"),
])
def test_spec_mistakes_are_named_in_the_specs_words(spec, message):
    with pytest.raises(UserError) as e:
        layer_from_spec(spec)
    text = str(e.value)
    assert text.startswith(message), text
    assert "\n" not in text and "__init__" not in text and "keyword" not in text


@pytest.mark.parametrize("layers,message", [
    ([{"type": "residual", "main": [{"type": "conv2d", "filters": 8, "kernel": 3,
                                     "stride": 2, "padding": 1}]}],
     "layer 00_residual: its paths give shapes main (4, 4, 8), shortcut (8, 8, 3); to be "
     "added they must be equal"),
    ([{"type": "concat", "branches": [[{"type": "maxpool2d", "pool": 2}], []]}],
     "layer 00_concat: its branches give shapes b0 (4, 4, 3), b1 (8, 8, 3); to be "
     "concatenated along the last axis they must agree on every other axis"),
    ([{"type": "repeat", "n": 2, "block": {"type": "residual", "main": [
        {"type": "flatten"}, {"type": "dense", "units": 4}]}}],
     "layer 00_repeat.00_residual: its paths give shapes main (4,), shortcut (8, 8, 3)"),
    ([{"type": "residual", "main": [{"type": "dense", "units": 3}]}],
     "layer 00_residual.main.00_dense: dense needs a flat input per sample"),
])
def test_shape_mistakes_name_the_block_and_the_shapes(layers, message):
    with pytest.raises(UserError) as e:
        Sequential([layer_from_spec(s) for s in layers], (8, 8, 3))
    assert str(e.value).startswith(message), str(e.value)


#: a valid value of every required option
REQUIRED = {"units": 3, "filters": 2, "main": [RELU], "branches": [[], []], "n": 2,
            "block": RELU}
BAD = ["ten", "", -1, 0, 10**12, 1e300, math.nan, math.inf, True, None, [], {}, [1, 2, 3],
       [[]], [{"type": "nope"}], {"type": "relu"}]


#: the bad values that are in fact valid for an option (and so are accepted): everything
#: else in BAD must be refused
VALID = {("avgpool2d", "stride"): [10**12, None], ("avgpool2d", "padding"): [0],
         ("maxpool2d", "stride"): [10**12, None], ("maxpool2d", "padding"): [0],
         ("conv2d", "stride"): [10**12], ("conv2d", "padding"): [0],
         ("conv2d", "bias"): [True], ("dense", "bias"): [True],
         ("batchnorm", "momentum"): [0], ("batchnorm", "eps"): [10**12, 1e300],
         ("batchnorm", "sync"): [True], ("dropout", "rate"): [0],
         ("leaky_relu", "alpha"): [0, 10**12, 1e300],
         ("repeat", "block"): [{"type": "relu"}], ("residual", "shortcut"): [[]]}


def _kinds_and_options() -> list[tuple[str, str]]:
    cases = []
    for kind, cls in sorted(LAYERS.items()):
        params = list(inspect.signature(cls.__init__).parameters)[1:]
        cases += [(kind, p) for p in params]
    return cases


@pytest.mark.parametrize("kind,option", _kinds_and_options())
def test_every_option_of_every_layer_refuses_bad_values_in_one_line(kind, option):
    """Each value of BAD is refused with a one-line UserError (when the layer is made, when
    the model is built, or by the activation-memory check a run makes before training: a
    padding of 10**12 pixels is a valid convolution of absurd size), unless it is valid
    for the option; a model with an accepted value runs forward and backward to finite
    results. Nothing else: no TypeError, no traceback, no hang."""
    params = inspect.signature(LAYERS[kind].__init__).parameters
    base = {k: v for k, v in REQUIRED.items() if k in params
            and params[k].default is inspect.Parameter.empty}
    shape = (6,) if kind == "dense" else (6, 6, 2)
    accepted = []
    for bad in BAD:
        spec = {"type": kind, **base, option: bad}
        try:
            model = Sequential([layer_from_spec(spec)], shape, "float64")
            check_batch_fits(model, 2)
        except UserError as e:
            assert str(e) and "\n" not in str(e), spec
            continue
        accepted.append(bad)
        model.initialize(0)
        x = np.random.default_rng(0).standard_normal((2, *shape))
        ctx = Context(training=True, sample_index=np.arange(2))
        out = model.forward(x, ctx)
        model.backward(np.ones_like(out), ctx)
        assert np.isfinite(out).all() and np.isfinite(model.grads).all(), spec
    assert accepted == VALID.get((kind, option), []), (kind, option, accepted)


def test_cli_reports_a_misspelt_nested_option_in_one_line(tmp_path):
    layers = [{"type": "conv2d", "filters": 4, "kernel": 3, "padding": 1},
              {"type": "repeat", "n": 2, "block": [
                  {"type": "residual", "main": [{"type": "conv2d", "filter": 4, "kernel": 3,
                                                 "padding": 1}]}, RELU]},
              {"type": "global_avgpool2d"}, {"type": "dense", "units": 10}]
    toml = tmp_path / "model.toml"
    toml.write_text("""
[[model.layers]]
type = "conv2d"
filters = 4
kernel = 3
padding = 1

[[model.layers]]
type = "repeat"
n = 2
block = [
  {type = "residual", main = [{type = "conv2d", filter = 4, kernel = 3, padding = 1}]},
  {type = "relu"},
]

[[model.layers]]
type = "global_avgpool2d"

[[model.layers]]
type = "dense"
units = 10
""")
    for args in (["--layers", json.dumps(layers)], ["--config", str(toml)]):
        run = tmp_path / "run"
        proc = run_dptrain([*args, "--dataset", "synthetic", "--synthetic-shape", "8,8,3",
                            "--epochs", "1", "--progress", "off", "--run-dir", str(run)],
                           timeout=60)
        assert proc.returncode == 2, proc.stdout + proc.stderr
        assert proc.stderr.splitlines() == [
            "dptrain: error: layer 'conv2d' (in repeat block[0] > residual main[0]) has no "
            "option 'filter' (did you mean 'filters'?)"], proc.stderr
        assert not run.exists()
