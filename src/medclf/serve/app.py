"""The HTTP API and the web page: ``medclf serve BUNDLE``.

=====================  ==================================================================================
``POST /v1/predict``   one image (multipart field ``file``, or the raw bytes as the body) -> class,
                       probabilities, model id and sha256, input sha256, latency; ``?explain=true`` adds
                       a heatmap (base64 PNGs)
``GET /v1/model``      classes, input spec, preprocessing, metrics, model card
``GET /healthz``       liveness; ``GET /readyz``: ready to take work (503 while the queue is full or the
                       audit log cannot be written)
``GET /docs``          OpenAPI documentation (``/openapi.json`` is the specification); without a key file
                       only: with one, ``/docs`` is off and ``/openapi.json`` needs a key
``GET /``              the web page (``serve/static``)
=====================  ==================================================================================

An upload is streamed to a temporary file with a size cap (413 beyond it) and its sha256 is computed on
the way; then the same guarded reader (:func:`medclf.io.read_image`) and the bundle's own preprocessing
(:meth:`medclf.predictor.Predictor.predict`) run as everywhere else, so the server sees inputs exactly as
training did. Every :class:`~medclf.errors.MedclfError` becomes its HTTP status with
``{"error": message, "reason": code}``; bad input never produces a 500.

Back-pressure: at most ``queue`` predict requests are admitted at once (being uploaded, waiting or
running); more get 429 at once. Inference runs in a pool of ``threads`` threads, and a request's slot is
freed only when its work has really finished, so timeouts cannot pile up hidden work. Every API request
(``/v1/...``) leaves one row in the audit log (:mod:`medclf.serve.auditlog`), committed before the answer
is sent (503 when it cannot be): see :mod:`medclf.serve.gate`, which also checks API keys. Below HTTP,
:mod:`medclf.serve.http_guard` bounds connections: request-head deadlines and sizes, per-client caps.
"""

from __future__ import annotations

import asyncio
import base64
import functools
import hashlib
import json
import logging
import os
import shutil
import tempfile
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import AbstractAsyncContextManager, asynccontextmanager, suppress
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import Message

from medclf._version import __version__
from medclf.bundle import Bundle
from medclf.engines import resolve_engine, tune_allocator
from medclf.errors import ConfigError, InputRejected, MedclfError
from medclf.explain import Explainer
from medclf.io import ReadLimits, read_image
from medclf.predictor import Predictor, as_predictor, prediction_fields
from medclf.preprocess import preprocess
from medclf.serve.auditlog import AuditLog, AuditRecord
from medclf.serve.auth import KeyStore
from medclf.serve.gate import AUDIT_STATE, RequestGate
from medclf.serve.http_guard import ConnectionLimits

log = logging.getLogger("medclf.serve")

STATIC = Path(__file__).parent / "static"
DISCLAIMER = "Research tool: not a medical device and not a diagnosis."
_MULTIPART_SLACK = 64 * 1024  # headers and boundaries around the file in a multipart body
_CHUNK = 1 << 20
_PAGE_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'self'; img-src 'self' data: blob:; style-src 'self'; script-src 'self'; "
        "connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
}


@dataclass(frozen=True)
class ServeSettings:
    """Limits and options of one server process (``medclf serve --help`` names them the same)."""

    max_upload_mb: float = 64.0
    request_timeout_s: float = 60.0
    queue: int = 64  # predict requests admitted at once; more get 429
    threads: int = 2  # inference threads
    torch_threads: int | None = None  # intra-op threads of each; None: usable CPUs // threads (at least 1)
    api_key_file: str | None = None
    audit_db: str | None = "medclf-audit.db"
    explain_method: str = "auto"
    engine: str = "auto"  # see medclf.engines: auto runs the bundle's ONNX (int8 first) model when it has one
    tta: bool = False  # test-time augmentation (the bundle's default views)
    audit_busy_timeout_s: float = 5.0  # a row waits this long for a locked database, then 503
    trusted_keys: str | None = None  # folder of public keys: serve only a bundle one of them signed
    bundle_sha256: str | None = None  # serve only the bundle with this sha256

    def __post_init__(self) -> None:
        if self.max_upload_mb <= 0:
            raise ConfigError("--max-upload-mb must be positive")
        if self.request_timeout_s <= 0:
            raise ConfigError("--timeout must be positive")
        if self.queue < 0:
            raise ConfigError("--queue must be 0 or more")
        if self.threads < 1:
            raise ConfigError("--threads must be at least 1")

    @property
    def max_upload_bytes(self) -> int:
        return int(self.max_upload_mb * (1 << 20))


