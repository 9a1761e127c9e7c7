"""The cache rows a loop trains and validates on: held in memory or streamed from disk (decided here), and
each epoch's shuffled, augmented and mixed training batches."""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch

from medclf import augment as augment_mod
from medclf import reporting
from medclf.data.cache import PreparedData
from medclf.data.samples import SampleSet
from medclf.data.stream import (
    StreamedRows,
    block_shuffled_order,
    parse_bytes,
    prefetched,
    return_freed_batches_to_os,
    should_stream,
)
from medclf.distributed import DistContext, epoch_seed, log_shards, shard
from medclf.planner import Plan
from medclf.training.config import TrainConfig


@dataclass
class LoopData:
    """What a loop trains and validates on: the samples, their cache, and the cache rows of each split."""

    samples: SampleSet
    prepared: PreparedData
    train_idx: np.ndarray
    val_idx: np.ndarray
    # Per-training-sample sampling weights (shortcut mitigation: class x acquisition group balance).
    sample_weights: np.ndarray | None = None


class TrainingRows:
    """The training and validation rows of one loop, and the batches of each epoch."""

    def __init__(self, data: LoopData, plan: Plan, cfg: TrainConfig, dist: DistContext, pin: bool) -> None:
        self.data, self.plan, self.cfg, self.dist, self.pin = data, plan, cfg, dist, pin
        self.aug = augment_mod.build_augmentation(plan.augment, plan.spec.spatial_dims)
        self.streaming = self._decide_streaming()
        # Streaming means memory is tight: evaluate in training-sized batches (activations of 256 samples at
        # once can outweigh the data); otherwise in larger ones for speed.
        self.eval_batch: int | None = plan.batch_size if self.streaming else None
        self.train_x = _rows(data.prepared.tensors, data.train_idx, self.streaming)
        self.val_x = _rows(data.prepared.tensors, data.val_idx, self.streaming)
        self.train_y = torch.from_numpy(data.samples.labels[data.train_idx])
        if data.samples.task == "multilabel":  # 0/1 targets of the per-finding binary losses
            self.train_y = self.train_y.float()
        weights = data.sample_weights
        self.sample_weights = None if weights is None else torch.from_numpy(weights)

    def _decide_streaming(self) -> bool:
        t = self.data.prepared.tensors
        row_bytes = int(np.prod(t.shape[1:])) * t.dtype.itemsize
        nbytes = row_bytes * (len(self.data.train_idx) + len(self.data.val_idx))
        stream, why = should_stream(
            self.cfg.stream,
            nbytes,
            copies=self.dist.local_world_size,
            memory_limit=parse_bytes(self.cfg.memory_limit),
        )
        if stream and getattr(t, "filename", None) is None:
            stream, why = False, "no disk cache to stream from: rows held in memory"
        if stream or self.cfg.stream != "auto":
            reporting.current().print(f"Training data: {why}")
        if stream:
            return_freed_batches_to_os()
        return stream

    def batches(self, epoch: int, gen: torch.Generator) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Epoch ``epoch``'s training batches (augmented, mixed when the plan says so), drawing on ``gen``."""
        n = len(self.data.train_idx)
        order_gen = gen
        if self.dist.enabled:
            # One permutation for all ranks (seeded by the epoch, as DistributedSampler.set_epoch does) and
            # augmentation draws of each rank's own; recomputed from the epoch, so resuming is exact.
            order_gen = torch.Generator().manual_seed(epoch_seed(self.cfg.seed, epoch))
            gen.manual_seed(epoch_seed(self.cfg.seed, epoch, self.dist.rank))
            # Dropout draws from the global generator: per rank and epoch too (only rank 0's is checkpointed).
            torch.manual_seed(epoch_seed(self.cfg.seed, epoch, self.dist.rank, stream=1))
        if self.sample_weights is not None:
            perm = torch.multinomial(self.sample_weights, n, replacement=True, generator=order_gen)
        elif self.streaming:  # neighbouring rows together: sequential-ish reads from the disk cache
            perm = block_shuffled_order(n, order_gen)
        else:
            perm = torch.randperm(n, generator=order_gen)
        bs = self.plan.batch_size
        # Drop the ragged last batch: a batch of 1 breaks batch norm, and the order is reshuffled anyway.
        # Under DDP each rank takes its disjoint share of every global batch of bs samples.
        starts = range(0, n - bs + 1 if n >= bs else 1, bs)
        shards = [shard(perm[start : start + bs], self.dist) for start in starts]
        if os.environ.get("MEDCLF_DEBUG_SHARDS"):
            log_shards(self.dist, epoch, [self.data.train_idx[s.numpy()] for s in shards])
        n_classes = len(self.data.samples.classes)
        for idx, x in prefetched(self.train_x.__getitem__, shards, depth=2 if self.streaming else 0):
            x, y = self.aug(x.float(), gen), self.train_y[idx]
            if self.plan.mix != "none":
                x, y = augment_mod.mix_batch(self.plan.mix, self.plan.mix_alpha, x, y, n_classes, gen)
            # CUDA kernels run asynchronously: this CPU work for the next batch overlaps the GPU's step.
            yield (x.pin_memory(), y.pin_memory()) if self.pin else (x, y)


def _rows(tensors: np.ndarray, idx: np.ndarray, streaming: bool) -> torch.Tensor | StreamedRows:
    """Rows ``idx`` of the cache, indexable like a tensor: read from disk per batch, or held in memory."""
    return StreamedRows(tensors, idx) if streaming else _materialise(tensors, idx)


def _materialise(tensors: np.ndarray, idx: np.ndarray) -> torch.Tensor:
    """The rows ``idx`` of the cache as one in-memory float16 tensor (sorted reads from the memmap)."""
    order = np.argsort(idx)
    rows = np.empty((len(idx), *tensors.shape[1:]), dtype=np.float16)
    rows[order] = tensors[idx[order]]
    return torch.from_numpy(rows)
