"""Layers, losses, initialisers and the Sequential model (no MPI here)."""

from . import activations, conv, dense, dropout, norm, pool  # noqa: F401  (register layers)
from .base import LAYERS, Context, Layer, layer_from_spec, register
from .losses import LOSSES, get_loss
from .model import NonFiniteError, Sequential
from .presets import PRESETS, preset_layers

__all__ = ["LAYERS", "LOSSES", "PRESETS", "Context", "Layer", "NonFiniteError", "Sequential",
           "get_loss", "layer_from_spec", "preset_layers", "register"]