class ServeError(MedclfError):
    """A refusal that belongs to serving itself (authentication, back-pressure, timeouts)."""

    def __init__(self, message: str, *, status: int, reason: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.http_status = status
        self.reason = reason
        self.headers = headers or {}


class _UploadTooLarge(Exception):
    pass


@dataclass
class _Upload:
    path: Path
    sha256: str
    size: int


class _Admission:
    """Counts admitted predict requests; ``try_enter`` refuses when ``limit`` are in."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.in_flight = 0
        self._lock = threading.Lock()

    def try_enter(self) -> bool:
        with self._lock:
            if self.in_flight >= self.limit:
                return False
            self.in_flight += 1
            return True

    def leave(self) -> None:
        with self._lock:
            self.in_flight -= 1

    @property
    def full(self) -> bool:
        return self.in_flight >= self.limit


class Service:
    """Everything one app instance holds: the bundle, the explainer, the pool, the keys, the audit log."""

    def __init__(self, bundle: Predictor, settings: ServeSettings) -> None:
        self.bundle = bundle
        self.settings = settings
        self.keys = KeyStore(settings.api_key_file) if settings.api_key_file else None
        self.audit = (
            AuditLog(settings.audit_db, busy_timeout_s=settings.audit_busy_timeout_s)
            if settings.audit_db
            else None
        )
        self.explainer = Explainer(bundle, settings.explain_method)
        self.admission = _Admission(settings.queue)
        self.pool = ThreadPoolExecutor(max_workers=settings.threads, thread_name_prefix="medclf-infer")
        self.tmp = Path(tempfile.mkdtemp(prefix="medclf-serve-"))
        self.limits = ReadLimits(max_file_bytes=max(settings.max_upload_bytes, 1))
        self.model_id = str(bundle.manifest.get("name") or (bundle.source or bundle.path).name)
        # Resolved now, so a bundle without the ONNX file asked for is refused at start-up, not per request.
        self.engine = resolve_engine(bundle.manifest.get("files", {}), settings.engine)
        self.ready = False

    # -- lifecycle
    def warm_up(self) -> None:
        """One prediction on a blank input, so the first real request is not the slow one."""
        import numpy as np

        self.bundle.predict_tensors(
            np.zeros((1, *self.bundle.spec.input_shape), dtype=np.float32), engine=self.engine
        )
        self.ready = True

    def close(self) -> None:
        self.ready = False
        self.pool.shutdown(wait=False, cancel_futures=True)
        if self.audit:
            self.audit.close()
        shutil.rmtree(self.tmp, ignore_errors=True)

    # -- pieces of a request
    def model_summary(self) -> dict[str, Any]:
        return {
            "id": self.model_id,
            "sha256": self.bundle.sha256,
            "arch": self.bundle.arch,
            "engine": self.engine,
            "tta": self.settings.tta,
        }

    def model_document(self) -> dict[str, Any]:
        b, m = self.bundle, self.bundle.manifest
        return {
            **self.model_summary(),
            "classes": b.classes,
            "input": m.get("input") or {"shape": list(b.spec.input_shape), "dtype": "float32"},
            "preprocess": b.spec.to_dict(),
            "metrics": m.get("metrics", {}),
            "model_card": _model_card(b),
            "created": m.get("created"),
            "versions": m.get("versions", {}),
            "signatures": {
                "summary": b.signature_summary(),
                "trust_checked": b.trust_checked,
                "entries": [s.to_dict() for s in b.signatures],
            },
            "explanation": {"method": self.explainer.method, "layer": self.explainer.layer},
            "limits": {
                "max_upload_bytes": self.settings.max_upload_bytes,
                "request_timeout_s": self.settings.request_timeout_s,
                "queue": self.settings.queue,
            },
            "disclaimer": DISCLAIMER,
            "server": {"medclf": __version__},
        }

    async def receive_upload(self, request: Request) -> _Upload:
        """Stream the uploaded file to a temporary file, hashing it; 413 beyond the size cap."""
        limit = self.settings.max_upload_bytes
        declared = request.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > limit + _MULTIPART_SLACK:
            raise _too_large(limit)
        fd, name = tempfile.mkstemp(dir=self.tmp, suffix=".upload")
        path = Path(name)
        digest = hashlib.sha256()
        size = 0
        try:
            with os.fdopen(fd, "wb") as fh:
                async for chunk in self._file_chunks(request, limit):
                    size += len(chunk)
                    if size > limit:
                        raise _too_large(limit)
                    digest.update(chunk)
                    fh.write(chunk)
        except BaseException:
            path.unlink(missing_ok=True)
            raise
        return _Upload(path=path, sha256=digest.hexdigest(), size=size)

    async def _file_chunks(self, request: Request, limit: int) -> AsyncIterator[bytes]:
        ctype = request.headers.get("content-type", "").lower()
        if not ctype.startswith("multipart/form-data"):
            async for chunk in request.stream():
                if chunk:
                    yield chunk
            return
        # Cap the bytes the multipart parser may pull, so it never spools more than the limit to disk.
        received = 0
        receive = request.receive

        async def capped_receive() -> Message:
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > limit + _MULTIPART_SLACK:
                raise _UploadTooLarge
            return message

        capped = Request(request.scope, capped_receive)
        try:
            form = await capped.form(max_files=1, max_fields=4)
        except _UploadTooLarge:
            raise _too_large(limit) from None
        try:
            upload = form.get("file")
            if not isinstance(upload, UploadFile):
                raise ServeError(
                    "no file: send the image as the multipart form field 'file' (or as the raw request body)",
                    status=422,
                    reason="no_file",
                )
            while chunk := await upload.read(_CHUNK):
                yield chunk
        finally:
            await form.close()

    def infer(self, upload: _Upload, explain: bool) -> dict[str, Any]:
        """Read, preprocess, classify (and explain) one upload. Runs in the pool; deletes the upload."""
        try:
            try:
                image = read_image(upload.path, limits=self.limits)
            except InputRejected as exc:
                raise _without_path(exc, upload.path) from None
            [result] = self.bundle.predict([image], engine=self.engine, tta=self.settings.tta)
            if "error" in result:
                raise InputRejected(result["error"], reason=result.get("reason", "invalid"))
            # The prediction as `predict` gives it (with any out-of-distribution flag), minus the temp path.
            out = prediction_fields(result)
            out.update(
                {
                    "input": {
                        "sha256": upload.sha256,
                        "bytes": upload.size,
                        "format": image.format,
                        "shape": list(image.pixels.shape),
                    },
                }
            )
            if explain:
                # Multi-label: the most probable finding (Grad-CAM per finding is not done yet).
                probs = result["probabilities"]
                target = max(probs, key=probs.get) if "findings" in result else result["predicted"]
                e = self.explainer.explain_tensor(preprocess(image, self.bundle.spec), target=target)
                out["explanation"] = {
                    "method": e.method,
                    "layer": e.layer,
                    "explained_class": e.explained_class,
                    "overlay_png": base64.b64encode(e.overlay_png()).decode("ascii"),
                    "heatmap_png": base64.b64encode(e.heatmap_png()).decode("ascii"),
                    "image_png": base64.b64encode(e.image_png()).decode("ascii"),
                }
            return out
        finally:
            upload.path.unlink(missing_ok=True)

    def _finished(self, upload: _Upload) -> None:
        # Also when the work was cancelled before it started (a timeout): then infer() never deleted it.
        upload.path.unlink(missing_ok=True)
        self.admission.leave()

    async def predict(self, request: Request, explain: bool, rec: AuditRecord) -> dict[str, Any]:
        rec.explained = explain
        if not self.admission.try_enter():
            raise ServeError(
                f"the server is busy ({self.settings.queue} requests in progress); retry in a moment",
                status=429,
                reason="queue_full",
                headers={"Retry-After": "1"},
            )
        handed_over = False
        try:
            stage = "upload"

            async def work() -> dict[str, Any]:
                nonlocal stage, handed_over
                upload = await self.receive_upload(request)
                rec.input_sha256, rec.input_bytes = upload.sha256, upload.size
                stage = "inference"
                future: Future[dict[str, Any]] = self.pool.submit(self.infer, upload, explain)
                handed_over = True
                future.add_done_callback(lambda _: self._finished(upload))
                return await asyncio.wrap_future(future)

            try:
                return await asyncio.wait_for(work(), timeout=self.settings.request_timeout_s)
            except TimeoutError:
                limit = self.settings.request_timeout_s
                if stage == "upload":
                    raise ServeError(
                        f"the upload did not complete within {limit:g} s", status=408, reason="upload_timeout"
                    ) from None
                raise ServeError(
                    f"the prediction did not finish within {limit:g} s", status=504, reason="timeout"
                ) from None
        finally:
            if not handed_over:
                self.admission.leave()


class _PageFiles(StaticFiles):
    """The page's own files, with the same security headers as the page."""

    def file_response(self, *args: Any, **kwargs: Any) -> Response:
        response = super().file_response(*args, **kwargs)
        response.headers.update(_PAGE_HEADERS)
        return response


def _too_large(limit: int) -> InputRejected:
    return InputRejected(
        f"the upload is larger than the limit of {limit / (1 << 20):g} MiB", reason="file_too_large"
    )


def _without_path(exc: InputRejected, path: Path) -> InputRejected:
    """The same refusal, naming 'the uploaded file' instead of the server's temporary path."""
    message = exc.message.replace(f"{path}: ", "").replace(str(path), "the uploaded file")
    return InputRejected(message, reason=exc.reason)


def _model_card(bundle: Predictor) -> dict[str, Any]:
    """MODEL_CARD.md when the bundle has one; else the facts the manifest holds."""
    card: dict[str, Any] = {}
    if "MODEL_CARD.md" in bundle.manifest.get("files", {}):
        with suppress(OSError, MedclfError, UnicodeDecodeError):  # re-read plain and re-hashed, never a link
            card["markdown"] = bundle.read_file("MODEL_CARD.md").decode("utf-8")
    m = bundle.manifest
    data = m.get("data", {})
    recipe = m.get("recipe", {})
    facts = {
        "architecture": bundle.arch,
        "classes": ", ".join(bundle.classes),
        "input": " x ".join(str(s) for s in bundle.spec.input_shape),
        "training data": data.get("source"),
        "epochs run (best)": f"{recipe.get('epochs_run')} ({recipe.get('best_epoch')})" if recipe else None,
        "created": m.get("created"),
        "bundle sha256": bundle.sha256,
        "signed by": bundle.signature_summary(),
    }
    card["facts"] = {k: v for k, v in facts.items() if v not in (None, "")}
    card["intended_use"] = (
        "Research and education. Not validated for clinical use; a prediction is not a diagnosis and must "
        "not guide the care of a patient."
    )
    return card


def _audit_record(request: Request) -> AuditRecord:
    """The row :class:`~medclf.serve.gate.RequestGate` writes for this request (a throwaway one without
    an audit log)."""
    rec = request.scope.get("state", {}).get(AUDIT_STATE)
    return rec if isinstance(rec, AuditRecord) else AuditRecord(request_id=uuid.uuid4().hex, endpoint="")


def _error_response(exc: MedclfError) -> JSONResponse:
    status = int(getattr(exc, "http_status", 400))
    reason = getattr(exc, "reason", None) or type(exc).__name__.removesuffix("Error").lower() or "invalid"
    headers = getattr(exc, "headers", None) or {}
    return JSONResponse({"error": exc.message, "reason": reason}, status_code=status, headers=headers)


_UPLOAD_SCHEMA = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "properties": {"file": {"type": "string", "format": "binary"}},
                    "required": ["file"],
                }
            },
            "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
        },
    }
}


