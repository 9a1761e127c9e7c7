"""Inference engines: what turns a bundle's preprocessed tensors into class probabilities.

=============  ===========================================================================================
``torch``      the bundle's ``nn.Module`` (fp32, eager), rebuilt from ``model.safetensors``
``onnx-fp32``  ``model.onnx`` through ONNX Runtime (written by ``medclf export --onnx``)
``onnx-int8``  ``model.int8.onnx``, statically quantised to int8 (``medclf export --int8``)
``onnx``       the int8 model when the bundle has one, else the fp32 one
``auto``       the default: ``onnx`` when the bundle holds an ONNX model, else ``torch``
=============  ===========================================================================================

Every engine returns logits; :func:`probabilities` then applies the bundle's temperature (a multi-label
bundle's: one per finding) and the softmax (the sigmoids), so calibration is identical whichever engine runs.
:class:`medclf.predictor.Predictor` picks, builds and keeps the runners. The preprocessing is the bundle's, for
all of them.
ONNX models are read into memory and checked against the sha256 in ``bundle.json`` before a session is
built from those very bytes, so a file swapped after the bundle was loaded is refused too.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from medclf.errors import BundleError, ConfigError

if TYPE_CHECKING:
    from medclf.bundle import Bundle

ONNX_FP32 = "model.onnx"
ONNX_INT8 = "model.int8.onnx"

Runner = Callable[[np.ndarray | torch.Tensor], np.ndarray]  # (N, C, *size) float32 -> (N, n_classes) logits


@dataclass(frozen=True)
class EngineInfo:
    name: str
    description: str
    file: str | None  # the bundle file the engine needs (None: the weights every bundle has)
    build: Callable[[Bundle], Runner]


_ENGINES: dict[str, EngineInfo] = {}
# Aliases resolve, in order of preference, to the first engine whose file the bundle holds.
_ALIASES: dict[str, tuple[str, ...]] = {
    "onnx": ("onnx-int8", "onnx-fp32"),
    "auto": ("onnx-int8", "onnx-fp32", "torch"),
}


def register_engine(name: str, *, description: str, file: str | None) -> Callable[[Callable], Callable]:
    def decorate(build: Callable[[Bundle], Runner]) -> Callable[[Bundle], Runner]:
        if name in _ENGINES or name in _ALIASES:
            raise ValueError(f"engine {name!r} registered twice")
        _ENGINES[name] = EngineInfo(name, description, file, build)
        return build

    return decorate


def engine_choices() -> list[str]:
    """Every name ``--engine`` accepts."""
    return [*_ALIASES, *_ENGINES]


def available_engines(files: Mapping[str, Any]) -> list[str]:
    """The concrete engines a bundle with these files can run."""
    return [e.name for e in _ENGINES.values() if e.file is None or e.file in files]


def resolve_engine(files: Mapping[str, Any], name: str = "auto") -> str:
    """The concrete engine that ``name`` means for a bundle holding ``files`` (its ``bundle.json`` list)."""
    have = available_engines(files)
    if name in _ALIASES:
        for candidate in _ALIASES[name]:
            if candidate in have:
                return candidate
        raise BundleError(
            f"the bundle has no ONNX model for engine {name!r}; create one with `medclf export BUNDLE --onnx`"
        )
    if name not in _ENGINES:
        raise ConfigError(f"unknown engine {name!r}; choose one of {', '.join(engine_choices())}")
    if name not in have:
        hint = "--int8" if _ENGINES[name].file == ONNX_INT8 else "--onnx"
        raise BundleError(
            f"the bundle has no {_ENGINES[name].file} for engine {name!r}; "
            f"create it with `medclf export BUNDLE {hint}`"
        )
    return name


def build_runner(bundle: Bundle, engine: str) -> Runner:
    """A new runner of the concrete engine ``engine`` (see :func:`resolve_engine`) for ``bundle``; a
    :class:`~medclf.predictor.Predictor` keeps the runners it builds."""
    if engine not in _ENGINES:
        raise ConfigError(f"unknown engine {engine!r}; choose one of {', '.join(_ENGINES)}")
    return _ENGINES[engine].build(bundle)


def probabilities(
    logits: np.ndarray,
    temperature: float | Sequence[float] | np.ndarray = 1.0,
    task: str = "multiclass",
) -> np.ndarray:
    """Temperature-scaled softmax in float64: the one place every engine's logits become probabilities.
    Multi-label findings (``task="multilabel"``): an independent sigmoid per finding instead, each finding's
    logit divided by its own temperature when ``temperature`` holds one per finding (column)."""
    t = np.asarray(temperature, dtype=np.float64)
    if t.ndim == 0:
        z = np.asarray(logits, dtype=np.float64) / float(t)
    else:
        z = np.asarray(logits, dtype=np.float64)
        if task != "multilabel" or t.shape != (z.shape[-1],):
            raise ValueError(
                f"one temperature per output is for multi-label findings with one logit each; got {t.shape[0]} "
                f"temperatures for {task} logits of shape {z.shape}"
            )
        z = z / t
    if task == "multilabel":
        from scipy.special import expit  # no overflow warning for large negative logits

        return expit(z)
    z -= z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def cpu_flags() -> frozenset[str] | None:
    """This x86 CPU's feature flags from /proc/cpuinfo (``avx2``, ``avx512_vnni``...); None when unknown."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return None
    line = next((ln for ln in text.splitlines() if ln.startswith("flags")), None)
    return None if line is None else frozenset(line.split(":", 1)[1].split())


