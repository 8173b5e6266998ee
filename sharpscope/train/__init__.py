"""Training: the SGD/SAM trainer (:func:`train` for registry models and datasets, :func:`fit` for any model and
batches, one loop), and the self-describing checkpoint format."""

from sharpscope.train.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from sharpscope.train.config import TrainConfig
from sharpscope.train.fit import BatchData, fit
from sharpscope.train.trainer import TrainResult, train

__all__ = ["BatchData", "Checkpoint", "TrainConfig", "TrainResult", "fit", "load_checkpoint", "save_checkpoint",
           "train"]