def create_app(
    bundle: str | Path | Bundle | Predictor, settings: ServeSettings | None = None, **overrides: Any
) -> FastAPI:
    """The FastAPI app serving ``bundle``; ``overrides`` replace fields of ``settings``.

    The bundle is loaded (and verified) here, so a bad bundle fails before the server listens.
    """
    settings = replace(settings or ServeSettings(), **overrides)
    b = _load(bundle, settings) if isinstance(bundle, (str, Path)) else as_predictor(bundle)
    service = Service(b, settings)
    # The specification is the same for every model (no architecture, no class names: /v1/model tells those,
    # behind the key), and with keys it needs one too. No redirects: Starlette builds their absolute URL from
    # the Host header, which the client chooses; /v1/predict/ is a 404.
    app = FastAPI(
        title="medclf",
        version="v1",
        summary=f"Medical image classification. {DISCLAIMER}",
        lifespan=_lifespan(service),
        docs_url=None if service.keys else "/docs",
        redoc_url=None,
        redirect_slashes=False,
    )
    app.state.service = service
    # The gate reads the route list at the first request, so it sees the routes added below.
    app.add_middleware(
        RequestGate, keys=service.keys, audit=service.audit, model_sha256=b.sha256, routes=app.router.routes
    )
    _add_error_handlers(app)
    _add_predict_route(app, service)
    _add_status_routes(app, service)
    _add_page(app)
    return app


