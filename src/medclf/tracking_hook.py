"""Where training meets experiment tracking, without depending on it.

The functions that train a model (one training run, a fine-tune) carry :func:`traced`; when a job is tracked
(:func:`medclf.tracking.track`, a higher layer) the active tracker is set in :data:`ACTIVE` and receives the
call, otherwise the function runs as it is. Training thus imports only this module, which imports nothing of
medclf: tracking (MLflow, plots, the bundle) stays above training.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from contextvars import ContextVar
from typing import Any, Protocol, TypeVar, cast

F = TypeVar("F", bound=Callable[..., Any])


class Tracer(Protocol):
    """What :func:`traced` needs of the active tracker."""

    @property
    def run(self) -> object | None: ...

    def _trained(
        self, kind: str, fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> Any: ...


ACTIVE: ContextVar[Tracer | None] = ContextVar("medclf_tracker", default=None)


def traced(kind: str) -> Callable[[F], F]:
    """Hook for the functions that train a model: under an active tracked job, ``"train"`` (one training run)
    logs each epoch to the job's run, or to a nested run for a model that is not the job's bundle (a member,
    a fold); ``"finetune"`` (distillation, fine-tuning after pruning) logs to a nested run. Without an active
    job the function is called as it is."""

    def decorate(fn: F) -> F:
        @functools.wraps(fn)
        def run(*args: Any, **kwargs: Any) -> Any:
            tracker = ACTIVE.get()
            if tracker is None or tracker.run is None:
                return fn(*args, **kwargs)
            return tracker._trained(kind, fn, args, kwargs)

        return cast(F, run)

    return decorate
