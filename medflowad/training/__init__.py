"""Training loops and objectives."""

from medflowad.training.losses import (
    outlier_bce,
    outlier_margin,
    wrong_class_bce,
)
from medflowad.training.trainer import TrainData, TrainingError, TrainResult, load_train_data, train

__all__ = [
    "TrainData",
    "TrainResult",
    "TrainingError",
    "load_train_data",
    "outlier_bce",
    "outlier_margin",
    "train",
    "wrong_class_bce",
]
