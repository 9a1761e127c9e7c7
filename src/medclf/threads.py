"""How many threads and processes to use: the CPUs this process can really have, not the core count.

A user's machine is rarely idle. PyTorch starts one OpenMP thread per core; when another process holds
one of those cores, every parallel region waits at its barrier for a thread that is not running, and a
training step becomes several times slower than the same step on a single thread. So the thread count
follows what is *available*:

* the CPUs this process may run on (``sched_getaffinity``: ``taskset``, a container's cpuset);
* the CPU quota of its cgroup (v2 ``cpu.max``, v1 ``cpu.cfs_quota_us``), rounded down, at least 1;
* minus the cores other processes keep busy, measured from ``/proc/stat`` over a short window at start
  (:data:`LOAD_WINDOW_S`), our own CPU time subtracted.

PyTorch intra-op threads, ONNX Runtime threads and decoding workers are sized from that
(:func:`apply`), and ``--threads N`` or an explicit ``OMP_NUM_THREADS`` (``torchrun`` sets 1 per process)
override it. When other processes are busy at start, the command line also asks GNU OpenMP (PyTorch's
CPU runtime) to wait passively, i.e. to sleep at a barrier instead of spinning on a core someone else
needs; that must be decided before ``torch`` is first imported, so :func:`configure_openmp_env` runs
at the top of ``medclf.cli.main``.

:class:`LoadMonitor` re-measures between epochs (other processes' CPU use over the epoch), so a run whose
planner chose its schedule can give a core back when another process starts and take it again when it ends.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path

__all__ = [
    "CpuAvailability",
    "LoadMonitor",
    "ThreadPolicy",
    "apply",
    "configure_openmp_env",
    "cpu_availability",
    "current",
    "decode_workers",
]

LOAD_WINDOW_S = 0.3
# A core counts as taken when other processes keep it busy more than this fraction of the time.
BUSY_CORE = 0.5
MAX_DECODE_WORKERS = 4
# Commands that run models or decode data: the only ones that pay for the start-up load measurement.
COMPUTE_COMMANDS = frozenset(
    {"train", "evaluate", "predict", "audit", "export", "ensemble", "baseline", "demo", "explain", "serve"}
)
_CGROUP = Path("/sys/fs/cgroup")


@dataclass(frozen=True)
class CpuAvailability:
    """What this process can have: ``allowed`` CPUs by affinity, ``quota`` CPUs by cgroup (None: no limit),
    ``others_busy`` cores' worth of other processes' CPU use when measured (None: not measured)."""

    cores: int
    allowed: int
    quota: float | None
    others_busy: float | None

    @property
    def limit(self) -> int:
        """CPUs by affinity and quota alone (no load)."""
        n = self.allowed
        if self.quota is not None:
            n = min(n, max(1, math.floor(self.quota)))
        return max(1, n)

    @property
    def available(self) -> int:
        """CPUs left after other processes' load: a core busier than :data:`BUSY_CORE` counts as taken.
        The load is counted on the CPUs of the affinity mask, then capped by the quota: in a container
        limited to 2 CPUs of a busy 64-core host, 2 stay available while 2 of the 64 are free."""
        if self.others_busy is None:
            return self.limit
        free = self.allowed - self.others_busy
        return max(1, min(self.limit, math.floor(free + 1.0 - BUSY_CORE)))

    @property
    def busy(self) -> bool:
        return self.available < self.limit

    def describe(self) -> str:
        parts = [f"{self.allowed} of {self.cores} CPUs allowed"]
        if self.quota is not None:
            parts.append(f"cgroup quota {self.quota:g}")
        if self.others_busy is not None:
            parts.append(f"{self.others_busy:.1f} busy with other processes")
        return ", ".join(parts)


@dataclass(frozen=True)
class ThreadPolicy:
    """The chosen counts and why: ``source`` is ``--threads``, ``checkpoint`` (a resumed run keeps its
    count), ``OMP_NUM_THREADS`` or ``measured``."""

    torch_threads: int
    ort_threads: int
    decode_workers: int
    source: str
    cpus: CpuAvailability
    passive_wait: bool

    def describe(self) -> str:
        why = {
            "--threads": "--threads",
            "checkpoint": "as the run being resumed",
            "OMP_NUM_THREADS": "OMP_NUM_THREADS",
            "measured": self.cpus.describe(),
        }[self.source]
        wait = "; OpenMP waits passively" if self.passive_wait else ""
        return f"{self.torch_threads} thread(s), {self.decode_workers} decoding worker(s) ({why}){wait}"

    def to_dict(self) -> dict[str, object]:
        d = asdict(self)
        d["cpus"] = {**asdict(self.cpus), "available": self.cpus.available}
        return d


# ----------------------------------------------------------------------------------------- measuring


def allowed_cpus() -> list[int]:
    try:
        return sorted(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return list(range(os.cpu_count() or 1))


def cgroup_quota(root: Path = _CGROUP, proc_cgroup: Path = Path("/proc/self/cgroup")) -> float | None:
    """CPUs granted by this process's cgroup (v2 ``cpu.max`` or v1 CFS quota), or None when unlimited."""
    rel_v2, rel_v1 = "", ""
    try:
        for line in proc_cgroup.read_text().splitlines():
            hid, controllers, path = line.split(":", 2)
            if hid == "0":
                rel_v2 = path.lstrip("/")
            elif "cpu" in controllers.split(","):
                rel_v1 = path.lstrip("/")
    except (OSError, ValueError):
        pass
    quotas = []
    # The process's own cgroup and, inside a container, the namespace root (where the limit usually is).
    for folder in {root / rel_v2, root}:
        quotas.append(_cpu_max(folder / "cpu.max"))
    for v1 in ("cpu", "cpu,cpuacct"):
        for folder in {root / v1 / rel_v1, root / v1}:
            quotas.append(_cfs_quota(folder))
    found = [q for q in quotas if q is not None]
    return min(found) if found else None


