"""Training rows held in memory, or streamed from the on-disk cache when the data outgrows memory.

The cache (:mod:`medclf.data.cache`) keeps every preprocessed sample as one row of ``tensors.npy``. When the
rows a run needs fit comfortably in memory they are copied into one tensor (fastest). Otherwise
:class:`StreamedRows` reads each batch's rows from the file with ``os.preadv`` straight into the batch's
buffer: the rows pass through the kernel's page cache, which the kernel may drop at will, and never pile up
in the process (a writable or long-lived memory map would count every page it touched as resident).

To keep those reads sequential-ish on disk, :func:`block_shuffled_order` shuffles fixed blocks of
neighbouring rows and then the samples inside a window of a few blocks (the shuffle-buffer scheme of
streaming loaders such as WebDataset): each batch touches a handful of nearby regions instead of scattered
single rows, at the price of a slightly less random order.

A streamed run also fixes glibc's mmap threshold (:func:`return_freed_batches_to_os`): by default glibc raises
that threshold each time a large block is freed, after which every batch buffer comes from the heap, whose
freed holes stay resident; RSS then grew with the number of batches rather than with their size.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import re
import resource
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar, cast

import numpy as np
import psutil
import torch

from medclf.errors import ConfigError

STREAM_MODES = ("auto", "on", "off")
# Materialise only when the rows take at most this fraction of the memory available to the run: the rest
# is for the model, activations, the optimiser and everything else.
MEMORY_FRACTION = 0.5
BLOCK_ROWS = 64
WINDOW_BLOCKS = 8

T = TypeVar("T")
R = TypeVar("R")

_M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter number (malloc.h)
_MMAP_THRESHOLD_BYTES = 128 << 10  # glibc's own initial value: batches (MiBs) are always mapped afresh


def parse_bytes(text: str | int | float | None) -> int | None:
    """'512M', '2G', '1.5GiB', '800000000' or a number of bytes -> bytes (``None`` stays ``None``)."""
    if text is None:
        return None
    if isinstance(text, (int, float)):
        value = float(text)
    else:
        m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(?:i?b)?\s*", str(text).lower())
        if not m:
            raise ConfigError(f"cannot read the memory size {text!r}: use e.g. 512M, 2G or a number of bytes")
        value = float(m.group(1)) * 1024 ** "_kmgt".index(m.group(2) or "_")
    if value <= 0:
        raise ConfigError("a memory size must be positive")
    return int(value)


def _cgroup_headroom() -> int | None:
    """Bytes left under this process's cgroup memory limit (v2 or v1), or ``None`` when unlimited."""
    for limit_file, usage_file in (
        ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
        ("/sys/fs/cgroup/memory/memory.limit_in_bytes", "/sys/fs/cgroup/memory/memory.usage_in_bytes"),
    ):
        try:
            raw = Path(limit_file).read_text().strip()
            usage = int(Path(usage_file).read_text().strip())
        except (OSError, ValueError):
            continue
        if raw == "max" or int(raw) >= 1 << 60:  # v1 writes a huge number for "no limit"
            return None
        return max(int(raw) - usage, 0)
    return None


def available_memory(limit: int | None = None) -> int:
    """Memory this process may still fill: the least of the system's available memory, the headroom under
    a cgroup limit, the room under ``ulimit -v`` and ``limit`` (the ``memory_limit`` setting)."""
    candidates = [int(psutil.virtual_memory().available)]
    headroom = _cgroup_headroom()
    if headroom is not None:
        candidates.append(headroom)
    soft, _ = resource.getrlimit(resource.RLIMIT_AS)
    if soft != resource.RLIM_INFINITY:
        candidates.append(max(soft - psutil.Process().memory_info().vms, 0))
    if limit is not None:
        candidates.append(limit)
    return min(candidates)


def should_stream(
    mode: str, nbytes: int, *, copies: int = 1, memory_limit: int | None = None
) -> tuple[bool, str]:
    """Decide whether to stream rows of ``nbytes`` from disk (``copies``: processes on this machine that
    would each hold them, i.e. torchrun's local world size). Returns the decision and its reason."""
    if mode not in STREAM_MODES:
        raise ConfigError(f"stream must be one of {', '.join(STREAM_MODES)}, not {mode!r}")
    need = nbytes * copies
    if mode != "auto":
        return mode == "on", f"streaming {mode} (setting)"
    avail = available_memory(memory_limit)
    stream = need > MEMORY_FRACTION * avail
    verb = "streamed from the disk cache" if stream else "held in memory"
    return stream, (
        f"cached rows {need / 2**20:.0f} MiB{f' ({copies} processes)' if copies > 1 else ''} vs "
        f"{avail / 2**20:.0f} MiB available: {verb}"
    )


