"""Checkpoints of a run (``<out>.ckpt/``): safetensors for tensors, JSON for the rest (no pickle), each file
written atomically, so a kill at any moment leaves the last complete epoch to resume from.

``last.safetensors`` holds the weights, their average, the optimizer state and the random streams;
``best.safetensors`` the selected model's weights; ``state.json`` the plan, history, selection, schedule
and the data's fingerprint (a resumed run refuses data that changed).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from medclf.errors import MedclfError
from medclf.planner import Plan
from medclf.schedule import Schedule
from medclf.training.network import plain_state
from medclf.training.selection import Selection

CHECKPOINT_SUFFIX = ".ckpt"
LAST, BEST, STATE = "last.safetensors", "best.safetensors", "state.json"


def checkpoint_dir(out: Path) -> Path:
    """Where the run writing the bundle ``out`` keeps its checkpoint."""
    return out.with_name(out.name + CHECKPOINT_SUFFIX)


def save(
    ckpt_dir: Path,
    epoch: int,
    history: list[dict[str, float]],
    *,
    plan: Plan,
    fingerprint: str,
    best: Selection,
    model: nn.Module,
    ema: nn.Module | None,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    schedule: Schedule,
    gen: torch.Generator,
) -> None:
    """Write the state after epoch ``epoch`` (0-based) of a run on data with this ``fingerprint``."""
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, torch.Tensor] = {}
    for k, v in plain_state(model).items():
        tensors[f"model.{k}"] = v
    if ema is not None:
        for k, v in ema.state_dict().items():
            tensors[f"ema.{k}"] = v
    opt_state = optimizer.state_dict()
    for pid, st in opt_state["state"].items():
        for k, v in st.items():
            tensors[f"optim.{pid}.{k}"] = v if torch.is_tensor(v) else torch.tensor(v)
    tensors["rng.torch"] = torch.get_rng_state()
    tensors["rng.gen"] = gen.get_state()
    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    _atomic_save_tensors(tensors, ckpt_dir / LAST)
    if best.state is not None and best.epoch == epoch + 1:
        _atomic_save_tensors(best.state, ckpt_dir / BEST)
    meta = {
        "epoch": epoch,
        "plan": plan.to_dict(),
        "history": history,
        "best_auc": best.auc,
        "best_loss": best.loss,
        "best_epoch": best.epoch,
        "scheduler": scheduler.state_dict(),
        "schedule": schedule.state_dict(),
        "optim_param_groups": opt_state["param_groups"],
        "data_fingerprint": fingerprint,
    }
    tmp = ckpt_dir / (STATE + ".tmp")
    tmp.write_text(json.dumps(meta, default=_json_safe))
    os.replace(tmp, ckpt_dir / STATE)


def restore(
    ckpt_dir: Path,
    state: dict[str, Any],
    *,
    best: Selection,
    model: nn.Module,
    ema: nn.Module | None,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    schedule: Schedule,
    gen: torch.Generator,
) -> None:
    """Load everything :func:`save` wrote (``state`` is the checkpoint's ``state.json``); the selected
    weights when the checkpoint holds them."""
    tensors = load_file(str(ckpt_dir / LAST))
    model.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
    if ema is not None:
        ema.load_state_dict({k[4:]: v for k, v in tensors.items() if k.startswith("ema.")})
    opt_state: dict[str, Any] = {"state": {}, "param_groups": state["optim_param_groups"]}
    for k, v in tensors.items():
        if k.startswith("optim."):
            _, pid, name = k.split(".", 2)
            opt_state["state"].setdefault(int(pid), {})[name] = v
    optimizer.load_state_dict(opt_state)
    scheduler.load_state_dict(state["scheduler"])
    schedule.load_state_dict(state.get("schedule"))
    torch.set_rng_state(tensors["rng.torch"])
    gen.set_state(tensors["rng.gen"])
    best.auc, best.loss, best.epoch = state["best_auc"], state["best_loss"], state["best_epoch"]
    best.state = load_best(ckpt_dir)


def load_best(ckpt_dir: Path, *, required: bool = False) -> dict[str, torch.Tensor] | None:
    """The selected weights, if a checkpoint holds them (``required``: it must)."""
    best = ckpt_dir / BEST
    return load_file(str(best)) if required or best.exists() else None


def load_state(ckpt_dir: Path) -> dict[str, Any] | None:
    """The checkpoint's ``state.json``, or None when there is no complete checkpoint."""
    p = ckpt_dir / STATE
    if not p.exists() or not (ckpt_dir / LAST).exists():
        return None
    try:
        return json.loads(p.read_text())
    except json.JSONDecodeError as exc:
        raise MedclfError(f"{p}: the checkpoint state is damaged ({exc}); start a new run") from exc


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
