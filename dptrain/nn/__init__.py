"""Layers, blocks, losses, initialisers, the Sequential model and the model zoo (no MPI
here)."""

from . import activations, blocks, conv, dense, dropout, norm, pool  # noqa: F401  (register)
from .activations import Flatten, Identity, LeakyReLU, ReLU, Sigmoid, Softmax, Tanh
from .base import LAYERS, Context, Layer, layer_from_spec, register
from .blocks import Add, Block, Concat, Repeat, Residual
from .conv import Conv2D
from .dense import Dense
from .dropout import Dropout
from .losses import LOSSES, get_loss
from .memory import check_batch_fits, format_bytes
from .model import NonFiniteError, Sequential
from .norm import BatchNorm
from .pool import AvgPool2D, GlobalAvgPool2D, MaxPool2D
from .presets import PRESETS, preset_layers
from .summary import architecture_rows, architecture_table

__all__ = ["LAYERS", "LOSSES", "PRESETS", "Add", "AvgPool2D", "BatchNorm", "Block", "Concat",
           "Context", "Conv2D", "Dense", "Dropout", "Flatten", "GlobalAvgPool2D", "Identity",
           "Layer", "LeakyReLU", "MaxPool2D", "NonFiniteError", "ReLU", "Repeat", "Residual",
           "Sequential", "Sigmoid", "Softmax", "Tanh", "architecture_rows",
           "architecture_table", "check_batch_fits", "format_bytes", "get_loss",
           "layer_from_spec", "preset_layers", "register"]
