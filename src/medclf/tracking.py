"""Experiment tracking with MLflow: ``medclf train/evaluate/export --track`` (or :func:`track` in Python).

One job is one MLflow run. It holds the user's settings and the plan as parameters, the system (platform,
CPU model and vector flags, threads, device) as ``system.*`` parameters, one row of metrics per epoch
(``loss``, ``val_auc``, ... with the epoch as step), the final validation metrics, the data audit summary
(counts, unreadable files, validation copies of training images, shortcut check, sanity gate) and the
bundle, its model card and training curves as artefacts; the bundle is then registered as a new version
of an MLflow registered model. ``evaluate`` runs are tagged with the evaluated bundle's sha256 (and the
run that made it, when found) and hold the test metrics, ``report.html`` and the plots.

Every model trained under a job that is not the job's own bundle is a nested run (tag
``mlflow.parentRunId``): the members of a leftover-budget ensemble, ``--folds``/``--members`` runs, and
the distillation or fine-tuning run of ``medclf export``. They are found through two hooks,
:func:`traced` on :func:`medclf.training._train_one` and :func:`medclf.compress.finetune.finetune`,
which do nothing unless a job is being tracked.

The default store is embedded: ``sqlite:///runs/mlruns/mlflow.db`` under the current folder, artefacts in
``runs/mlruns/artifacts``; ``mlflow ui --backend-store-uri sqlite:///runs/mlruns/mlflow.db`` opens it
(that needs the full ``mlflow`` package; medclf depends on ``mlflow-skinny``). ``--tracking-uri`` (or
``$MLFLOW_TRACKING_URI``) names another store or a team server.

A training run's id is kept beside its checkpoint, in ``<out>.mlflow.json`` (members and folds: in
``<out>.folds/``) until the run finishes, so ``--resume`` continues the same MLflow run. MLflow is imported only when a job is
tracked. Once a run has started, a failing store never stops training: tracking stops with one warning.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import platform
import re
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any, TypeVar

from medclf import reporting
from medclf.errors import ConfigError
from medclf.tracking_hook import ACTIVE

__all__ = ["DEFAULT_EXPERIMENT", "LOCAL_STORE", "Tracker", "TrackingError", "local_store_uri", "track"]

LOCAL_STORE = Path("runs") / "mlruns"
DB_FILE = "mlflow.db"
RUN_FILE_SUFFIX = ".mlflow.json"
DEFAULT_EXPERIMENT = "medclf"
JOBS = ("train", "evaluate", "export")
# Older MLflow servers accept at most 500 characters per parameter value; the long texts go to artefacts.
PARAM_CHARS = 500
MAX_METRICS = 1000  # per job's final log: an evaluation with many subgroups stops there
# What log_batch accepts in one call (MLflow's REST limits).
_BATCH_PARAMS, _BATCH_METRICS, _BATCH_TAGS = 100, 1000, 100
# Vector instruction sets worth a parameter (the full flag list goes to system.json).
_VECTOR_FLAGS = re.compile(r"^(sse4_[12]|avx.*|fma|f16c|amx.*|vnni.*|asimd.*|sve.*|neon)$")
_KEY_BAD = re.compile(r"[^0-9A-Za-z_\-. /]")

F = TypeVar("F", bound=Callable[..., Any])


class TrackingError(ConfigError):
    """The MLflow store cannot be used as given (unknown scheme, unreachable server, deleted experiment)."""


def local_store_uri(root: str | Path | None = None) -> str:
    """The embedded default store: ``sqlite:///<root>/runs/mlruns/mlflow.db`` (root: the current folder)."""
    return "sqlite:///" + str((Path(root or Path.cwd()) / LOCAL_STORE / DB_FILE).resolve())


