"""The HTTP API: answers, explanations, refusals (never a 500 for bad input), keys, back-pressure, audit."""

from __future__ import annotations

import base64
import hashlib
import io
import platform
import sqlite3
import sys
import threading
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image as PILImage
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from medclf.api import load_bundle
from medclf.errors import ConfigError
from medclf.predictor import Predictor
from medclf.serve.app import create_app
from medclf.serve.auditlog import read_rows
from medclf.serve.auth import KeyStore, add_key, check_exposure, is_loopback, read_key_file, remove_key

from .hostile_corpus import build_corpus

with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # starlette's TestClient warns about its httpx backend
    from fastapi.testclient import TestClient

PATIENT_NAME = "Doe^Jane"
PATIENT_ID = "PID-7734521"


@pytest.fixture(scope="module")
def bundle(tiny_bundle) -> Predictor:
    return load_bundle(tiny_bundle)


@pytest.fixture(scope="module")
def brain_png(sim_data) -> Path:
    return sorted((sim_data / "test" / "tumour").glob("*.png"))[0]


def make_dicom(png: Path, dest: Path) -> Path:
    """An MR image with the brain slice's pixels and a patient's identity in its tags."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.4"
    ds.SOPInstanceUID = generate_uid()
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.Modality = "MR"
    ds.PatientName = PATIENT_NAME
    ds.PatientID = PATIENT_ID
    ds.PatientBirthDate = "19700101"
    pixels = np.asarray(PILImage.open(png), dtype=np.uint16) * 16
    ds.set_pixel_data(pixels, "MONOCHROME2", 12)
    ds.save_as(dest, enforce_file_format=True)
    return dest


@pytest.fixture
def client(bundle, tmp_path):
    app = create_app(bundle, audit_db=str(tmp_path / "audit.db"))
    with TestClient(app) as c:
        yield c


def audit_rows(client) -> list[dict]:
    service = client.app.state.service
    service.audit.flush()
    return read_rows(service.audit.path, limit=1000)


def assert_refusal(response, status: int, reason: str | None = None) -> dict:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error", "reason"} and body["error"]
    if reason:
        assert body["reason"] == reason, body
    assert "Traceback" not in body["error"] and "/tmp/" not in body["error"]  # no server paths leak
    return body


def test_predict_png_matches_the_bundle(client, bundle, brain_png):
    data = brain_png.read_bytes()
    r = client.post("/v1/predict", files={"file": ("slice.png", data, "image/png")})
    assert r.status_code == 200, r.text
    body = r.json()
    [expected] = bundle.predict([brain_png])
    assert body["predicted"] == expected["predicted"]
    assert body["probabilities"] == pytest.approx(expected["probabilities"], abs=1e-6)
    assert body["input"]["sha256"] == hashlib.sha256(data).hexdigest()
    assert body["input"]["format"] == "png"
    assert body["model"]["sha256"] == bundle.sha256
    assert body["latency_ms"] > 0 and "explanation" not in body
    # The raw body works too (curl --data-binary), with the same answer.
    raw = client.post("/v1/predict", content=data, headers={"content-type": "application/octet-stream"})
    assert raw.json()["probabilities"] == body["probabilities"]


def test_predict_dicom_and_the_audit_log_holds_no_identity(client, bundle, brain_png, tmp_path):
    dcm = make_dicom(brain_png, tmp_path / "Doe_Jane_PID-7734521.dcm")
    r = client.post("/v1/predict", files={"file": (dcm.name, dcm.read_bytes(), "application/dicom")})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["input"]["format"] == "dicom" and body["predicted"] in bundle.classes
    assert PATIENT_NAME not in r.text and PATIENT_ID not in r.text and "Doe" not in r.text

    rows = audit_rows(client)
    assert len(rows) == 1
    row = rows[0]
    assert row["status"] == 200 and row["endpoint"] == "/v1/predict"
    assert row["input_sha256"] == hashlib.sha256(dcm.read_bytes()).hexdigest()
    assert row["model_sha256"] == bundle.sha256
    assert row["predicted"] == body["predicted"] and row["confidence"] == pytest.approx(body["confidence"])
    assert row["latency_ms"] > 0 and row["error_reason"] is None
    # Nothing identifying anywhere in the database files (rows, WAL, free pages).
    db = client.app.state.service.audit.path
    blob = b"".join(p.read_bytes() for p in db.parent.glob(db.name + "*"))
    for secret in (PATIENT_NAME, "Doe", "Jane", PATIENT_ID, "19700101", dcm.name):
        assert secret.encode() not in blob, secret
    with sqlite3.connect(db) as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_explain_returns_a_heatmap(client, brain_png, bundle):
    r = client.post("/v1/predict?explain=true", files={"file": ("x.png", brain_png.read_bytes())})
    assert r.status_code == 200, r.text
    e = r.json()["explanation"]
    assert (
        e["method"] == "gradcam" and e["layer"] == "layer4" and e["explained_class"] == r.json()["predicted"]
    )
    size = bundle.spec.size
    heat = PILImage.open(io.BytesIO(base64.b64decode(e["heatmap_png"])))
    image = PILImage.open(io.BytesIO(base64.b64decode(e["image_png"])))
    overlay = PILImage.open(io.BytesIO(base64.b64decode(e["overlay_png"])))
    assert heat.mode == "RGBA" and heat.size == image.size == (size[1], size[0])
    assert overlay.format == "PNG" and overlay.width >= 320
    assert audit_rows(client)[-1]["explained"] == 1


def test_model_health_ready_docs_and_page(client, bundle):
    m = client.get("/v1/model").json()
    assert m["classes"] == bundle.classes and m["sha256"] == bundle.sha256
    assert m["input"]["shape"] == list(bundle.spec.input_shape)
    assert m["metrics"]["val"]["n"] > 0 and "facts" in m["model_card"]
    assert client.get("/healthz").json() == {"status": "ok"}
    assert client.get("/readyz").json()["ready"] is True
    assert "/v1/predict" in client.get("/openapi.json").json()["paths"]
    assert client.get("/docs").status_code == 200
    page = client.get("/")
    assert page.status_code == 200 and "not a diagnosis" in page.text
    assert "default-src 'self'" in page.headers["content-security-policy"]
    for name in ("app.js", "style.css"):
        assert client.get(f"/static/{name}").status_code == 200
    assert_refusal(client.get("/v1/nothing"), 404, "not_found")


def test_upload_over_the_limit_is_413(bundle, tmp_path):
    app = create_app(bundle, audit_db=str(tmp_path / "audit.db"), max_upload_mb=0.01)  # 10 KiB
    big = PILImage.fromarray(np.random.default_rng(0).integers(0, 255, (256, 256), dtype=np.uint8))
    buf = io.BytesIO()
    big.save(buf, format="PNG")
    data = buf.getvalue()
    assert len(data) > 20_000
    with TestClient(app) as c:
        assert_refusal(c.post("/v1/predict", files={"file": ("big.png", data)}), 413, "file_too_large")
        assert_refusal(c.post("/v1/predict", content=data), 413, "file_too_large")

        def chunks():  # no Content-Length: the cap is enforced while streaming
            for start in range(0, len(data), 4096):
                yield data[start : start + 4096]

        assert_refusal(c.post("/v1/predict", content=chunks()), 413, "file_too_large")
        rows = audit_rows(c)
    assert [r["status"] for r in rows] == [413, 413, 413]
    assert not list(app.state.service.tmp.glob("*"))  # no upload left behind


def test_junk_is_refused_with_its_reason(client, tmp_path):
    import nibabel as nib

    volume = tmp_path / "volume.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((16, 16, 16), np.uint8), np.eye(4)), volume)
    assert_refusal(client.post("/v1/predict", content=volume.read_bytes()), 422, "wrong_dimensions")
    assert_refusal(client.post("/v1/predict", content=b"hello " * 100), 415, "unsupported_format")
    assert_refusal(client.post("/v1/predict", content=b""), 422, "empty")
    truncated = b"\x89PNG\r\n\x1a\n" + b"\x00" * 50
    assert_refusal(client.post("/v1/predict", files={"file": ("t.png", truncated)}), 422)
    assert_refusal(client.post("/v1/predict", files={"other": ("x.png", b"abc")}), 422, "no_file")
    bad_multipart = {"content-type": "multipart/form-data; boundary=zz"}
    assert_refusal(client.post("/v1/predict", content=b"garbage", headers=bad_multipart), 400, "bad_request")
    assert_refusal(client.post("/v1/predict?explain=perhaps", content=b"x"), 422, "invalid_request")
    assert {r["status"] for r in audit_rows(client)} <= {400, 415, 422}


def test_hostile_corpus_never_gets_a_500(client, tmp_path):
    corpus = [e for e in build_corpus(tmp_path / "corpus") if e.kind != "filesystem"]
    assert len(corpus) > 30
    wrong = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for entry in corpus:
            r = client.post("/v1/predict", files={"file": (entry.path.name, entry.path.read_bytes())})
            body = r.json()
            ok_reason = body.get("reason") in entry.reasons | {"dataset_npz"}
            if r.status_code not in (413, 415, 422) or not ok_reason or not body.get("error"):
                wrong[entry.path.name] = (r.status_code, body)
    assert not wrong, wrong


def test_api_keys(bundle, brain_png, tmp_path):
    keys = tmp_path / "keys.txt"
    key_id, key = add_key(keys, "ward-7")
    assert key not in keys.read_text() and hashlib.sha256(key.encode()).hexdigest() in keys.read_text()
    assert (keys.stat().st_mode & 0o777) == 0o600
    app = create_app(bundle, audit_db=str(tmp_path / "audit.db"), api_key_file=str(keys))
    data = brain_png.read_bytes()
    with TestClient(app) as c:
        assert_refusal(c.post("/v1/predict", content=data), 401, "unauthorized")
        assert_refusal(c.post("/v1/predict", content=data, headers={"X-API-Key": key + "x"}), 401)
        assert_refusal(c.get("/v1/model"), 401)
        assert (
            c.post("/v1/predict", content=data, headers={"Authorization": f"Bearer {key}"}).status_code == 200
        )
        assert c.get("/v1/model", headers={"X-API-Key": key}).status_code == 200
        assert c.get("/healthz").status_code == 200 and c.get("/").status_code == 200
        remove_key(keys, key_id)
        add_key(keys, "other")  # the file changes: the removed key stops working without a restart
        assert_refusal(c.post("/v1/predict", content=data, headers={"X-API-Key": key}), 401)
        rows = audit_rows(c)
    assert [(r["status"], r["key_id"]) for r in rows] == [
        (401, None),
        (401, None),
        (401, None),
        (200, "ward-7"),
        (200, "ward-7"),
        (401, None),
    ]
    db = tmp_path / "audit.db"
    assert key.encode() not in b"".join(p.read_bytes() for p in tmp_path.glob("audit.db*"))
    assert db.exists()


def test_key_file_rules(tmp_path):
    keys = tmp_path / "keys.txt"
    with pytest.raises(ConfigError, match="no such API key file"):
        KeyStore(keys)
    keys.write_text("ward-7:mk_plaintextkey\n")
    with pytest.raises(ConfigError, match="never a key itself"):
        read_key_file(keys)
    keys.write_text("# nothing yet\n")
    with pytest.raises(ConfigError, match="holds no keys"):
        KeyStore(keys)
    key_id, key = add_key(keys)
    with pytest.raises(ConfigError, match="exists already"):
        add_key(keys, key_id)
    store = KeyStore(keys)
    assert store.verify(key) == key_id and store.verify("") is None and store.verify(key[:-1]) is None


def test_keys_are_required_off_loopback(bundle, tmp_path, monkeypatch, capsys):
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("::") and not is_loopback("192.0.2.10")
    check_exposure("127.0.0.1", None)
    check_exposure("0.0.0.0", tmp_path / "keys.txt")
    with pytest.raises(ConfigError, match="without API keys"):
        check_exposure("0.0.0.0", None)
    from medclf.cli import main

    monkeypatch.setattr(sys, "argv", ["medclf", "serve", str(bundle.path), "--host", "0.0.0.0"])
    with pytest.raises(SystemExit) as stop:
        main()
    assert stop.value.code == 2 and "without API keys" in capsys.readouterr().err


def _blocking(app, gate: threading.Event, started: threading.Event) -> None:
    """Make the app's inference wait for ``gate`` (and signal ``started``): a deterministic slow model."""
    service = app.state.service
    real = service.infer

    def infer(upload, explain):
        started.set()
        gate.wait(30)
        return real(upload, explain)

    service.infer = infer