def tune_allocator() -> bool:
    """Keep freed memory in the process between requests (glibc only; False where it does not apply).

    A decoded 512x512 image and its float copies are each larger than glibc's default mmap threshold
    (128 KiB, adapting upwards), so by default every request mapped fresh pages, page-faulted them in and
    gave them back: measured on 2 cores, served 512x512 JPEG p50 20.8-21.6 ms before, 12.8-13.5 ms with freed memory
    kept (heap top trimmed only beyond 256 MiB, 64 MiB of headroom, buffers below 32 MiB from the heap)."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):  # not glibc (musl, ...)
        return False
    m_trim_threshold, m_top_pad, m_mmap_threshold = -1, -2, -3
    return all(
        mallopt(option, value) == 1
        for option, value in (
            (m_mmap_threshold, 32 << 20),  # glibc's largest accepted value on 64-bit
            (m_trim_threshold, 256 << 20),
            (m_top_pad, 64 << 20),
        )
    )


def ort_threads() -> int:
    """Intra-op threads for ONNX Runtime: the thread policy of this process (:mod:`medclf.threads`: the
    CPUs really available, or ``--threads``), else the CPUs its affinity and cgroup quota allow
    (``MEDCLF_ORT_THREADS`` overrides both).

    ONNX Runtime's own default counts the machine's physical cores, which oversubscribes a process
    restricted to fewer CPUs (a container, ``taskset``) or sharing them with a busy neighbour."""
    env = os.environ.get("MEDCLF_ORT_THREADS")
    if env:
        try:
            return max(1, int(env))
        except ValueError:
            raise ConfigError(f"MEDCLF_ORT_THREADS must be a whole number, not {env!r}") from None
    from medclf import threads

    return max(1, min(threads.ort_threads(), 16))


def ort_session(model: bytes | str | Path, *, threads: int | None = None) -> Any:
    """An ONNX Runtime CPU session with every graph optimisation, sequential execution and a sane thread
    count."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.intra_op_num_threads = threads or ort_threads()
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3  # warnings such as "unused initializer" are not the user's concern
    # Idle workers sleep instead of spinning: a spinning worker takes the CPU that reading and preprocessing
    # the next image needs (measured on 2 cores: single-JPEG latency ~4.6 ms instead of ~8 ms; batch-64
    # throughput unchanged).
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    source = model if isinstance(model, bytes) else str(model)
    try:
        return ort.InferenceSession(source, sess_options=opts, providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime raises its own exception types for malformed models
        raise BundleError(f"ONNX Runtime cannot load the model: {exc}") from exc


class OnnxRunner:
    """Logits (and penultimate features, when the graph has them) from an ONNX model whose single input is
    the preprocessed batch."""

    def __init__(self, model: bytes | str | Path, *, threads: int | None = None) -> None:
        self.session = ort_session(model, threads=threads)
        self.input_name = self.session.get_inputs()[0].name
        outputs = [o.name for o in self.session.get_outputs()]
        self.output_name = outputs[0]
        self.features_name = "features" if "features" in outputs else None
        # The features of the last batch: the OOD guard asks for them right after the prediction, and
        # one pass through the graph yields both.
        self._last: tuple[np.ndarray, np.ndarray] | None = None

    def __call__(self, x: np.ndarray | torch.Tensor) -> np.ndarray:
        x = np.ascontiguousarray(x, dtype=np.float32)
        if self.features_name is None:
            return self.session.run([self.output_name], {self.input_name: x})[0]
        logits, feats = self.session.run([self.output_name, self.features_name], {self.input_name: x})
        self._last = (x.copy(), feats)
        return logits

    def features(self, x: np.ndarray | torch.Tensor) -> np.ndarray | None:
        """The input of the network's last linear layer (see :mod:`medclf.ood`), or None if not exported."""
        if self.features_name is None:
            return None
        x = np.ascontiguousarray(x, dtype=np.float32)
        last = self._last
        if last is not None and last[0].shape == x.shape and np.array_equal(last[0], x):
            return last[1].astype(np.float64)
        return self.session.run([self.features_name], {self.input_name: x})[0].astype(np.float64)


class TorchRunner:
    """Logits from an ``nn.Module`` in eval mode, fp32, as the bundle is normally run."""

    def __init__(self, model: torch.nn.Module | Callable[[], torch.nn.Module]) -> None:
        # A callable is asked for the module on every call (the bundle's model may be replaced).
        self._model = model

    @property
    def model(self) -> torch.nn.Module:
        return self._model if isinstance(self._model, torch.nn.Module) else self._model()

    @torch.no_grad()
    def __call__(self, x: np.ndarray | torch.Tensor) -> np.ndarray:
        model = self.model.eval()
        return model(torch.as_tensor(x).float()).float().numpy()

    def features(self, x: np.ndarray | torch.Tensor) -> np.ndarray:
        from medclf.ood import penultimate_features

        return penultimate_features(self.model, x)


def _verified_bytes(bundle: Bundle, name: str) -> bytes:
    data = bundle.file(name).read_bytes()
    if hashlib.sha256(data).hexdigest() != bundle.manifest["files"][name]:
        raise BundleError(
            f"{bundle.path}: integrity check failed: sha256 of {name} does not match bundle.json"
        )
    return data


@register_engine("torch", description="PyTorch eager, fp32 (model.safetensors)", file=None)
def _torch_engine(bundle: Bundle) -> Runner:
    return TorchRunner(lambda: bundle.model)


@register_engine("onnx-fp32", description="ONNX Runtime, fp32 (model.onnx)", file=ONNX_FP32)
def _onnx_fp32_engine(bundle: Bundle) -> Runner:
    return OnnxRunner(_verified_bytes(bundle, ONNX_FP32))


@register_engine("onnx-int8", description="ONNX Runtime, static int8 (model.int8.onnx)", file=ONNX_INT8)
def _onnx_int8_engine(bundle: Bundle) -> Runner:
    return OnnxRunner(_verified_bytes(bundle, ONNX_INT8))


__all__ = [
    "ONNX_FP32",
    "ONNX_INT8",
    "OnnxRunner",
    "TorchRunner",
    "available_engines",
    "build_runner",
    "engine_choices",
    "ort_session",
    "probabilities",
    "register_engine",
    "resolve_engine",
    "tune_allocator",
]