@contextlib.contextmanager
def track(
    job: str,
    out: str | Path,
    *,
    uri: str | None = None,
    experiment: str | None = None,
    registered_model: str | None = None,
    params: Mapping[str, Any] | None = None,
    resume: bool = False,
    bagging: bool = False,
    bundle: str | Path | None = None,
) -> Iterator[Tracker]:
    """Track one job as an MLflow run, from entering to leaving the ``with`` block::

        with track("train", "runs/model"):
            medclf.train("data/", "runs/model", epochs=20)
        with track("evaluate", "runs/eval", bundle="runs/model", params={"split": "test"}):
            medclf.evaluate("runs/model", "data/", "runs/eval")

    ``job``: ``train`` or ``export`` (``out`` is the bundle written, registered as a model version under
    ``registered_model``, default its folder's name) or ``evaluate`` (``out`` the evaluation folder,
    ``bundle`` the bundle evaluated). ``uri``: the tracking store (default ``$MLFLOW_TRACKING_URI``, else
    :func:`local_store_uri`); ``params``: the user's settings, logged as ``settings.*``; ``resume``: continue
    the run of an interrupted training of ``out`` (``bagging``: a ``--folds``/``--members`` one). Raises
    :class:`TrackingError` before anything runs when the store cannot be used. Leaving the block normally
    finishes the run (bundle, metrics, registration); an exception marks it failed, or killed for an
    interruption, and keeps its id for ``--resume``. What it says goes to the active reporter
    (:mod:`medclf.reporting`).
    """
    if job not in JOBS:
        raise ConfigError(f"unknown tracked job {job!r}; choose one of {', '.join(JOBS)}")
    tracker = Tracker(
        job,
        Path(out),
        uri=uri,
        experiment=experiment or DEFAULT_EXPERIMENT,
        registered_model=registered_model,
        bundle=Path(bundle) if bundle is not None else None,
        bagging=bagging,
    )
    # Under torchrun only rank 0 writes (as it alone writes the bundle).
    if int(os.environ.get("RANK", "0")) == 0:
        tracker._start(params or {}, resume=resume)
    token = ACTIVE.set(tracker)
    try:
        yield tracker
    except BaseException as exc:
        tracker._abort(exc)
        raise
    else:
        tracker.finish()
    finally:
        ACTIVE.reset(token)


class _Run:
    """One MLflow run, written through the client; params already logged are not logged again (MLflow
    refuses to change a parameter, and a resumed run logs its plan a second time)."""

    def __init__(self, tracker: Tracker, run_id: str, params: Mapping[str, str] | None = None) -> None:
        self.tracker, self.id = tracker, run_id
        self.params: dict[str, str] = dict(params or {})
        self.ended = False

    def log_params(self, values: Mapping[str, Any], prefix: str = "") -> None:
        from mlflow.entities import Param

        new = {}
        for key, value in _flatten(values, prefix).items():
            if value is None or key in self.params:
                continue
            text = value if isinstance(value, str) else json.dumps(value, default=str)
            new[key] = text if len(text) <= PARAM_CHARS else text[: PARAM_CHARS - 3] + "..."
        items = [Param(k, v) for k, v in sorted(new.items())]
        for i in range(0, len(items), _BATCH_PARAMS):
            self.tracker._call(self.tracker.client.log_batch, self.id, params=items[i : i + _BATCH_PARAMS])
        self.params.update(new)

    def log_metrics(self, values: Mapping[str, Any], step: int = 0, prefix: str = "") -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [Metric(k, v, now, step) for k, v in sorted(_numeric(values, prefix).items())]
        for i in range(0, len(items), _BATCH_METRICS):
            self.tracker._call(self.tracker.client.log_batch, self.id, metrics=items[i : i + _BATCH_METRICS])

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        from mlflow.entities import RunTag

        items = [RunTag(k, str(v)) for k, v in tags.items() if v is not None]
        for i in range(0, len(items), _BATCH_TAGS):
            self.tracker._call(self.tracker.client.log_batch, self.id, tags=items[i : i + _BATCH_TAGS])

    def log_dict(self, value: Any, artifact_file: str) -> None:
        self.tracker._call(self.tracker.client.log_dict, self.id, value, artifact_file)

    def log_artifacts(self, path: Path, artifact_path: str | None = None) -> None:
        if path.is_dir():
            self.tracker._call(self.tracker.client.log_artifacts, self.id, str(path), artifact_path)
        elif path.is_file():
            self.tracker._call(self.tracker.client.log_artifact, self.id, str(path), artifact_path)

    def end(self, status: str, error: str | None = None) -> None:
        if self.ended:
            return
        if error:
            self.set_tags({"medclf.error": error})
        self.tracker._call(self.tracker.client.set_terminated, self.id, status)
        self.ended = True