def _lifespan(service: Service) -> Callable[[FastAPI], AbstractAsyncContextManager[None]]:
    """Warm the model up before the first request; release the service at shutdown."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await asyncio.get_running_loop().run_in_executor(service.pool, service.warm_up)
        yield
        service.close()

    return lifespan


def _add_error_handlers(app: FastAPI) -> None:
    """Every refusal as ``{"error": message, "reason": code}`` with its status; never a traceback."""

    @app.exception_handler(MedclfError)
    async def _medclf_error(request: Request, exc: MedclfError) -> JSONResponse:
        return _error_response(exc)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        reason = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "bad_request")
        return JSONResponse(
            {"error": str(exc.detail), "reason": reason}, status_code=exc.status_code, headers=exc.headers
        )

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e.get('loc', ()))}: {e.get('msg')}" for e in exc.errors()
        )
        return JSONResponse(
            {"error": f"invalid request: {problems}", "reason": "invalid_request"}, status_code=422
        )

    @app.exception_handler(Exception)
    async def _internal_error(request: Request, exc: Exception) -> JSONResponse:
        log.exception("internal error")
        return JSONResponse({"error": "internal server error", "reason": "internal"}, status_code=500)


def _add_predict_route(app: FastAPI, service: Service) -> None:
    @app.post(
        "/v1/predict",
        summary="Classify one image (DICOM, NIfTI, PNG, JPEG, TIFF)",
        openapi_extra=_UPLOAD_SCHEMA,
        responses={
            200: {
                "description": "the prediction; a FHIR R4 DiagnosticReport with Accept: application/fhir+json",
                "content": {"application/fhir+json": {}},
            },
            401: {"description": "missing or invalid API key"},
            413: {"description": "upload larger than the limit"},
            415: {"description": "not a supported image format"},
            422: {"description": "an image that cannot be used (reason says why)"},
            429: {"description": "too many requests in progress"},
        },
    )
    async def predict(request: Request, explain: bool = False) -> Response:
        """Send the image as multipart field `file` (or as the raw body). `explain=true` adds a heatmap:
        `overlay_png` (input + heatmap + caption), `heatmap_png` (RGBA) and `image_png` (the preprocessed
        input), base64-encoded. With `Accept: application/fhir+json` the answer is a FHIR R4
        `DiagnosticReport` (contained `Observation`s and the model as a `Device`; the overlay as its
        `presentedForm`)."""
        t0 = time.perf_counter()
        rec = _audit_record(request)
        out = await service.predict(request, explain, rec)
        rec.predicted, rec.confidence = out["predicted"], out["confidence"]
        from medclf.serve import fhir

        if fhir.wants_fhir(request.headers.get("accept")):
            text = fhir.http_report(out, service.bundle, rec.request_id)
            return Response(text.encode("utf-8"), media_type=fhir.MEDIA_TYPE)
        body = {
            "request_id": rec.request_id,
            **out,
            "model": service.model_summary(),
            "latency_ms": round((time.perf_counter() - t0) * 1000, 2),
            "disclaimer": DISCLAIMER,
        }
        return JSONResponse(body)


def _add_status_routes(app: FastAPI, service: Service) -> None:
    """The model document, liveness and readiness."""

    @app.get("/v1/model", summary="Classes, input spec, preprocessing, metrics and model card")
    async def model(request: Request) -> dict[str, Any]:
        return service.model_document()

    @app.get("/healthz", summary="Liveness")
    async def healthz() -> dict[str, Any]:
        return {"status": "ok"}

    @app.get("/readyz", summary="Readiness: the model is loaded and the queue has room")
    async def readyz() -> JSONResponse:
        adm = service.admission
        audit_ok = not (service.audit and service.audit.failing)
        ready = service.ready and not adm.full and audit_ok
        body = {"ready": ready, "in_flight": adm.in_flight, "queue": adm.limit, "audit_log": audit_ok}
        return JSONResponse(body, status_code=200 if ready else 503)


def _add_page(app: FastAPI) -> None:
    """The web page and its files, with the page's security headers."""

    @app.get("/", include_in_schema=False)
    async def index() -> FileResponse:
        return FileResponse(STATIC / "index.html", headers=_PAGE_HEADERS)

    app.mount("/static", _PageFiles(directory=STATIC), name="static")


