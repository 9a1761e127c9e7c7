"""One exception family for everything a user can act on.

Each error maps to CLI exit code 2 and an HTTP 4xx status with the same message, so bad input never
surfaces as a traceback. Internal bugs stay ordinary exceptions.
"""

from __future__ import annotations

import math


class MedclfError(Exception):
    """Base class: an error whose message tells the user what to do."""

    exit_code: int = 2
    http_status: int = 400

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return self.message


class InputRejected(MedclfError):
    """An input file was refused (unsupported, malformed, hostile or too large).

    ``reason`` is a short machine-readable code (for example ``"unsupported_format"``, ``"truncated"``,
    ``"too_large"``); the message is the human explanation.
    """

    http_status = 422
    _status_by_reason: dict[str, int] = {  # noqa: RUF012 - class-level constant table
        "unsupported_format": 415,
        "too_large": 413,
        "file_too_large": 413,
        "decompression_bomb": 413,
    }

    def __init__(self, message: str, reason: str = "invalid", path: str | None = None) -> None:
        full = f"{path}: {message}" if path else message
        super().__init__(full)
        self.reason = reason
        self.path = path
        self.http_status = self._status_by_reason.get(reason, 422)


class DataError(MedclfError):
    """A dataset (folder, CSV manifest, .npz) cannot be used as given."""


class ConfigError(MedclfError):
    """Invalid options, configuration file or command-line values."""


class BundleError(MedclfError):
    """A model bundle is missing, incomplete, tampered with or incompatible."""


def check_number(
    option: str,
    value: float | None,
    *,
    above: float | None = None,
    at_least: float | None = None,
    below: float | None = None,
) -> None:
    """Refuse (:class:`ConfigError`, one line) an option's number that is not finite or out of its range
    (``None``: not given, nothing to check); an optimiser would otherwise fail deep in a run, or silently
    train on ``nan``."""
    if value is None:
        return
    try:
        v = float(value)
    except (TypeError, ValueError):
        v = math.nan
    ok = math.isfinite(v)
    ok = ok and (above is None or v > above) and (at_least is None or v >= at_least)
    ok = ok and (below is None or v < below)
    if not ok:
        bounds = [
            f"> {above:g}" if above is not None else "",
            f">= {at_least:g}" if at_least is not None else "",
            f"< {below:g}" if below is not None else "",
        ]
        raise ConfigError(
            f"{option} must be a finite number {' and '.join(b for b in bounds if b)}, not {value!r}"
        )
