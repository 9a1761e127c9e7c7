"""Multi-process training with PyTorch's own machinery: ``torchrun`` + ``torch.distributed`` + DDP.

``torchrun --nproc_per_node N -m medclf train DATA ...`` starts N processes and sets ``RANK``,
``WORLD_SIZE``, ``LOCAL_RANK``, ``LOCAL_WORLD_SIZE``, ``MASTER_ADDR`` and ``MASTER_PORT`` in each.
:func:`from_env` reads them and joins the process group: ``nccl`` when training on GPUs (each process on
the GPU of its ``LOCAL_RANK``), ``gloo`` on CPUs. Without those variables everything here is a no-op for a
single process, so the training loop has one code path.

How the loop uses it (see :mod:`medclf.training.loop`):

- the plan is made on rank 0 and sent to the others as JSON (never pickle, unlike
  ``broadcast_object_list``), so every rank trains the same network at the same size;
- on each machine local rank 0 decodes the data into the disk cache while the others wait, then all open
  that cache;
- every epoch all ranks draw the same permutation of the training samples; each global batch of
  ``batch_size`` samples is split into ``world_size`` disjoint shards, one per rank (what
  ``DistributedSampler`` does, on cached tensors), so the optimisation sees the same global batches as one
  process would;
- losses are summed and validation probabilities gathered across ranks, and rank 0's decisions (best
  epoch, early stop, out of time) are broadcast so that no rank leaves the loop alone;
- only rank 0 writes checkpoints and the bundle and prints.

``torchrun ... -m medclf pretrain`` uses the same pieces (:mod:`medclf.pretrain.loop`).
"""

from __future__ import annotations

import datetime as _dt
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from medclf.errors import ConfigError

# Waiting for rank 0 to decode a large dataset can take hours: the CPU-side group used for that wait (and
# for small JSON/metric exchanges) gets a long timeout. The default group keeps PyTorch's default timeout.
CPU_GROUP_TIMEOUT_S = float(os.environ.get("MEDCLF_DIST_TIMEOUT", 6 * 3600))
_ENV = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