# ----------------------------------------------------------------------------------------------- running
_ENV = "MEDCLF_SERVE_CONFIG"


def app_from_environment() -> FastAPI:
    """App factory for uvicorn worker processes (``--workers`` > 1): settings come from the environment."""
    config = json.loads(os.environ[_ENV])
    bundle, workers = config.pop("bundle"), config.pop("workers")
    settings = ServeSettings(**config)
    tune_allocator()
    _set_torch_threads(settings, workers)
    return create_app(bundle, settings)


def _raise_file_limit(wanted: int) -> None:
    """Lift the soft limit on open files towards ``wanted`` (never above the hard limit): each connection
    holds one, and the default soft limit is often 1024."""
    try:
        import resource
    except ImportError:  # not POSIX
        return
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if soft != resource.RLIM_INFINITY and soft < target:
        with suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))


def _load(bundle: str | Path, settings: ServeSettings) -> Predictor:
    return Predictor.load(bundle, trusted_keys=settings.trusted_keys, expected_sha256=settings.bundle_sha256)


def _set_torch_threads(settings: ServeSettings, workers: int) -> None:
    """Give each inference thread its share of the CPUs. Requests run in parallel across threads; torch's
    default (every core for each of them) oversubscribes the machine: measured on 2 cores under load, one
    intra-op thread ran a 32 px forward pass 6x faster than two."""
    import torch

    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cpus = os.cpu_count() or 1
    torch.set_num_threads(settings.torch_threads or max(1, cpus // (settings.threads * workers)))


def run(
    bundle: str | Path,
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    workers: int = 1,
    settings: ServeSettings | None = None,
    log_level: str = "info",
    limits: ConnectionLimits | None = None,
) -> None:
    """Serve ``bundle`` with uvicorn until interrupted. Refuses a non-loopback host without API keys."""
    import uvicorn

    from medclf.serve.auth import check_exposure
    from medclf.serve.http_guard import GuardedHttpToolsProtocol, uvicorn_log_config

    settings = settings or ServeSettings()
    limits = limits or ConnectionLimits()
    check_exposure(host, settings.api_key_file)
    if workers < 1:
        raise ConfigError("--workers must be at least 1")
    tune_allocator()
    _set_torch_threads(settings, workers)
    _raise_file_limit(limits.max_connections + 256)  # plus files, the audit log, the model, threads
    # Connections are bounded by the guarded protocol (http_guard), not by uvicorn's limit_concurrency: that
    # one counts idle connections too and answers 503 to everything, /healthz included, once they add up.
    common: dict[str, Any] = {
        "host": host,
        "port": port,
        "log_level": log_level,
        "log_config": uvicorn_log_config(),
        "http": functools.partial(GuardedHttpToolsProtocol, limits=limits),
        "ws": "none",
        "forwarded_allow_ips": limits.trusted_proxies,
        "timeout_keep_alive": 5,
        "server_header": False,
    }
    if workers == 1:
        uvicorn.run(create_app(bundle, settings), **common)
        return
    _load(bundle, settings)  # fail here, once, rather than in every worker
    os.environ[_ENV] = json.dumps(
        {"bundle": str(Path(bundle).resolve()), "workers": workers, **asdict(settings)}
    )
    uvicorn.run("medclf.serve.app:app_from_environment", factory=True, workers=workers, **common)
