"""The C heap of a training process: keep freed memory for the next step instead of returning it to the OS.

glibc's malloc serves large blocks with a fresh ``mmap`` and gives them back with ``munmap`` on free, and
trims the top of its heap back to the OS too. A CPU training step allocates and frees the same large
activation and gradient buffers every step, so every step page-faults them in again (and the kernel zeroes
every page first): that time is spent in the kernel, not in PyTorch. :func:`keep_freed_memory` turns both
off for the process (``mallopt``: no ``mmap`` for allocations, a 1 GiB trim threshold), so the buffers of one
step are reused by the next. The cost: memory freed during training stays with the process for reuse
(only free space beyond :data:`KEEP_BYTES` at the top of the heap goes back to the OS), so its resident size
stays near its peak until it exits; which is why only training and pretraining ask for it, never the
long-running server. ``MEDCLF_MALLOC=system`` leaves the C library's behaviour alone (``keep``, the default,
asks for the above; any other value is refused, so a misspelt opt-out does not silently keep it on); other C
libraries (musl, macOS) are left alone as well. Effect on training throughput: BENCHMARKS.md, "Training throughput".
"""

from __future__ import annotations

import ctypes
import os
import sys

from medclf.errors import ConfigError

__all__ = ["KEEP_BYTES", "check_setting", "keep_freed_memory"]

# mallopt parameters (glibc's malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4
# Free memory at the top of the heap kept for reuse before any is returned to the OS.
KEEP_BYTES = 1 << 30
_applied: bool | None = None
SETTINGS = ("keep", "system")


def keep_freed_memory() -> bool:
    """Keep freed C-heap memory in the process for reuse (see the module's docstring). Idempotent; returns
    whether it is in effect (False with ``MEDCLF_MALLOC=system`` or a C library without glibc's
    ``mallopt``). Raises :class:`~medclf.errors.ConfigError` for a ``MEDCLF_MALLOC`` it does not know."""
    global _applied
    if _applied is None:
        _applied = _apply()
    return _applied


def check_setting() -> str:
    """``MEDCLF_MALLOC`` as it will apply (``keep`` or ``system``); :class:`~medclf.errors.ConfigError` for any
    other value. Training checks it with its other settings, before any data is read."""
    setting = os.environ.get("MEDCLF_MALLOC", "").strip().lower() or "keep"
    if setting not in SETTINGS:
        raise ConfigError(
            f"MEDCLF_MALLOC must be 'keep' (reuse freed memory, the default) or 'system' (the C library's own "
            f"behaviour), not {os.environ['MEDCLF_MALLOC']!r}"
        )
    return setting


def _apply() -> bool:
    if check_setting() == "system" or not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None)  # the C library this process already runs on
        libc.gnu_get_libc_version  # noqa: B018  (glibc only: its mallopt parameters are the ones above)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    # mallopt returns 1 on success, 0 on error.
    return bool(mallopt(_M_MMAP_MAX, 0)) and bool(mallopt(_M_TRIM_THRESHOLD, KEEP_BYTES))