def test_full_queue_answers_429(bundle, brain_png, tmp_path):
    app = create_app(bundle, audit_db=str(tmp_path / "audit.db"), queue=1)
    gate, started = threading.Event(), threading.Event()
    _blocking(app, gate, started)
    data = brain_png.read_bytes()
    with TestClient(app) as c:
        first: dict = {}
        worker = threading.Thread(target=lambda: first.update(r=c.post("/v1/predict", content=data)))
        worker.start()
        try:
            assert started.wait(30)
            assert_refusal(c.post("/v1/predict", content=data), 429, "queue_full")
            ready = c.get("/readyz")
            assert ready.status_code == 503 and ready.json()["in_flight"] == 1
        finally:
            gate.set()
            worker.join(30)
        assert first["r"].status_code == 200
        assert c.post("/v1/predict", content=data).status_code == 200  # room again
        statuses = sorted(r["status"] for r in audit_rows(c))
    assert statuses == [200, 200, 429]


def test_slow_prediction_times_out_and_frees_its_slot_only_when_done(bundle, brain_png, tmp_path):
    app = create_app(bundle, audit_db=str(tmp_path / "audit.db"), queue=1, request_timeout_s=0.3)
    gate, started = threading.Event(), threading.Event()
    _blocking(app, gate, started)
    with TestClient(app) as c:
        assert_refusal(c.post("/v1/predict", content=brain_png.read_bytes()), 504, "timeout")
        admission = app.state.service.admission
        assert admission.in_flight == 1  # the work still runs: its slot stays taken
        gate.set()
        for _ in range(200):
            if admission.in_flight == 0:
                break
            time.sleep(0.05)
        assert admission.in_flight == 0
        assert not list(app.state.service.tmp.glob("*"))