class StreamedRows:
    """Rows ``idx`` of a cached ``.npy`` array, read from disk on demand.

    Indexing with an integer array or tensor of positions (into ``idx``) or a slice returns a float16
    tensor of those rows, in that order, exactly what indexing the materialised tensor would return.
    """

    def __init__(self, array: np.ndarray, idx: np.ndarray) -> None:
        filename = getattr(array, "filename", None)
        if filename is None:
            raise ValueError("StreamedRows needs a memory-mapped .npy array (np.load(..., mmap_mode='r'))")
        if not array.flags.c_contiguous:
            raise ValueError("StreamedRows needs a C-ordered array")
        self.path = str(filename)
        self.offset = int(cast(np.memmap, array).offset)
        self.row_shape = tuple(array.shape[1:])
        self.dtype = array.dtype
        self.row_bytes = int(np.prod(self.row_shape)) * self.dtype.itemsize
        self.idx = np.asarray(idx, dtype=np.int64)
        self.fd = os.open(self.path, os.O_RDONLY)

    def __len__(self) -> int:
        return len(self.idx)

    def __getitem__(self, key: Any) -> torch.Tensor:
        if isinstance(key, slice):
            positions = np.arange(len(self.idx))[key]
        elif torch.is_tensor(key):
            positions = key.numpy()
        else:
            positions = np.asarray(key)
        return torch.from_numpy(self.read(self.idx[positions.astype(np.int64)]))

    def read(self, rows: np.ndarray) -> np.ndarray:
        """The cache rows ``rows`` (any order, repeats allowed), one contiguous read per run of rows."""
        out = np.empty((len(rows), *self.row_shape), dtype=self.dtype)
        if len(rows) == 0:
            return out
        order = np.argsort(rows, kind="stable")
        sorted_rows = rows[order]
        unique = np.unique(sorted_rows)
        buf = np.empty((len(unique), *self.row_shape), dtype=self.dtype)
        flat = buf.reshape(len(unique), -1).view(np.uint8)
        breaks = np.flatnonzero(np.diff(unique) != 1) + 1
        for run in np.split(np.arange(len(unique)), breaks):
            lo, hi = int(run[0]), int(run[-1]) + 1
            view = flat[lo:hi].data.cast("B")
            got = os.preadv(self.fd, [view], self.offset + int(unique[lo]) * self.row_bytes)
            if got != len(view):
                raise OSError(f"{self.path}: short read ({got} of {len(view)} bytes); the cache is damaged")
        # Rows in the order asked for (repeats copied).
        which = np.searchsorted(unique, sorted_rows)
        out[order] = buf[which]
        return out

    def close(self) -> None:
        if getattr(self, "fd", -1) >= 0:
            os.close(self.fd)
            self.fd = -1

    def __del__(self) -> None:
        self.close()


def block_shuffled_order(
    n: int, gen: torch.Generator, *, block: int = BLOCK_ROWS, window: int = WINDOW_BLOCKS
) -> torch.Tensor:
    """A permutation of ``range(n)`` that shuffles blocks of ``block`` neighbours, then the samples inside
    each window of ``window`` consecutive (shuffled) blocks. Deterministic for a given generator state."""
    n_blocks = max(1, -(-n // block))
    blocks = torch.randperm(n_blocks, generator=gen)
    parts = []
    for w in range(0, n_blocks, window):
        members = torch.cat(
            [torch.arange(int(b) * block, min((int(b) + 1) * block, n)) for b in blocks[w : w + window]]
        )
        parts.append(members[torch.randperm(len(members), generator=gen)])
    return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.int64)


def prefetched(fn: Callable[[T], R], items: Iterable[T], depth: int = 2) -> Iterator[tuple[T, R]]:
    """``(item, fn(item))`` in order, with up to ``depth`` calls running ahead in a background thread (disk
    reads overlap the training step; ``os.preadv`` releases the GIL). ``depth=0`` runs inline."""
    if depth <= 0:
        for item in items:
            yield item, fn(item)
        return
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="medclf-prefetch") as pool:
        queue: deque[tuple[T, Future[R]]] = deque()
        it = iter(items)
        for item in it:
            queue.append((item, pool.submit(fn, item)))
            if len(queue) > depth:
                head, fut = queue.popleft()
                yield head, fut.result()
        while queue:
            head, fut = queue.popleft()
            yield head, fut.result()


def return_freed_batches_to_os() -> bool:
    """Pin glibc's mmap threshold at its initial 128 KiB, so every batch-sized buffer is mapped on allocation
    and unmapped on free instead of leaving holes in the heap. Setting the threshold explicitly also turns
    off glibc's dynamic raise of it (``mallopt(3)``). Returns False where the C library is not glibc."""
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl, macOS, Windows: no mallopt
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD_BYTES))
