"""Image and label transforms, memory-mapped shard datasets and batch iteration."""

from gampen_ml.data.datasets import ShardImages, augment_batch, epoch_order, iterate_batches
from gampen_ml.data.transforms import LabelScaler, LabelScalerError, arsinh_image

__all__ = [
    "LabelScaler",
    "LabelScalerError",
    "ShardImages",
    "arsinh_image",
    "augment_batch",
    "epoch_order",
    "iterate_batches",
]