def _cpu_max(path: Path) -> float | None:
    try:
        quota, period = path.read_text().split()[:2]
    except (OSError, ValueError):
        return None
    if quota == "max":
        return None
    try:
        return int(quota) / int(period) if int(period) > 0 and int(quota) > 0 else None
    except ValueError:
        return None


def _cfs_quota(folder: Path) -> float | None:
    try:
        quota = int((folder / "cpu.cfs_quota_us").read_text())
        period = int((folder / "cpu.cfs_period_us").read_text())
    except (OSError, ValueError):
        return None
    return quota / period if quota > 0 and period > 0 else None


def cpu_times(cpus: Sequence[int], stat: Path = Path("/proc/stat")) -> tuple[float, float] | None:
    """(busy, total) jiffies summed over ``cpus`` from ``/proc/stat``; None where it cannot be read."""
    try:
        lines = stat.read_text().splitlines()
    except OSError:
        return None
    wanted = {f"cpu{c}" for c in cpus}
    busy = total = 0.0
    for line in lines:
        fields = line.split()
        if not fields or fields[0] not in wanted:
            continue
        values = [float(v) for v in fields[1:]]
        # user nice system idle iowait irq softirq steal [guest guest_nice: already inside user/nice]
        t = sum(values[:8])
        idle = values[3] + (values[4] if len(values) > 4 else 0.0)
        busy += t - idle
        total += t
    return (busy, total) if total > 0 else None


def own_cpu_seconds() -> float:
    t = os.times()
    return t.user + t.system


class LoadMonitor:
    """Other processes' CPU use, in cores, between two calls of :meth:`sample` (our own time subtracted)."""

    def __init__(
        self,
        cpus: Sequence[int] | None = None,
        *,
        stat: Path = Path("/proc/stat"),
        clock: Callable[[], float] = time.monotonic,
        own_seconds: Callable[[], float] | None = None,
    ) -> None:
        self.cpus = list(cpus) if cpus is not None else allowed_cpus()
        self.stat, self.clock = stat, clock
        self.own_seconds = own_seconds or own_cpu_seconds
        self._last = self._read()

    def _read(self) -> tuple[tuple[float, float], float, float] | None:
        times = cpu_times(self.cpus, self.stat)
        return None if times is None else (times, self.own_seconds(), self.clock())

    def sample(self) -> float | None:
        now, last = self._read(), self._last
        self._last = now
        if now is None or last is None:
            return None
        (busy1, total1), own1, t1 = now
        (busy0, total0), own0, t0 = last
        if total1 <= total0 or t1 <= t0:
            return None
        busy_cores = (busy1 - busy0) / (total1 - total0) * len(self.cpus)
        own_cores = (own1 - own0) / (t1 - t0)
        return max(0.0, busy_cores - own_cores)


_availability: CpuAvailability | None = None
_policy: ThreadPolicy | None = None


def cpu_availability(*, measure_load: bool = True, window_s: float = LOAD_WINDOW_S) -> CpuAvailability:
    """This process's CPUs (cached for the process: later calls cost nothing)."""
    global _availability
    if _availability is not None and (_availability.others_busy is not None or not measure_load):
        return _availability
    cpus = allowed_cpus()
    quota = cgroup_quota()
    others = None
    if measure_load:
        monitor = LoadMonitor(cpus)
        time.sleep(window_s)
        others = monitor.sample()
        if others is not None and CpuAvailability(len(cpus), len(cpus), quota, others).busy:
            # Busy in the first window: look once more, so that a blip (a process exiting, a shell) does
            # not cost a quiet machine half its threads; the load must hold in both windows.
            time.sleep(window_s)
            again = monitor.sample()
            others = min(others, again) if again is not None else others
    _availability = CpuAvailability(
        cores=os.cpu_count() or len(cpus), allowed=len(cpus), quota=quota, others_busy=others
    )
    return _availability


