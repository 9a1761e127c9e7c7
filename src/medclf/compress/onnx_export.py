"""ONNX export with a dynamic batch axis, checked against PyTorch before it is accepted.

The graph maps the preprocessed batch ``input`` ``(N, C, *size)`` to ``logits`` and, for networks with a
final linear layer, ``features`` (that layer's input, which the out-of-distribution guard of
:mod:`medclf.ood` scores), so the guard runs on the same engine as the prediction. The bundle's
temperature and the softmax are applied outside the graph (:func:`medclf.engines.probabilities`), exactly
as for the PyTorch model, so recalibrating a bundle never requires re-exporting it. The exporter is
PyTorch's ``torch.export``-based one (batch norm folded into the convolutions, dropout gone); a model it
cannot trace falls back to the TorchScript-based exporter, and ``bundle.json`` records which one ran.
"""

from __future__ import annotations

import contextlib
import io
import logging
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from medclf.engines import OnnxRunner, TorchRunner, probabilities
from medclf.errors import BundleError

OPSET = 18
PARITY_TOLERANCE = 1e-4  # max |p_onnx - p_torch| over the check samples, fp32


class _WithFeatures(nn.Module):
    """The model's logits and the input of its last linear layer (flattened), in one forward pass."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.head = [m for m in model.modules() if isinstance(m, nn.Linear)][-1]

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        captured: list[torch.Tensor] = []
        handle = self.head.register_forward_hook(lambda _m, inputs, _out: captured.append(inputs[0]))
        try:
            logits = self.model(x)
        finally:
            handle.remove()
        return logits, captured[0].flatten(1)


def export_onnx(model: nn.Module, input_shape: tuple[int, ...], path: str | Path) -> dict[str, Any]:
    """Write ``model`` (eval mode, CPU, fp32) to ``path`` with a dynamic batch axis; return what was done."""
    # torch's stub of Module.to lacks its memory_format keyword.
    model = model.eval().float().to(memory_format=torch.contiguous_format)  # type: ignore[call-overload]
    with_features = any(isinstance(m, nn.Linear) for m in model.modules())
    graph = _WithFeatures(model).eval() if with_features else model
    outputs = ["logits", "features"] if with_features else ["logits"]
    example = torch.rand(2, *input_shape)
    errors: list[str] = []
    for name, exporter in (("dynamo", _export_dynamo), ("torchscript", _export_torchscript)):
        try:
            with _quiet():
                exporter(graph, example, Path(path), outputs)
            return {
                "exporter": name,
                "opset": OPSET if name == "dynamo" else 17,
                "input": "input",
                "outputs": outputs,
                "dynamic_axes": {n: [0] for n in ("input", *outputs)},
            }
        except Exception as exc:  # each exporter fails in its own way on models it cannot handle
            errors.append(f"{name}: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")
    raise BundleError("the model cannot be exported to ONNX (" + "; ".join(errors) + ")")


def _export_dynamo(model: nn.Module, example: torch.Tensor, path: Path, outputs: list[str]) -> None:
    batch = torch.export.Dim("batch", min=1)
    torch.onnx.export(
        model,
        (example,),
        str(path),
        dynamo=True,
        opset_version=OPSET,
        input_names=["input"],
        output_names=outputs,
        dynamic_shapes=({0: batch},),
        external_data=False,
        optimize=True,
        verbose=False,
    )


def _export_torchscript(model: nn.Module, example: torch.Tensor, path: Path, outputs: list[str]) -> None:
    torch.onnx.export(
        model,
        (example,),
        str(path),
        dynamo=False,
        opset_version=17,
        input_names=["input"],
        output_names=outputs,
        dynamic_axes={n: {0: "batch"} for n in ("input", *outputs)},
        do_constant_folding=True,
    )


@contextlib.contextmanager
def _quiet() -> Any:
    """The exporters print progress and deprecation notes to stdout/stderr and the log: keep them quiet."""
    sink = io.StringIO()
    loggers = [logging.getLogger(n) for n in ("torch.onnx", "torch.export", "onnxscript", "torch._dynamo")]
    levels = [lg.level for lg in loggers]
    try:
        for lg in loggers:
            lg.setLevel(logging.ERROR)
        with warnings.catch_warnings(), contextlib.redirect_stdout(sink), contextlib.redirect_stderr(sink):
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


def check_parity(
    model: nn.Module,
    onnx_path: str | Path,
    x: np.ndarray,
    *,
    temperature: float | tuple[float, ...] | list[float] = 1.0,
    batch_size: int = 32,
    task: str = "multiclass",
) -> dict[str, Any]:
    """Probabilities of the PyTorch model and of the ONNX model on the same inputs ``x``, in batches and one
    by one (the batch axis is dynamic), through the bundle's temperature (multi-label: one per finding).
    Returns the differences."""
    torch_run, onnx_run = TorchRunner(model), OnnxRunner(onnx_path)
    l_torch, l_onnx = [], []
    for start in range(0, len(x), batch_size):
        xb = x[start : start + batch_size]
        l_torch.append(torch_run(xb))
        l_onnx.append(onnx_run(xb))
    single = onnx_run(x[:1])
    lt, lo = np.concatenate(l_torch), np.concatenate(l_onnx)
    p_torch, p_onnx = probabilities(lt, temperature, task), probabilities(lo, temperature, task)
    diff = float(np.abs(p_torch - p_onnx).max())
    single_diff = float(np.abs(probabilities(single, temperature, task) - p_torch[:1]).max())
    return {
        "n_samples": len(x),
        "max_abs_prob_diff": max(diff, single_diff),
        "max_abs_logit_diff": float(np.abs(lt - lo).max()),
        # Multi-label: the same findings present at 0.5 (the bundle's own thresholds: the int8 step's record).
        "same_predictions": bool(
            ((p_torch >= 0.5) == (p_onnx >= 0.5)).all()
            if task == "multilabel"
            else (p_torch.argmax(1) == p_onnx.argmax(1)).all()
        ),
        "tolerance": PARITY_TOLERANCE,
        "temperature": _temperature_record(temperature),
    }


def _temperature_record(temperature: float | tuple[float, ...] | list[float]) -> float | list[float]:
    """The temperature as ``bundle.json`` records it: one number, or one per finding."""
    t = np.asarray(temperature, dtype=np.float64)
    return float(t) if t.ndim == 0 else [float(v) for v in t]
