"""Layers, blocks, losses, initialisers, the Sequential model and the model zoo (no MPI
here)."""

from . import activations, blocks, conv, dense, dropout, norm, pool  # noqa: F401  (register)
from .activations import Identity
from .base import LAYERS, Context, Layer, layer_from_spec, register
from .blocks import Add, Block, Concat, Repeat, Residual
from .losses import LOSSES, get_loss
from .memory import check_batch_fits, format_bytes
from .model import NonFiniteError, Sequential
from .pool import GlobalAvgPool2D
from .presets import PRESETS, preset_layers
from .summary import architecture_rows, architecture_table

__all__ = ["LAYERS", "LOSSES", "PRESETS", "Add", "Block", "Concat", "Context",
           "GlobalAvgPool2D", "Identity", "Layer", "NonFiniteError", "Repeat", "Residual",
           "Sequential", "architecture_rows", "architecture_table", "check_batch_fits",
           "format_bytes", "get_loss", "layer_from_spec", "preset_layers", "register"]
