"""One owner for time-budget arithmetic: when the budget started, what is left, what is set aside.

Every step of ``medclf train`` (fingerprinting, planning, decoding, the epochs, the out-of-distribution fit,
writing the bundle, extra members, fusion) draws on the same :class:`Budget`, so no part of the run can
spend time the others were counting on. The clock is injectable: tests drive a budget with a fake clock
instead of sleeping or asserting wall times.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable

from medclf.errors import ConfigError

__all__ = ["Budget", "parse_duration"]

Clock = Callable[[], float]


def parse_duration(text: str | float | int) -> float:
    """'90s', '10m', '2h', '1h30m', or a number of seconds -> seconds."""
    if isinstance(text, (int, float)):
        if text <= 0:
            raise ConfigError("a time budget must be positive")
        return float(text)
    s = str(text).strip().lower()
    if re.fullmatch(r"\d+(\.\d+)?", s):
        return parse_duration(float(s))
    parts = re.findall(r"(\d+(?:\.\d+)?)\s*(h|m|min|s|sec)", s)
    if not parts or "".join(a + b for a, b in parts) != s.replace(" ", ""):
        raise ConfigError(f"cannot read the duration {text!r}: use e.g. 90s, 10m, 2h or 1h30m")
    unit = {"h": 3600, "m": 60, "min": 60, "s": 1, "sec": 1}
    return parse_duration(sum(float(a) * unit[b] for a, b in parts))


class Budget:
    """``seconds`` of wall time from ``start`` (default: now) on ``clock`` (default: ``time.perf_counter``).

    ``reserved`` seconds are set aside for work that must follow (the OOD fit, writing the bundle, fusing
    members): :meth:`available` is what the current step may spend, :meth:`left` what remains in all.
    """

    def __init__(
        self, seconds: float | str, *, clock: Clock | None = None, start: float | None = None
    ) -> None:
        self.total = parse_duration(seconds)
        self.clock: Clock = clock or time.perf_counter
        self.start = self.clock() if start is None else float(start)
        self.reserved = 0.0

    def elapsed(self) -> float:
        return self.clock() - self.start

    def left(self) -> float:
        """Seconds until the budget ends (negative once it is overspent)."""
        return self.total - self.elapsed()

    @property
    def deadline(self) -> float:
        """The clock reading at which the budget ends."""
        return self.start + self.total

    def reserve(self, seconds: float) -> None:
        """Set ``seconds`` aside for work after the current step (replaces any earlier reservation)."""
        self.reserved = max(0.0, float(seconds))

    def available(self) -> float:
        """Seconds the current step may spend: what is left minus what is reserved."""
        return self.left() - self.reserved

    def work_deadline(self) -> float:
        """The clock reading by which the current step must end to leave the reservation intact."""
        return self.deadline - self.reserved

    def fraction(self, share: float, *, at_least: float = 0.0, at_most: float | None = None) -> float:
        """``share`` of the whole budget in seconds, clamped to ``[at_least, at_most]``."""
        s = max(at_least, share * self.total)
        return s if at_most is None else min(s, at_most)

    def share(self, parts: int) -> float:
        """An equal share of what is available for each of ``parts`` steps still to run."""
        return self.available() / max(1, parts)

    def child(self, seconds: float) -> Budget:
        """A budget of ``seconds`` (at most what is available) starting now, on the same clock."""
        return Budget(max(min(seconds, self.available()), 1e-3), clock=self.clock)

    def __repr__(self) -> str:
        return f"Budget(total={self.total:.1f}s, left={self.left():.1f}s, reserved={self.reserved:.1f}s)"