class Tracker:
    """A tracked job: the client, its run (``run``, None when not tracking: another torchrun rank) and the
    nested runs of the models trained under it. Made by :func:`track`."""

    def __init__(
        self,
        job: str,
        out: Path,
        *,
        uri: str | None,
        experiment: str,
        registered_model: str | None,
        bundle: Path | None,
        bagging: bool,
    ) -> None:
        self.job, self.out, self.bundle, self.bagging = job, out, bundle, bagging
        self.uri = uri or os.environ.get("MLFLOW_TRACKING_URI") or local_store_uri()
        self.experiment, self.registered_model = experiment, registered_model
        self.client: Any = None
        self.experiment_id: str | None = None
        self.run: _Run | None = None
        self.children: list[_Run] = []
        self.failed: str | None = None
        self.model_version: str | None = None
        self.resumed = False

    # --- starting: every failure here is the user's store, reported before any work is done ---

    def _start(self, params: Mapping[str, Any], *, resume: bool) -> None:
        try:
            from mlflow.tracking import MlflowClient
        except ImportError as exc:
            raise TrackingError(
                f"--track needs MLflow: pip install mlflow-skinny ({_one_line(exc)})"
            ) from None
        with _fail_fast(), _as_tracking_error(self.uri):
            _make_sqlite_folder(self.uri)
            self.client = MlflowClient(tracking_uri=self.uri, registry_uri=self.uri)
            self.experiment_id = self._experiment()
            self.run = self._reopen() if resume else None
            if self.run is None:
                name = f"{self.job} {(self.bundle or self.out).name}"
                tags = {
                    "medclf.job": self.job,
                    "medclf.out": str(self.out.resolve()),
                    "medclf.resumed": "true" if resume else None,
                    "mlflow.source.name": f"medclf {self.job}",
                    "mlflow.source.type": "LOCAL",
                }
                created = self.client.create_run(
                    self.experiment_id, run_name=name, tags={k: v for k, v in tags.items() if v}
                )
                self.run = _Run(self, created.info.run_id)
                self.run.log_params(params, "settings.")
                self.run.log_params(system_info(), "system.")
        self._remember(self.run.id, self._run_file())
        reporting.current().print(
            f"MLflow: {'continuing' if self.resumed else 'logging to'} run {self.run.id} "
            f"(experiment {self.experiment!r}, {self.uri})",
            highlight=False,
            markup=False,
        )

    def _experiment(self) -> str:
        found = self.client.get_experiment_by_name(self.experiment)
        if found is None:
            from mlflow.exceptions import MlflowException

            try:
                return str(
                    self.client.create_experiment(self.experiment, artifact_location=self._artifacts())
                )
            except MlflowException:  # made meanwhile by another job
                found = self.client.get_experiment_by_name(self.experiment)
                if found is None:
                    raise
        if found.lifecycle_stage != "active":
            raise TrackingError(
                f"MLflow experiment {self.experiment!r} is deleted in {self.uri}: restore it or choose another "
                "--experiment"
            )
        return str(found.experiment_id)

    def _artifacts(self) -> str | None:
        """Artefacts of a SQLite store live beside its database (a server or database decides its own)."""
        db = _sqlite_path(self.uri)
        return (db.parent / "artifacts").resolve().as_uri() if db is not None else None

    def _reopen(self) -> _Run | None:
        """The run an interrupted training of ``out`` logged to, set running again (None: start a new one)."""
        saved = _read_run_file(self._run_file())
        if saved is None or saved.get("tracking_uri") != self.uri:
            return None
        from mlflow.exceptions import MlflowException

        try:
            old = self.client.get_run(saved["run_id"])
        except MlflowException:
            return None
        if old.info.lifecycle_stage != "active":
            return None
        self.client.update_run(old.info.run_id, status="RUNNING")
        run = _Run(self, old.info.run_id, old.data.params)
        resumes = int(old.data.tags.get("medclf.resumes", "0")) + 1
        run.set_tags({"medclf.resumes": resumes})
        self.resumed = True
        return run

    def _run_file(self) -> Path | None:
        """Where a training job keeps its run id for ``--resume``: beside its checkpoint."""
        if self.job != "train":
            return None
        return _run_file_for(self.out)

    def _remember(self, run_id: str, path: Path | None) -> None:
        if path is None:
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps({"run_id": run_id, "tracking_uri": self.uri}))
        os.replace(tmp, path)

    # --- while the job runs: failures warn once and stop tracking, never the job ---

    def _call(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        if self.failed is not None:
            return None
        try:
            return fn(*args, **kwargs)
        except Exception as exc:
            self.failed = _one_line(exc)
            reporting.current().print(
                f"[bold yellow]warning:[/] MLflow tracking stopped ({self.failed}); the job goes on",
                highlight=False,
            )
            return None

    def _trained(
        self, kind: str, fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> Any:
        assert self.run is not None
        run_file: Path | None = None
        if kind == "train":
            out = Path(args[1] if len(args) > 1 else kwargs["out"])
            own = self.job == "train" and out.resolve() == self.out.resolve()
            run_file = None if own else _run_file_for(out)
            run = self.run if own else self._child(out.name, run_file, kwargs.get("resume"))
            config = kwargs.get("config")
            if config is not None:
                from dataclasses import asdict

                run.log_params(asdict(config), "config.")
        else:
            name = "distill" if kwargs.get("loss_hook") is not None else "finetune"
            run, own = self._child(name, None, False), False
            run.log_params({k: kwargs.get(k) for k in ("epochs", "lr", "seed", "time_budget")}, "finetune.")
        kwargs["epoch_callback"] = self._epoch_logger(run, kwargs.get("epoch_callback"))
        try:
            result = fn(*args, **kwargs)
        except BaseException as exc:
            if not own:
                run.end(_status(exc), _one_line(exc))
            raise
        run.log_metrics({"best_epoch": result.best_epoch, "train_seconds": result.seconds})
        if kind == "train":
            run.set_tags({"medclf.stop_reason": result.stop_reason})
            if not own:
                run.log_metrics(result.val_metrics or {}, prefix="val.")
        if not own:
            run.end("FINISHED")
            self._forget(run_file)
        return result

    def _child(self, name: str, run_file: Path | None, resume: Any) -> _Run:
        """A nested run (a member, a fold, a distillation), reopened when its training resumes."""
        assert self.run is not None
        saved = _read_run_file(run_file) if resume and run_file is not None else None
        run: _Run | None = None
        if saved is not None and saved.get("tracking_uri") == self.uri:
            old = self._call(self.client.get_run, saved["run_id"])
            if old is not None and old.info.lifecycle_stage == "active":
                self._call(self.client.update_run, old.info.run_id, status="RUNNING")
                run = _Run(self, old.info.run_id, old.data.params)
        if run is None:
            parent_name = f"{self.job} {(self.bundle or self.out).name}"
            created = self._call(
                self.client.create_run,
                self.experiment_id,
                run_name=f"{parent_name} / {name}",
                tags={"mlflow.parentRunId": self.run.id, "medclf.job": self.job, "medclf.member": name},
            )
            run = _Run(self, created.info.run_id if created is not None else "")
            if created is not None and run_file is not None:
                self._call(self._remember, run.id, run_file)
        self.children.append(run)
        return run

    def _epoch_logger(
        self, run: _Run, user: Callable[..., dict[str, Any] | None] | None
    ) -> Callable[..., dict[str, Any] | None]:
        """An ``epoch_callback`` that logs each epoch's row (and what ``user``'s callback adds to it) with
        the epoch as step, and the plan as parameters at the first epoch."""
        first = [True]

        def log_epoch(row: dict[str, Any], model: Any, plan: Any) -> dict[str, Any] | None:
            extra = user(row, model, plan) if user is not None else None
            if first[0]:
                first[0] = False
                plan_dict = plan.to_dict()
                run.log_params({k: v for k, v in plan_dict.items() if k != "reasons"}, "plan.")
                run.log_dict(plan_dict, "plan.json")  # with the planner's reasons
            values = {k: v for k, v in {**row, **(extra or {})}.items() if k != "epoch"}
            run.log_metrics(values, step=int(row["epoch"]))
            return extra

        return log_epoch

    # --- the end of the job ---

    def finish(self, exit_code: int = 0) -> None:
        """Log what the job made (bundle, metrics, evaluation outputs), register a bundle, end the run."""
        run = self.run
        if run is None or run.ended:
            return
        if exit_code:
            run.set_tags({"medclf.exit_code": exit_code})
        try:
            if self.job == "evaluate":
                self._finish_evaluation(run)
            elif (self.out / "bundle.json").exists():
                self._finish_bundle(run)
            elif self.out.is_dir():  # export --monai-bundle: a folder in MONAI's layout
                run.log_artifacts(self.out, "monai_bundle")
        except Exception as exc:  # the job's own outputs are written; only their record is incomplete
            self._call(_raise, exc)
        for child in self.children:
            child.end("FINISHED")
        run.end("FINISHED")
        self._forget()
        note = f"; registered model {self.registered_name()!r} version {self.model_version}"
        reporting.current().print(
            f"MLflow: run {run.id} finished{note if self.model_version else ''}"
            + (" (incompletely: see the warning above)" if self.failed else ""),
            highlight=False,
            markup=False,
        )

    def registered_name(self) -> str:
        return self.registered_model or self.out.name

    def _abort(self, exc: BaseException) -> None:
        if self.run is None or self.run.ended:
            return
        status, error = _status(exc), _one_line(exc)
        for child in self.children:
            child.end(status, error)
        self.run.end(status, error)
        # Keep the run id only where --resume has something to continue from.
        ckpt, folds = (self.out.with_name(self.out.name + s) for s in (".ckpt", ".folds"))
        if not ((ckpt / "state.json").exists() or (self.bagging and folds.is_dir())):
            self._forget()

    def _forget(self, path: Path | None = None) -> None:
        """Remove the run file of the job (or of a member: ``path``)."""
        path = path or self._run_file()
        if path is not None:
            with contextlib.suppress(OSError):
                path.unlink(missing_ok=True)

    def _finish_bundle(self, run: _Run) -> None:
        from medclf.bundle import load_bundle

        b = load_bundle(self.out)
        m = b.manifest
        recipe = dict(m.get("recipe", {}))
        run.set_tags(
            {
                "medclf.bundle_sha256": b.sha256,
                "medclf.arch": b.arch,
                "medclf.classes": ",".join(b.classes),
                "medclf.sanity_passed": (m.get("sanity") or {}).get("passed"),
            }
        )
        run.log_metrics(m.get("metrics", {}).get("val", {}), prefix="val.")
        cpu = recipe.pop("cpu", None) or {}
        run.log_params(
            {
                "device": recipe.get("device"),
                "world_size": recipe.get("world_size"),
                "torch_threads": cpu.get("torch_threads"),
                "threads_source": cpu.get("source"),
            },
            "system.",
        )
        # What the plan parameters (logged at the first epoch) do not already say.
        skip = {"reasons", "history", "schedule", "augmentation"}
        planned = {key.split(".")[1] for key in run.params if key.startswith("plan.")}
        run.log_params({k: v for k, v in recipe.items() if k not in skip | planned}, "recipe.")
        if "schedule" in recipe:
            run.log_params(recipe["schedule"], "recipe.schedule.")
        audit = {k: m.get(k) for k in ("data", "shortcuts", "sanity", "ood", "leftover") if m.get(k)}
        run.log_dict(audit, "audit_summary.json")
        data = m.get("data", {})
        run.log_metrics(
            {k: data.get(k) for k in ("n_unreadable", "n_val_train_copies", "counts")}, prefix="data."
        )
        if "compression" in m:
            self._log_compression(run, m["compression"])
        run.log_dict({"recipe": m.get("recipe"), "cpu": cpu, "system": system_info(full=True)}, "system.json")
        run.log_artifacts(b.path, "bundle")
        history = m.get("history") or []
        if history and all("epoch" in h for h in history):
            from medclf.evaluation.plots import plot_training_history

            with tempfile.TemporaryDirectory(prefix="medclf-track-") as tmp:
                run.log_artifacts(plot_training_history(history, Path(tmp) / "training_curves.png"), "plots")
        self._register(run, b.sha256, m)

    def _log_compression(self, run: _Run, record: Mapping[str, Any]) -> None:
        steps = record.get("steps", [])
        run.log_params({"steps": ",".join(s.get("step", "?") for s in steps)}, "compression.")
        run.set_tags({"medclf.source_sha256": (record.get("source") or {}).get("sha256")})
        run.log_metrics(
            {k: record.get(k) for k in ("val_before", "val_after", "params", "seconds")},
            prefix="compression.",
        )
        run.log_dict(dict(record), "compression.json")

    def _register(self, run: _Run, sha256: str, manifest: Mapping[str, Any]) -> None:
        """The bundle as a new version of the registered model (created when missing)."""
        if self.failed is not None:
            return
        from mlflow.exceptions import MlflowException

        name = self.registered_name()
        try:
            self.client.get_registered_model(name)
        except MlflowException:
            self._call(
                self.client.create_registered_model,
                name,
                description="medclf bundles: each version's artefact is a bundle folder (`medclf info` it)",
            )
        source = f"{self.client.get_run(run.id).info.artifact_uri.rstrip('/')}/bundle"
        tags = {
            "bundle_sha256": sha256,
            "medclf.job": self.job,
            "val_auc": manifest.get("metrics", {}).get("val", {}).get("auc"),
            "sanity_passed": (manifest.get("sanity") or {}).get("passed"),
        }
        version = self._call(
            self.client.create_model_version,
            name,
            source,
            run_id=run.id,
            tags={k: str(v) for k, v in tags.items() if v is not None},
            description=f"medclf bundle {sha256}",
        )
        if version is not None:
            self.model_version = str(version.version)
            run.set_tags({"medclf.registered_model": name, "medclf.model_version": self.model_version})

    def _finish_evaluation(self, run: _Run) -> None:
        metrics_file = self.out / "metrics.json"
        metrics = json.loads(metrics_file.read_text()) if metrics_file.exists() else {}
        split = str(metrics.get("split") or "test")
        run.log_metrics(metrics, prefix=f"{split}.")
        if self.bundle is not None:
            from medclf.bundle import load_bundle

            sha = load_bundle(self.bundle).sha256
            run.set_tags({"medclf.bundle_sha256": sha, "medclf.bundle": str(self.bundle)})
            made_by = self._call(
                self.client.search_runs,
                [self.experiment_id],
                filter_string=f"tags.`medclf.bundle_sha256` = '{sha}' AND tags.`medclf.job` != 'evaluate'",
                max_results=1,
            )
            if made_by:
                run.set_tags({"medclf.source_run_id": made_by[0].info.run_id})
        # The report and plots; not predictions.csv, whose file paths may name patients.
        for name in ("metrics.json", "report.html"):
            run.log_artifacts(self.out / name, "evaluation")
        for png in sorted(self.out.glob("*.png")):
            run.log_artifacts(png, "evaluation")


def system_info(full: bool = False) -> dict[str, Any]:
    """The machine a job ran on: platform, Python/torch/medclf versions, CPU model, CPUs, the CPU's vector
    instruction flags (``full``: every flag), the threads torch uses now and the GPU, if any."""
    import torch

    from medclf._version import __version__
    from medclf.engines import cpu_flags

    flags = sorted(cpu_flags() or ())
    info: dict[str, Any] = {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "medclf": __version__,
        "cpu_model": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "cpu_affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "cpu_flags": flags if full else ",".join(f for f in flags if _VECTOR_FLAGS.match(f)),
        "torch_threads_at_start": torch.get_num_threads(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none",
    }
    return info


def _cpu_model() -> str | None:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or None


def _flatten(values: Mapping[str, Any], prefix: str) -> dict[str, Any]:
    """Nested dicts as dotted keys MLflow accepts; other values as they are."""
    flat: dict[str, Any] = {}
    for key, value in values.items():
        name = prefix + _KEY_BAD.sub("_", str(key))
        if isinstance(value, Mapping) and value:
            flat.update(_flatten(value, name + "."))
        else:
            flat[name] = value
    return flat


def _numeric(values: Mapping[str, Any], prefix: str) -> dict[str, float]:
    """The numeric leaves of nested dicts (a ``[low, high]`` interval as ``_low``/``_high``), at most
    MAX_METRICS of them; booleans, strings and other lists are left out."""
    out: dict[str, float] = {}
    for key, value in _flatten(values, prefix).items():
        if len(out) >= MAX_METRICS:
            break
        if isinstance(value, bool) or value is None:
            continue
        if isinstance(value, (int, float)):
            out[key] = float(value)
        elif isinstance(value, (list, tuple)) and len(value) == 2 and all(_is_number(v) for v in value):
            out[key + "_low"], out[key + "_high"] = float(value[0]), float(value[1])
    return out


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and not math.isnan(float(v))


def _status(exc: BaseException) -> str:
    return "KILLED" if isinstance(exc, (KeyboardInterrupt, SystemExit)) else "FAILED"


def _one_line(exc: BaseException) -> str:
    text = getattr(exc, "message", None) or f"{type(exc).__name__}: {exc}"
    return " ".join(str(text).split())[:300] or type(exc).__name__


def _raise(exc: BaseException) -> None:
    raise exc


def _run_file_for(out: Path) -> Path:
    return out.with_name(out.name + RUN_FILE_SUFFIX)


def _read_run_file(path: Path | None) -> dict[str, Any] | None:
    if path is None or not path.exists():
        return None
    try:
        saved = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return saved if isinstance(saved, dict) and isinstance(saved.get("run_id"), str) else None


def _sqlite_path(uri: str) -> Path | None:
    if not uri.startswith("sqlite:///"):
        return None
    path = uri[len("sqlite:///") :]
    return None if path in ("", ":memory:") else Path(path)


def _make_sqlite_folder(uri: str) -> None:
    db = _sqlite_path(uri)
    if db is not None:
        db.parent.mkdir(parents=True, exist_ok=True)


@contextlib.contextmanager
def _fail_fast() -> Iterator[None]:
    """While starting, an unreachable server fails in seconds instead of MLflow's minutes of retries
    (unless the user set MLflow's own variables)."""
    changed = {}
    for name, value in (("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0"), ("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")):
        if name not in os.environ:
            changed[name] = value
            os.environ[name] = value
    try:
        yield
    finally:
        for name in changed:
            os.environ.pop(name, None)


@contextlib.contextmanager
def _as_tracking_error(uri: str) -> Iterator[None]:
    try:
        yield
    except TrackingError:
        raise
    except Exception as exc:
        raise TrackingError(
            f"--tracking-uri {uri}: cannot use this MLflow store ({_one_line(exc)})"
        ) from None
