"""The cache rows a run trains and validates on: held in memory or streamed from disk."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import torch

from medclf.data.stream import (
    StreamedRows,
)
from medclf.distributed import DistContext


def _rows(tensors: np.ndarray, idx: np.ndarray, streaming: bool) -> torch.Tensor | StreamedRows:
    """Rows ``idx`` of the cache, indexable like a tensor: read from disk per batch, or held in memory."""
    return StreamedRows(tensors, idx) if streaming else _materialise(tensors, idx)


def _log_shards(dist: DistContext, epoch: int, shards: list[np.ndarray]) -> None:
    """With ``MEDCLF_DEBUG_SHARDS=<folder>``, append the sample indices this rank trains on in ``epoch`` to
    ``<folder>/shards-rank<r>.jsonl`` (tests check that ranks see disjoint shards)."""
    folder = os.environ["MEDCLF_DEBUG_SHARDS"]
    Path(folder).mkdir(parents=True, exist_ok=True)
    line = json.dumps({"rank": dist.rank, "epoch": epoch, "batches": [s.tolist() for s in shards]})
    with open(Path(folder) / f"shards-rank{dist.rank}.jsonl", "a", encoding="utf-8") as fh:
        fh.write(line + "\n")


def _materialise(tensors: np.ndarray, idx: np.ndarray) -> torch.Tensor:
    """The rows ``idx`` of the cache as one in-memory float16 tensor (sorted reads from the memmap)."""
    order = np.argsort(idx)
    rows = np.empty((len(idx), *tensors.shape[1:]), dtype=np.float16)
    rows[order] = tensors[idx[order]]
    return torch.from_numpy(rows)
