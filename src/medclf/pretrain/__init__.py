"""Self-supervised pretraining (``medclf pretrain``): a backbone learned from unlabelled images with SimCLR,
written as a sealed backbone bundle that ``medclf train --init-from`` fine-tunes.

Modules: ``data`` (the sources, one preprocessing spec, the decoded-image cache, the k-NN probe set),
``simclr`` (the network with its projection head, the views, MONAI's NT-Xent loss) and ``run``
(:func:`pretrain`: the clock-driven epochs, checkpoints and resume, the bundle).
"""

from medclf.pretrain.run import PretrainConfig, PretrainResult, pretrain

__all__ = ["PretrainConfig", "PretrainResult", "pretrain"]