def test_audit_log_show_cli(client, brain_png, monkeypatch, capsys):
    client.post("/v1/predict", content=brain_png.read_bytes())
    client.post("/v1/predict", content=b"junk" * 10)
    audit_rows(client)
    from medclf.cli import main

    db = client.app.state.service.audit.path
    monkeypatch.setattr(sys, "argv", ["medclf", "audit-log", "show", "--db", str(db), "--limit", "5"])
    with pytest.raises(SystemExit) as stop:
        main()
    out = capsys.readouterr().out.splitlines()
    assert stop.value.code == 0
    assert out[0].split()[:3] == ["time", "status", "key_id"] and len(out) == 3
    assert " 200 " in out[1] and "unsupported_format" in out[2]


def test_serve_runs_the_engine_and_tta_it_is_given(tiny_bundle, sim_data, brain_png, tmp_path):
    from medclf.compress import export_bundle
    from medclf.errors import BundleError

    # A bundle without ONNX cannot be served with an ONNX engine: refused when the app is made.
    with pytest.raises(BundleError, match="--int8"):
        create_app(tiny_bundle, audit_db=None, engine="onnx-int8")
    exported = tmp_path / "int8"
    export_bundle(
        tiny_bundle, exported, data=sim_data, onnx=True, int8=True, calibration_samples=16, progress=False
    )
    b = load_bundle(exported)
    data = brain_png.read_bytes()
    for engine, tta in [("auto", False), ("onnx-fp32", False), ("torch", True)]:
        with TestClient(create_app(b, audit_db=None, engine=engine, tta=tta)) as c:
            r = c.post("/v1/predict", files={"file": ("slice.png", data, "image/png")})
            assert r.status_code == 200, r.text
            body = r.json()
            resolved = "onnx-int8" if engine == "auto" else engine
            assert body["model"]["engine"] == resolved and body["model"]["tta"] is tta
            assert c.get("/v1/model").json()["engine"] == resolved
            [expected] = b.predict([brain_png], engine=resolved, tta=tta)
            assert body["probabilities"] == pytest.approx(expected["probabilities"], abs=1e-6)


