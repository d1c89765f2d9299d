"""Hierarchical Channel Sampling for data pipelines: re-exported from ``chanzoo.ops.channel_sampling``, where the
models (ChannelViT) find it without importing any datamodule."""
from chanzoo.ops.channel_sampling import ChannelSampling, drop_channels, sample_channel_subset

__all__ = ["ChannelSampling", "sample_channel_subset", "drop_channels"]
