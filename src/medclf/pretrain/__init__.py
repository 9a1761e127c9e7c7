"""Self-supervised pretraining (``medclf pretrain``): a backbone learned from unlabelled images with SimCLR,
written as a sealed backbone bundle that ``medclf train --init-from`` fine-tunes.

Modules: ``config`` (the settings), ``data`` (the sources, one preprocessing spec, the decoded-image cache,
the k-NN probe set), ``simclr`` (the network with its projection head, the views, MONAI's NT-Xent loss, one
step, the global batch's loss under torchrun), ``pace`` (what the time budget holds: decoding, a timed step,
the steps that fit, the refusal of a budget too small), ``loop`` (the epochs on the clock, down to the step;
the k-NN probe; checkpoints and resume) and ``run`` (:func:`pretrain`: set-up, torchrun, the bundle).
"""

from medclf.pretrain.run import PretrainConfig, PretrainResult, pretrain

__all__ = ["PretrainConfig", "PretrainResult", "pretrain"]