def test_an_image_unlike_the_training_data_is_answered_with_a_warning(client, tmp_path):
    buf = io.BytesIO()
    PILImage.fromarray((np.indices((64, 64)).sum(0) // 8 % 2 * 255).astype(np.uint8)).save(buf, "PNG")
    r = client.post("/v1/predict", files={"file": ("checker.png", buf.getvalue(), "image/png")})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["ood"] is True and "unlike the images" in body["warning"] and body["ood_score"] > 0


@pytest.mark.skipif(
    not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc",
    reason="allocator tuning is glibc's mallopt",
)
def test_allocator_tuning_is_accepted_by_glibc():
    from medclf.engines import tune_allocator

    # Every option is accepted: an out-of-range value (e.g. an mmap threshold above 32 MiB) returns False.
    assert tune_allocator() is True


# ------------------------------------------------------------------ issue 21, items 3 and 4


def test_no_redirects_to_a_forged_host(client):
    for method, path in [
        ("POST", "/v1/predict/"),
        ("GET", "/v1/model/"),
        ("GET", "/static"),
        ("GET", "/healthz/"),
    ]:
        r = client.request(method, path, headers={"host": "evil.example"}, follow_redirects=False)
        assert r.status_code == 404, (path, r.status_code, r.headers)
        assert "location" not in r.headers and "evil.example" not in r.text


def test_the_openapi_specification_tells_nothing_about_the_model(client, bundle, tiny_bundle, tmp_path):
    spec = client.get("/openapi.json")
    assert spec.status_code == 200 and "/v1/predict" in spec.json()["paths"]
    for secret in [*bundle.classes, bundle.arch, bundle.sha256]:
        assert secret not in spec.text, secret
    assert client.get("/redoc").status_code == 404
    # With keys, the specification needs one, the /docs page (which could not send it) is off, and an
    # unauthenticated client cannot tell a route from a 404.
    keys = tmp_path / "keys.txt"
    _, key = add_key(keys, "ward-7")
    with TestClient(create_app(bundle, audit_db=str(tmp_path / "k.db"), api_key_file=str(keys))) as c:
        assert_refusal(c.get("/openapi.json"), 401, "unauthorized")
        assert c.get("/openapi.json", headers={"X-API-Key": key}).status_code == 200
        assert c.get("/docs").status_code == 404
        assert_refusal(c.get("/v1/nothing"), 401, "unauthorized")
        assert_refusal(c.get("/v1/nothing", headers={"X-API-Key": key}), 404, "not_found")


def test_an_api_key_in_the_url_is_refused_and_never_stored(bundle, brain_png, tmp_path):
    keys = tmp_path / "keys.txt"
    _, key = add_key(keys, "ward-7")
    app = create_app(bundle, audit_db=str(tmp_path / "audit.db"), api_key_file=str(keys))
    data = brain_png.read_bytes()
    with TestClient(app) as c:
        body = assert_refusal(c.post(f"/v1/predict?api_key={key}", content=data), 400, "key_in_query")
        assert "exposed" in body["error"]
        # Under any name, with the key also in its header; and on the page too.
        body = assert_refusal(
            c.post(f"/v1/predict?explain=true&x={key}", content=data, headers={"X-API-Key": key}), 400
        )
        assert body["reason"] == "key_in_query"
        assert_refusal(c.get("/?token=abc"), 400, "key_in_query")
        assert (
            c.post("/v1/predict?explain=false", content=data, headers={"X-API-Key": key}).status_code == 200
        )
        rows = audit_rows(c)
    assert [(r["status"], r["error_reason"]) for r in rows] == [(400, "key_in_query")] * 2 + [(200, None)]
    assert key.encode() not in b"".join(p.read_bytes() for p in tmp_path.glob("audit.db*"))


def test_refusals_by_the_server_itself_are_audited(client):
    assert_refusal(client.get("/v1/predict"), 405, "method_not_allowed")
    assert_refusal(client.get("/v1/no/such/Doe_Jane"), 404, "not_found")
    assert_refusal(client.post("/v1/predict?explain=perhaps", content=b"x"), 422, "invalid_request")
    client.get("/healthz")  # not an API request: no row
    rows = audit_rows(client)
    assert [(r["status"], r["endpoint"], r["error_reason"]) for r in rows] == [
        (405, "/v1/predict", "method_not_allowed"),
        (404, "/v1/*", "not_found"),  # an unknown path is not written: it could hold anything
        (422, "/v1/predict", "invalid_request"),
    ]


def test_the_audit_log_fails_closed(bundle, brain_png, tmp_path, caplog):
    """Issue 21, item 4: with the database locked by someone else, predictions are refused with 503 (and
    their rows go to the server log), never answered without a row; service resumes once it unlocks."""
    db = tmp_path / "audit.db"
    app = create_app(bundle, audit_db=str(db), audit_busy_timeout_s=0.2)
    data = brain_png.read_bytes()
    with TestClient(app) as c:
        assert c.post("/v1/predict", content=data).status_code == 200
        locker = sqlite3.connect(db, isolation_level=None)
        locker.execute("BEGIN EXCLUSIVE")
        try:
            refused = [c.post("/v1/predict", content=data) for _ in range(3)]
            for r in refused:
                assert_refusal(r, 503, "audit_unavailable")
            ready = c.get("/readyz")
            assert ready.status_code == 503 and ready.json()["audit_log"] is False
            assert c.get("/healthz").status_code == 200  # alive, just not ready
        finally:
            locker.execute("ROLLBACK")
            locker.close()
        for _ in range(100):  # the writer checks every second whether it can write again
            if c.get("/readyz").status_code == 200:
                break
            time.sleep(0.1)
        after = c.post("/v1/predict", content=data)
        assert after.status_code == 200
        rows = audit_rows(c)
    assert [r["status"] for r in rows] == [200, 200]
    assert rows[-1]["request_id"] == after.json()["request_id"]
    unwritten = [r.getMessage() for r in caplog.records if "audit row not written" in r.getMessage()]
    assert len(unwritten) == 3 and all('"status": 503' in line for line in unwritten)
