"""Training (``medclf.train``): data -> plan -> cached tensors -> the loop -> a verified bundle.

The loop trains on preprocessed tensors cached once (decoding never repeats across epochs or runs),
augments whole batches, uses bf16 autocast and channels-last where the hardware profits, keeps an
exponential moving average of the weights, selects the model on validation AUC computed without any
validation sample that copies a training sample, checkpoints every epoch (atomically, without pickle) and
resumes after a kill.
"""

from medclf.budget import parse_duration
from medclf.training.bagging import leftover_member_seconds as leftover_member_seconds
from medclf.training.bagging import train
from medclf.training.checkpoint import CHECKPOINT_SUFFIX as CHECKPOINT_SUFFIX
from medclf.training.config import AMP_CHOICES as AMP_CHOICES
from medclf.training.config import TrainConfig
from medclf.training.config import resolve_device as resolve_device
from medclf.training.loop import _Loop as _Loop
from medclf.training.run import TrainResult
from medclf.training.run import _train_one as _train_one

__all__ = ["TrainConfig", "TrainResult", "parse_duration", "train"]
