"""Built-in model presets (the zoo), sized from the input shape and the number of classes.

``mlp`` and ``cnn`` are small stacks for the built-in digits. The rest are the models
data-parallel training is usually measured on, as published, written with blocks:

- ``resnet20`` and ``resnet56``: He et al. 2016, section 4.2 (the CIFAR networks): a 3x3
  stem of 16 filters, three stages of 16, 32 and 64 filters with 3 or 9 basic blocks each,
  global average pooling and a dense layer; where a stage halves the image and widens the
  channels, a projection shortcut (strided 1x1 convolution and batch norm). 272,474 and
  855,770 parameters at 10 classes.
- ``resnet18``: basic blocks of 64/128/256/512 filters (2 per stage) with a 3x3 stride-1
  stem for small images (no 7x7 stem or max pooling): 11,173,962 parameters at 10 classes.
- ``vgg11``: VGG-11 with batch norm after every convolution, for 32x32 inputs (five 2x2
  max poolings bring 32x32 to 1x1; smaller images are padded up where a pooling would
  take an odd row): 9,231,114 parameters at 10 classes.

Global average pooling before the dense layer sizes every one of them from the input
shape alone. Their batch norms are synchronised (global statistics), so that training
does not depend on the number of ranks; convolutions in front of a batch norm have no
bias (VGG's keep theirs, as published).
"""

from __future__ import annotations

from typing import Any

from ..errors import UserError


def mlp(num_classes: int) -> list[dict[str, Any]]:
    """Flatten, Dense 512, ReLU, Dense 256, ReLU, Dense classes."""
    return [{"type": "flatten"}, {"type": "dense", "units": 512}, {"type": "relu"},
            {"type": "dense", "units": 256}, {"type": "relu"},
            {"type": "dense", "units": num_classes, "init": "glorot_uniform"}]


def cnn(num_classes: int) -> list[dict[str, Any]]:
    """Conv 32 3x3 same, ReLU, MaxPool 2, Conv 64 3x3 same, ReLU, MaxPool 2, Flatten,
    Dense 128, ReLU, Dense classes."""
    return [{"type": "conv2d", "filters": 32, "kernel": 3, "padding": "same"},
            {"type": "relu"}, {"type": "maxpool2d", "pool": 2},
            {"type": "conv2d", "filters": 64, "kernel": 3, "padding": "same"},
            {"type": "relu"}, {"type": "maxpool2d", "pool": 2},
            {"type": "flatten"}, {"type": "dense", "units": 128}, {"type": "relu"},
            {"type": "dense", "units": num_classes, "init": "glorot_uniform"}]


def _conv_bn(filters: int, kernel: int = 3, stride: int = 1, bias: bool = False
             ) -> list[dict[str, Any]]:
    """A convolution (padded to keep the image size at stride 1) and a batch norm."""
    return [{"type": "conv2d", "filters": filters, "kernel": kernel, "stride": stride,
             "padding": kernel // 2, "bias": bias, "init": "he_normal"},
            {"type": "batchnorm", "sync": True}]


def basic_block(filters: int, stride: int = 1, project: bool = False) -> list[dict[str, Any]]:
    """ResNet's basic block: relu(conv-bn-relu-conv-bn(x) + shortcut(x)), the shortcut
    the identity or (``project``) a strided 1x1 convolution with batch norm."""
    main = [*_conv_bn(filters, 3, stride), {"type": "relu"}, *_conv_bn(filters, 3)]
    shortcut = _conv_bn(filters, 1, stride) if project else []
    return [{"type": "residual", "main": main, "shortcut": shortcut}, {"type": "relu"}]


def resnet(widths: list[int], blocks: int, num_classes: int) -> list[dict[str, Any]]:
    """3x3 stem of ``widths[0]`` filters, then one stage of ``blocks`` basic blocks per
    width, each stage after the first starting with a stride-2 block with a projection
    shortcut; global average pooling and a dense layer."""
    layers = [*_conv_bn(widths[0]), {"type": "relu"}]
    cin = widths[0]
    for i, width in enumerate(widths):
        stride = 1 if i == 0 else 2
        rest = blocks
        if stride != 1 or width != cin:
            layers += basic_block(width, stride, project=True)
            rest -= 1
        if rest > 1:
            layers.append({"type": "repeat", "n": rest, "block": basic_block(width)})
        elif rest == 1:
            layers += basic_block(width)
        cin = width
    return [*layers, {"type": "global_avgpool2d"},
            {"type": "dense", "units": num_classes, "init": "glorot_uniform"}]


def resnet20(num_classes: int) -> list[dict[str, Any]]:
    """ResNet-20 for CIFAR-sized images (He et al. 2016, section 4.2, n = 3)."""
    return resnet([16, 32, 64], 3, num_classes)


def resnet56(num_classes: int) -> list[dict[str, Any]]:
    """ResNet-56 for CIFAR-sized images (He et al. 2016, section 4.2, n = 9)."""
    return resnet([16, 32, 64], 9, num_classes)


def resnet18(num_classes: int) -> list[dict[str, Any]]:
    """ResNet-18 with a 3x3 stride-1 stem for small images."""
    return resnet([64, 128, 256, 512], 2, num_classes)


VGG11 = (64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M")


def vgg11(num_classes: int) -> list[dict[str, Any]]:
    """VGG-11 (configuration A) with batch norm, for 32x32 inputs."""
    layers: list[dict[str, Any]] = []
    for v in VGG11:
        if v == "M":
            layers.append({"type": "maxpool2d", "pool": 2, "padding": "same"})
        else:
            layers += [*_conv_bn(int(v), bias=True), {"type": "relu"}]
    return [*layers, {"type": "global_avgpool2d"},
            {"type": "dense", "units": num_classes, "init": "glorot_uniform"}]


PRESETS = {"mlp": mlp, "cnn": cnn, "resnet20": resnet20, "resnet56": resnet56,
           "resnet18": resnet18, "vgg11": vgg11}


def preset_layers(name: str, num_classes: int) -> list[dict[str, Any]]:
    """The layer specs of the preset ``name`` for ``num_classes`` outputs."""
    try:
        return PRESETS[name](num_classes)
    except KeyError:
        raise UserError(f"unknown model preset {name!r}; known: {', '.join(PRESETS)}, "
                        "or give a layer list in the config") from None
