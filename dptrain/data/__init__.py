"""Datasets (built-in digits, HDF5, npz, synthetic) and the global batch sampler."""

from .datasets import Dataset, DataSplits, load_dataset, load_from_config, validate_for_model
from .sampler import GlobalSampler, shard, shard_bounds

__all__ = [
    "Dataset",
    "DataSplits",
    "GlobalSampler",
    "load_dataset",
    "load_from_config",
    "shard",
    "shard_bounds",
    "validate_for_model",
]
