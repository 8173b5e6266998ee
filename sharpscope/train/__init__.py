"""Training: the SGD/SAM trainer and the self-describing checkpoint format."""

from sharpscope.train.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from sharpscope.train.config import TrainConfig
from sharpscope.train.trainer import TrainResult, train

__all__ = ["Checkpoint", "TrainConfig", "TrainResult", "load_checkpoint", "save_checkpoint", "train"]