def _omp_num_threads() -> int | None:
    raw = os.environ.get("OMP_NUM_THREADS", "").split(",")[0].strip()
    try:
        n = int(raw)
    except ValueError:
        return None
    return n if n >= 1 else None


def choose(
    threads: int | None = None, cpus: CpuAvailability | None = None, *, source: str = "--threads"
) -> ThreadPolicy:
    """The policy for ``threads`` (None: explicit ``OMP_NUM_THREADS``, else what is available); ``source``
    says where an explicit ``threads`` came from."""
    if threads is not None and threads < 1:
        from medclf.errors import ConfigError

        raise ConfigError(f"--threads must be at least 1, got {threads}")
    omp = _omp_num_threads()
    if threads is not None:
        cpus = cpus or cpu_availability(measure_load=False)
        n = threads
    elif omp is not None:
        source, cpus = "OMP_NUM_THREADS", cpus or cpu_availability(measure_load=False)
        n = omp
    else:
        source, cpus = "measured", cpus or cpu_availability()
        n = cpus.available
    passive = os.environ.get("OMP_WAIT_POLICY", "").lower() == "passive"
    workers = max(1, min(MAX_DECODE_WORKERS, cpus.available if source == "OMP_NUM_THREADS" else n))
    return ThreadPolicy(
        torch_threads=n, ort_threads=n, decode_workers=workers, source=source, cpus=cpus, passive_wait=passive
    )


def apply(threads: int | None = None, *, source: str = "--threads") -> ThreadPolicy:
    """Choose the policy (see :func:`choose`) and set PyTorch's intra-op threads to it; remembered for
    :func:`current`, ONNX Runtime sessions and decoding workers."""
    import torch

    global _policy
    policy = choose(threads, source=source)
    if torch.get_num_threads() != policy.torch_threads:
        torch.set_num_threads(policy.torch_threads)
    _policy = policy
    return policy


def set_torch_threads(n: int) -> None:
    """Change PyTorch's intra-op threads mid-run (the load changed) and keep :func:`current` in step."""
    import torch

    global _policy
    torch.set_num_threads(max(1, n))
    if _policy is not None:
        from dataclasses import replace

        _policy = replace(_policy, torch_threads=max(1, n), ort_threads=max(1, n))


def follow_load(monitor: LoadMonitor) -> str | None:
    """Under a policy applied in this process: give a core back when other processes took it since
    ``monitor``'s last sample, take it again when it is free; a line saying what changed (None: nothing)."""
    import torch

    policy = current()
    if policy is None:
        return None
    others = monitor.sample()
    if others is None:
        return None
    wanted = replace(policy.cpus, others_busy=others).available
    have = torch.get_num_threads()
    if wanted == have:
        return None
    set_torch_threads(wanted)
    return f"Threads: {have} -> {wanted} (other processes kept {others:.1f} core(s) busy in the last epoch)"


def current() -> ThreadPolicy | None:
    """The policy applied in this process, if any."""
    return _policy


def decode_workers() -> int:
    """Decoding processes: the applied policy's, else what the CPUs allow (affinity and quota)."""
    if _policy is not None:
        return _policy.decode_workers
    return max(1, min(MAX_DECODE_WORKERS, cpu_availability(measure_load=False).limit))


def ort_threads() -> int:
    """ONNX Runtime intra-op threads: the applied policy's, else the CPUs affinity and quota allow."""
    if _policy is not None:
        return _policy.ort_threads
    return cpu_availability(measure_load=False).limit


def configure_openmp_env(argv: Sequence[str]) -> CpuAvailability | None:
    """For a command that computes (see :data:`COMPUTE_COMMANDS`), before ``torch`` is imported: measure
    the CPUs and, when other processes keep some busy, set ``OMP_WAIT_POLICY=PASSIVE`` so that GNU OpenMP
    threads sleep at barriers instead of spinning on cores another process needs. Never overrides an
    ``OMP_WAIT_POLICY`` or ``GOMP_SPINCOUNT`` the user set; does nothing under an explicit
    ``OMP_NUM_THREADS`` (torchrun) or ``--threads``."""
    command = next((a for a in argv if not a.startswith("-")), None)
    if command not in COMPUTE_COMMANDS:
        return None
    if any(a == "--threads" or a.startswith("--threads=") for a in argv) or _omp_num_threads() is not None:
        return None
    cpus = cpu_availability()
    if cpus.busy and "OMP_WAIT_POLICY" not in os.environ and "GOMP_SPINCOUNT" not in os.environ:
        os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
    return cpus
