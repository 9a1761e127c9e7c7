"""Checkpoints of a run (``<out>.ckpt/``): safetensors for tensors, JSON for the rest, written atomically."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import save_file

from medclf.errors import MedclfError

CHECKPOINT_SUFFIX = ".ckpt"


def _atomic_save_tensors(tensors: dict[str, torch.Tensor], path: Path) -> None:
    tmp = path.with_suffix(".tmp")
    save_file(tensors, str(tmp))
    os.replace(tmp, path)


def _json_safe(o: Any) -> Any:
    if isinstance(o, (np.floating, np.integer)):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    raise TypeError(type(o).__name__)


def _load_checkpoint_state(ckpt_dir: Path) -> dict[str, Any] | None:
    p = ckpt_dir / "state.json"
    if not p.exists() or not (ckpt_dir / "last.safetensors").exists():
        return None
    try:
        return json.loads(p.read_text())
    except json.JSONDecodeError as exc:
        raise MedclfError(f"{p}: the checkpoint state is damaged ({exc}); start a new run") from exc