@dataclass
class DistContext:
    """Where this process stands in a distributed run (``world_size == 1``: a single process)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1
    backend: str | None = None
    owns_group: bool = False
    cpu_group: Any = None

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def is_local_main(self) -> bool:
        return self.local_rank == 0

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier(group=self.cpu_group)

    def broadcast_json(self, obj: Any, src: int = 0) -> Any:
        """``obj`` as rank ``src`` has it, on every rank (JSON-serialisable values only)."""
        if not self.enabled:
            return obj
        payload = json.dumps(obj).encode() if self.rank == src else b""
        size = torch.tensor([len(payload)], dtype=torch.int64)
        dist.broadcast(size, src, group=self.cpu_group)
        buf = (
            torch.frombuffer(bytearray(payload), dtype=torch.uint8)
            if self.rank == src
            else torch.empty(int(size.item()), dtype=torch.uint8)
        )
        dist.broadcast(buf, src, group=self.cpu_group)
        return json.loads(bytes(buf.numpy()).decode())

    def agree(self, flag: bool) -> bool:
        """Rank 0's ``flag`` on every rank: decisions that depend on a clock must be taken once."""
        return bool(self.broadcast_json(bool(flag)))

    def sum(self, values: list[float]) -> list[float]:
        """Element-wise sum of ``values`` over all ranks (float64)."""
        if not self.enabled:
            return list(values)
        t = torch.tensor(values, dtype=torch.float64)
        dist.all_reduce(t, op=dist.ReduceOp.SUM, group=self.cpu_group)
        return t.tolist()

    def gather_strided(self, local: np.ndarray, n_total: int) -> np.ndarray:
        """Reassemble rows computed on strided shards (rank ``r`` holds rows ``r, r + W, r + 2W, ...`` of
        ``n_total``) into one array, identical on every rank."""
        if not self.enabled:
            return local
        w = self.world_size
        per = -(-n_total // w)
        padded = np.zeros((per, *local.shape[1:]), dtype=np.float64)
        padded[: len(local)] = local
        parts = [torch.empty(padded.shape, dtype=torch.float64) for _ in range(w)]
        dist.all_gather(parts, torch.from_numpy(padded), group=self.cpu_group)
        out = np.empty((n_total, *local.shape[1:]), dtype=np.float64)
        for r, part in enumerate(parts):
            rows = len(range(r, n_total, w))
            out[r::w] = part.numpy()[:rows]
        return out

    def close(self) -> None:
        """Leave the process group if this context created it."""
        if self.owns_group and dist.is_initialized():
            dist.destroy_process_group()
        self.owns_group = False


def shard(batch: torch.Tensor, ctx: DistContext) -> torch.Tensor:
    """This rank's part of a global batch: positions ``rank, rank + W, ...`` (disjoint across ranks, their
    union is the batch)."""
    return batch[ctx.rank :: ctx.world_size] if ctx.enabled else batch


def log_shards(ctx: DistContext, epoch: int, shards: list[np.ndarray]) -> None:
    """With ``MEDCLF_DEBUG_SHARDS=<folder>``, append the sample indices this rank trains on in ``epoch`` to
    ``<folder>/shards-rank<r>.jsonl`` (tests check that ranks see disjoint shards)."""
    folder = os.environ["MEDCLF_DEBUG_SHARDS"]
    Path(folder).mkdir(parents=True, exist_ok=True)
    line = json.dumps({"rank": ctx.rank, "epoch": epoch, "batches": [s.tolist() for s in shards]})
    with open(Path(folder) / f"shards-rank{ctx.rank}.jsonl", "a", encoding="utf-8") as fh:
        fh.write(line + "\n")


def epoch_seed(seed: int, epoch: int, rank: int | None = None, stream: int = 0) -> int:
    """A seed for one epoch (and, when ``rank`` is given, one rank): the same on every rank for the shared
    permutation, different per rank for augmentation and dropout (``stream`` tells those apart).
    Recomputed from the epoch number, so a resumed run draws exactly what the uninterrupted run drew."""
    words = [seed, epoch, stream] if rank is None else [seed, epoch, stream, rank + 1]
    return int(np.random.SeedSequence(words).generate_state(1, dtype=np.uint64)[0] >> 1)


def from_env(device: str) -> tuple[DistContext, str]:
    """Join the process group described by torchrun's environment variables; returns the context and the
    device this process trains on. A plain process (no ``WORLD_SIZE`` > 1) gets a single-process context."""
    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if world <= 1:
        return DistContext(), device
    missing = [k for k in _ENV if not os.environ.get(k)]
    if missing:
        raise ConfigError(
            f"WORLD_SIZE={world} but {', '.join(missing)} not set: start distributed training with torchrun"
        )
    if not dist.is_available():
        raise ConfigError("this PyTorch build has no torch.distributed")
    rank = int(os.environ["RANK"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", str(world)))
    if device.startswith("cuda"):
        if ":" in device:
            raise ConfigError(
                f"--device {device}: under torchrun every process uses the GPU of its LOCAL_RANK; "
                "pass --device cuda (or auto), and choose GPUs with CUDA_VISIBLE_DEVICES"
            )
        if local_rank >= torch.cuda.device_count():
            raise ConfigError(
                f"LOCAL_RANK {local_rank} but only {torch.cuda.device_count()} GPU(s) visible: "
                "use --nproc_per_node at most the number of GPUs"
            )
        device = f"cuda:{local_rank}"
        torch.cuda.set_device(local_rank)
        backend = "nccl"
    else:
        backend = "gloo"
    owns = not dist.is_initialized()
    if owns:
        dist.init_process_group(backend=backend, init_method="env://")
    else:
        backend = str(dist.get_backend())
    timeout = _dt.timedelta(seconds=CPU_GROUP_TIMEOUT_S)
    cpu_group = dist.new_group(backend="gloo", timeout=timeout)
    ctx = DistContext(
        rank=rank,
        world_size=world,
        local_rank=local_rank,
        local_world_size=local_world,
        backend=backend,
        owns_group=owns,
        cpu_group=cpu_group,
    )
    return ctx, device


__all__ = ["DistContext", "epoch_seed", "from_env", "log_shards", "shard"]
