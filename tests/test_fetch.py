"""Tests for checksum-verified MedMNIST downloads, against a local HTTP server (no internet needed)."""

from __future__ import annotations

import hashlib
import http.server
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from medclf.data import fetch as fetch_mod
from medclf.data.fetch import MEDMNIST_MD5, download, fetch_medmnist, file_md5, medmnist_filename
from medclf.data.sources import load_source
from medclf.errors import DataError
from tests.test_cli import medclf

SHARED = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "medmnist"


class Server:
    """A local HTTP server over a folder; ``/truncated/NAME`` announces more bytes than it sends."""

    def __init__(self, root: Path) -> None:
        self.root, self.requests = root, []
        server = self

        class Handler(http.server.SimpleHTTPRequestHandler):
            def __init__(self, *args, **kwargs) -> None:  # type: ignore[no-untyped-def]
                super().__init__(*args, directory=str(root), **kwargs)

            def do_GET(self) -> None:
                server.requests.append(self.path)
                if self.path.startswith("/truncated/"):
                    body = (root / self.path.removeprefix("/truncated/")).read_bytes()
                    self.send_response(200)
                    self.send_header("Content-Length", str(len(body) * 2))
                    self.end_headers()
                    self.wfile.write(body)
                    self.close_connection = True
                    return
                super().do_GET()

            def log_message(self, *args) -> None:  # type: ignore[no-untyped-def]
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture()
def mirror(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Server]:
    """A mirror holding a small, valid pneumoniamnist_64.npz whose MD5 the registry is told."""
    root = tmp_path / "mirror"
    root.mkdir()
    rng = np.random.default_rng(0)
    arrays = {}
    for split, n in (("train", 12), ("val", 4), ("test", 6)):
        arrays[f"{split}_images"] = rng.integers(0, 256, (n, 64, 64), dtype=np.uint8)
        arrays[f"{split}_labels"] = (np.arange(n) % 2)[:, None]
    np.savez(root / "pneumoniamnist_64.npz", **arrays)
    digest = hashlib.md5((root / "pneumoniamnist_64.npz").read_bytes(), usedforsecurity=False).hexdigest()
    monkeypatch.setitem(MEDMNIST_MD5, "pneumoniamnist", {**MEDMNIST_MD5["pneumoniamnist"], 64: digest})
    server = Server(root)
    yield server
    server.close()


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.glob(".*.part"))


def test_fetch_downloads_verifies_and_the_file_loads(mirror: Server, tmp_path: Path) -> None:
    out = tmp_path / "data"
    seen: list[tuple[int, int | None]] = []
    path = fetch_medmnist(
        "PneumoniaMNIST", 64, out, mirror=mirror.url, progress=lambda a, b: seen.append((a, b))
    )
    assert (
        path == out / "pneumoniamnist_64.npz" and path.read_bytes() == (mirror.root / path.name).read_bytes()
    )
    assert seen and seen[-1][0] == seen[-1][1] == path.stat().st_size
    samples = load_source(path)
    assert samples.classes == ["normal", "pneumonia"] and len(samples) == 22
    # Already there with the right checksum: kept, nothing requested.
    n = len(mirror.requests)
    assert fetch_medmnist("pneumoniamnist", 64, out, mirror=mirror.url) == path
    assert len(mirror.requests) == n and leftovers(out) == []


def test_checksum_mismatch_keeps_nothing(
    mirror: Server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(MEDMNIST_MD5, "pneumoniamnist", {64: "0" * 32})
    out = tmp_path / "data"
    with pytest.raises(DataError, match="checksum mismatch"):
        fetch_medmnist("pneumoniamnist", 64, out, mirror=mirror.url)
    assert list(out.iterdir()) == []


def test_an_existing_different_file_is_never_overwritten(mirror: Server, tmp_path: Path) -> None:
    out = tmp_path / "data"
    out.mkdir()
    mine = out / "pneumoniamnist_64.npz"
    mine.write_bytes(b"my own work")
    with pytest.raises(DataError, match="already exists"):
        fetch_medmnist("pneumoniamnist", 64, out, mirror=mirror.url)
    assert mine.read_bytes() == b"my own work" and mirror.requests == []


def test_server_errors_truncation_and_size_limit(mirror: Server, tmp_path: Path) -> None:
    out = tmp_path / "data"
    md5 = MEDMNIST_MD5["pneumoniamnist"][64]
    with pytest.raises(DataError, match="404"):
        download(f"{mirror.url}/nothing.npz", out / "x.npz", md5=md5)
    with pytest.raises(DataError, match=r"stopped after|broke off"):
        download(f"{mirror.url}/truncated/pneumoniamnist_64.npz", out / "x.npz", md5=md5)
    with pytest.raises(DataError, match="more than the 100 allowed"):
        download(f"{mirror.url}/pneumoniamnist_64.npz", out / "x.npz", md5=md5, max_bytes=100)
    with pytest.raises(DataError, match="cannot download"):
        download("http://127.0.0.1:9/x.npz", out / "x.npz", md5=md5, timeout=5)
    assert not (out / "x.npz").exists() and leftovers(out) == []


def test_names_and_sizes() -> None:
    assert medmnist_filename("breastmnist") == "breastmnist.npz"
    assert medmnist_filename("BreastMNIST.npz", 224) == "breastmnist_224.npz"
    with pytest.raises(DataError, match="unknown MedMNIST dataset 'chest'"):
        medmnist_filename("chest")
    with pytest.raises(DataError, match="published at 28, 64 px, not 224"):
        medmnist_filename("nodulemnist3d", 224)
    assert fetch_mod.MEDMNIST_RECORD.startswith("https://zenodo.org/")


@pytest.mark.parametrize("name", ["pneumoniamnist", "breastmnist"])
def test_registry_matches_the_shared_28px_files(name: str) -> None:
    path = SHARED / f"{name}.npz"
    if not path.is_file():
        pytest.skip(f"{path} is absent (the shared datasets are not on this machine)")
    assert file_md5(path) == MEDMNIST_MD5[name][28]


def test_cli_fetch(mirror: Server, tmp_path: Path) -> None:
    # A subprocess does not see the fixture's patched checksum: the mirror's file is not the published one,
    # so the command must refuse it, keep nothing, and say so in one line.
    out = tmp_path / "cli"
    proc = medclf("fetch", "pneumoniamnist", "--size", "64", "--out", out, "--mirror", mirror.url)
    assert proc.returncode == 2 and "checksum mismatch" in proc.stderr
    assert mirror.requests == ["/pneumoniamnist_64.npz"] and list(out.iterdir()) == []
    proc = medclf("fetch", "nosuchmnist", "--out", out)
    assert proc.returncode == 2 and "unknown MedMNIST dataset" in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("error: unknown MedMNIST dataset")
