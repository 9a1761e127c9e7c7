"""Post-training static int8 quantisation with ONNX Runtime, calibrated on training samples.

Weights are int8 per output channel (symmetric); activations uint8 with ranges observed on a stratified
sample of training images (min/max calibration). The default format, QDQ with uint8 activations and int8
weights (``U8S8``), is what ONNX Runtime's x86 kernels (AVX-512 VNNI) run fastest; see
``benchmarks/inference.py`` for the measurements behind the choice.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from medclf.errors import ConfigError

FORMATS = ("qdq", "qoperator")
CALIBRATION_METHODS = ("minmax", "entropy", "percentile")


def cpu_has_vnni() -> bool:
    """Whether this CPU has 8-bit dot-product instructions (AVX-512 VNNI or AVX-VNNI); not x86: True."""
    import platform

    from medclf.engines import cpu_flags

    if platform.machine().lower() not in ("x86_64", "amd64", "i386", "i686"):
        return True
    flags = cpu_flags()
    return True if flags is None else bool({"avx512_vnni", "avx_vnni"} & flags)  # unknown: full 8-bit


def quantize_int8(
    fp32_path: str | Path,
    out_path: str | Path,
    calibration: np.ndarray,
    *,
    fmt: str = "qdq",
    per_channel: bool = True,
    method: str = "minmax",
    batch_size: int = 16,
    reduce_range: bool | None = None,
) -> dict[str, Any]:
    """Quantise the ONNX model at ``fp32_path`` to ``out_path``, calibrated on ``calibration`` (N, C, ...).

    ``reduce_range``: 7-bit weights. On x86 CPUs without VNNI, ONNX Runtime's uint8 x int8 kernels
    (VPMADDUBSW) add pairs of products in 16 bits and can saturate; 7-bit weights cannot. ``None`` (auto)
    turns it on when this CPU lacks VNNI (brain MRI, AVX2: 8-bit weights lost 2.6 accuracy points).
    """
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quant_pre_process,
        quantize_static,
    )

    _check_options(fmt, method, len(calibration))

    class Reader(CalibrationDataReader):
        def __init__(self, x: np.ndarray) -> None:
            self.batches = iter(
                [
                    np.ascontiguousarray(x[i : i + batch_size], dtype=np.float32)
                    for i in range(0, len(x), batch_size)
                ]
            )

        def get_next(self) -> dict[str, np.ndarray] | None:
            batch = next(self.batches, None)
            return None if batch is None else {"input": batch}

    if reduce_range is None:
        reduce_range = not cpu_has_vnni()
    t0 = time.perf_counter()
    work = Path(tempfile.mkdtemp(prefix="medclf-quant-"))
    try:
        pre = work / "pre.onnx"
        # Shape inference and graph optimisation first, as ONNX Runtime's quantisation guide recommends.
        quant_pre_process(str(fp32_path), str(pre), skip_symbolic_shape=True)
        quantize_static(
            str(pre),
            str(out_path),
            Reader(calibration),
            quant_format=QuantFormat.QDQ if fmt == "qdq" else QuantFormat.QOperator,
            per_channel=per_channel,
            reduce_range=reduce_range,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            calibrate_method={
                "minmax": CalibrationMethod.MinMax,
                "entropy": CalibrationMethod.Entropy,
                "percentile": CalibrationMethod.Percentile,
            }[method],
            extra_options={"ActivationSymmetric": False, "WeightSymmetric": True},
        )
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return {
        "format": fmt.upper() if fmt == "qdq" else "QOperator",
        "weights": ("int8 (7-bit range)" if reduce_range else "int8")
        + (", per channel" if per_channel else ", per tensor"),
        "reduce_range": bool(reduce_range),
        "activations": "uint8",
        "calibration": {"method": method, "n_samples": len(calibration), "split": "train"},
        "seconds": round(time.perf_counter() - t0, 1),
    }


def _check_options(fmt: str, method: str, n_calibration: int) -> None:
    if fmt not in FORMATS:
        raise ConfigError(f"int8 format must be one of {', '.join(FORMATS)}, not {fmt!r}")
    if method not in CALIBRATION_METHODS:
        raise ConfigError(
            f"calibration method must be one of {', '.join(CALIBRATION_METHODS)}, not {method!r}"
        )
    if n_calibration == 0:
        raise ConfigError("int8 quantisation needs calibration samples")
