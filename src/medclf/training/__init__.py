"""Training (``medclf.train``): data -> plan -> cached tensors -> the loop -> a verified bundle.

The loop trains on preprocessed tensors cached once (decoding never repeats across epochs or runs),
augments whole batches, uses bf16 autocast and channels-last where the hardware profits, keeps an
exponential moving average of the weights, selects the model on validation AUC computed without any
validation sample that copies a training sample, checkpoints every epoch (atomically, without pickle) and
resumes after a kill.

Modules, in the order a run meets them: ``config`` (:class:`TrainConfig`, :class:`TrainResult`), ``setup``
(everything before the first epoch; the plan from ``planning``), ``loop`` (:class:`Loop`, with ``rows``,
``network``, ``optimisation``, ``selection``, ``checkpoint`` and ``progress``), ``finish`` (calibration, the
OOD guard of ``ood_guard``, the bundle) and ``run`` (:func:`train_one`, :func:`train`). Every time rule is
:mod:`medclf.budget`'s. One run makes one model: bagging (K folds, K seeds, and the time an early stop
left, which ``medclf.train`` spends) is :mod:`medclf.folds`', a layer above, as it fuses members.
"""

from medclf.budget import parse_duration
from medclf.training.config import TrainConfig, TrainResult
from medclf.training.loop import Loop, LoopData, LoopHooks
from medclf.training.run import train, train_one

__all__ = [
    "Loop",
    "LoopData",
    "LoopHooks",
    "TrainConfig",
    "TrainResult",
    "parse_duration",
    "train",
    "train_one",
]
