"""Datasets (built-in digits, the MNIST family, HDF5, npz, synthetic), the global batch
sampler, and the batch pipeline: sources in memory or streamed, augmentation and
normalisation shared by both."""

from .augment import AugmentSpec
from .datasets import Dataset, DataSplits, load_dataset, load_from_config, validate_for_model
from .normalize import ChannelStats
from .sampler import GlobalSampler, shard, shard_bounds
from .source import BatchSource, RowSource, memory_source, stream_source
from .transform import BatchTransform

__all__ = [
    "AugmentSpec",
    "BatchSource",
    "BatchTransform",
    "ChannelStats",
    "Dataset",
    "DataSplits",
    "GlobalSampler",
    "RowSource",
    "load_dataset",
    "load_from_config",
    "memory_source",
    "shard",
    "shard_bounds",
    "stream_source",
    "validate_for_model",
]
