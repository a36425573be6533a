"""Built-in model presets, sized from the input shape and the number of classes."""

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


PRESETS = {"mlp": mlp, "cnn": cnn}


def preset_layers(name: str, num_classes: int) -> list[dict[str, Any]]:
    try:
        return PRESETS[name](num_classes)
    except KeyError:
        raise UserError(f"unknown model preset {name!r}; known: {', '.join(PRESETS)}, "
                        "or give a layer list in the config") from None
