"""medclf.allocator: freed C-heap memory stays in the process, so the next allocation does not page-fault."""

from __future__ import annotations

import ctypes
import resource
import sys

import pytest

from medclf import allocator
from medclf.errors import ConfigError
from medclf.training.config import TrainConfig

BLOCK = 64 << 20  # above glibc's largest mmap threshold (32 MiB): served by mmap unless told otherwise


def _faults_per_cycle(libc: ctypes.CDLL, cycles: int = 4) -> float:
    """Minor page faults of allocating, writing and freeing one large block, per cycle."""

    def cycle() -> None:
        p = libc.malloc(BLOCK)
        assert p
        ctypes.memset(p, 1, BLOCK)
        libc.free(p)

    cycle()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(cycles):
        cycle()
    return (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / cycles


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_freed_memory_is_reused_without_page_faults():
    libc = ctypes.CDLL(None)
    if not hasattr(libc, "gnu_get_libc_version"):
        pytest.skip("not glibc")
    libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
    libc.free.argtypes = [ctypes.c_void_p]
    libc.mallopt.argtypes, libc.mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    # The C library's own behaviour first (mmap allowed, glibc's default trim threshold), then ours.
    assert libc.mallopt(allocator._M_MMAP_MAX, 65536) and libc.mallopt(
        allocator._M_TRIM_THRESHOLD, 128 * 1024
    )
    system = _faults_per_cycle(libc)
    if system < (BLOCK // 4096) / 4:
        pytest.skip("this kernel backs the block with huge pages: nothing to measure")
    allocator._applied = None
    try:
        assert allocator.keep_freed_memory() and allocator.keep_freed_memory()  # idempotent
        kept = _faults_per_cycle(libc)
    finally:
        allocator._applied = None
        allocator.keep_freed_memory()  # leave the process as training leaves it
    assert kept < system / 10, (kept, system)


def test_system_malloc_can_be_kept(monkeypatch):
    monkeypatch.setattr(allocator, "_applied", None)
    monkeypatch.setenv("MEDCLF_MALLOC", "system")
    assert allocator.keep_freed_memory() is False


def test_unknown_malloc_setting_is_refused(monkeypatch):
    monkeypatch.setattr(allocator, "_applied", None)
    monkeypatch.setenv("MEDCLF_MALLOC", "sytem")
    with pytest.raises(ConfigError, match=r"MEDCLF_MALLOC must be 'keep'.*'system'.*not 'sytem'"):
        allocator.keep_freed_memory()
    assert allocator._applied is None  # refused, not recorded as off: fixing the variable takes effect
    with pytest.raises(ConfigError, match="MEDCLF_MALLOC"):  # training refuses it with its other settings
        TrainConfig().updated({})
    monkeypatch.setenv("MEDCLF_MALLOC", " System ")
    assert allocator.check_setting() == "system"
