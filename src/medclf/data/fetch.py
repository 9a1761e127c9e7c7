"""Download the official MedMNIST files, at any published resolution, with their checksums verified.

The MedMNIST authors publish every 2D dataset at 28, 64, 128 and 224 px and the 3D ones at 28 and 64 (MedMNIST+,
Zenodo record 10519652, the files the ``medmnist`` package downloads). The 28 px files cap what a model can see;
the best figures of the MedMNIST+ benchmark (Doerrich et al. 2024) for BreastMNIST and PneumoniaMNIST were made
at 128 and 224 px.

A download streams into a temporary file beside the destination while its MD5 (the checksum the publisher
lists) is computed, and is renamed into place only when the checksum matches: an interrupted or corrupt
download never leaves a file that looks complete, and an existing file is never overwritten. ``mirror``
replaces the Zenodo record's address (a local mirror, or the tests' local server).
"""

from __future__ import annotations

import hashlib
import http.client
import os
import tempfile
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path

from medclf.errors import DataError

MEDMNIST_RECORD = "https://zenodo.org/records/10519652/files"

# Published MD5 checksums per dataset and size (the medmnist package's INFO, release 3.0.2); the datasets listed are
# those whose label names medclf knows (medclf.data.sources.MEDMNIST_CLASSES).
MEDMNIST_MD5: dict[str, dict[int, str]] = {
    "pneumoniamnist": {
        28: "28209eda62fecd6e6a2d98b1501bb15f",
        64: "8f4eceb4ccffa70c672198ea285246c6",
        128: "05b46931834c231683c68f40c47b2971",
        224: "d6a3c71de1b945ea11211b03746c1fe1",
    },
    "breastmnist": {
        28: "750601b1f35ba3300ea97c75c52ff8f6",
        64: "742edef2a1fd1524b2efff4bd7ba9364",
        128: "363e4b3f8d712e9b5de15470a2aaadf1",
        224: "b56378a6eefa9fed602bb16d192d4c8b",
    },
    "bloodmnist": {
        28: "7053d0359d879ad8a5505303e11de1dc",
        64: "2b94928a2ae4916078ca51e05b6b800b",
        128: "adace1e0ed228fccda1f39692059dd4c",
        224: "b718ff6835fcbdb22ba9eacccd7b2601",
    },
    "dermamnist": {
        28: "0744692d530f8e62ec473284d019b0c7",
        64: "b70a2f5635c6199aeaa28c31d7202e1f",
        128: "2defd784463fa5243564e855ed717de1",
        224: "8974907d8e169bef5f5b96bc506ae45d",
    },
    "octmnist": {
        28: "c68d92d5b585d8d81f7112f81e2d0842",
        64: "e229e9440236b774d9f0dfef9d07bdaf",
        128: "0a97e76651ace45c5d943ee3f65b63ae",
        224: "abc493b6d529d5de7569faaef2773ba3",
    },
    "chestmnist": {  # multi-label: 14 findings (a 2-D label array)
        28: "02c8a6516a18b556561a56cbdd36c4a8",
        64: "9de6cd0b934ebb5b7426cfba5efbae16",
        128: "db107e5590b27930b62dbaf558aebee3",
        224: "45bd33e6f06c3e8cdb481c74a89152aa",
    },
    "retinamnist": {
        28: "bd4c0672f1bba3e3a89f0e4e876791e4",
        64: "afda852cc34dcda56f86ad2b2457dbcc",
        128: "e48e916a24454daf90583d4e6efb1a18",
        224: "eae7e3b6f3fcbda4ae613ebdcbe35348",
    },
    "organmnist3d": {28: "a0c5a1ff56af4f155c46d46fbb45a2fe", 64: "58a2205adf14a9d0a189cb06dc78bf10"},
    "nodulemnist3d": {28: "8755a7e9e05a4d9ce80a24c3e7a256f3", 64: "c47c5b7d457bf6332200d2ea6d64ecd8"},
    "adrenalmnist3d": {28: "bbd3c5a5576322bc4cdfea780653b1ce", 64: "17721accfe9fb005146a47d33bc54b2f"},
    "fracturemnist3d": {28: "6aa7b0143a6b42da40027a9dda61302f", 64: "f01d7e6316aedf4210da0da5b7437b42"},
    "vesselmnist3d": {28: "b41fd4f7e7e2feedddb201585ecafa1b", 64: "6bb274a8846e1097066dcd64e2c4520f"},
    "synapsemnist3d": {28: "1235b78a3cd6280881dd7850a78eadb6", 64: "43bd14ebf3af9d3dd072446fedc14d5e"},
}

# A bound on what a server may send, far above any file listed here: more means it is not the file asked for.
MAX_BYTES = 16 << 30
_CHUNK = 1 << 20


def medmnist_filename(name: str, size: int = 28) -> str:
    """``pneumoniamnist_128.npz`` (28 px files have no suffix), after checking the pair is published."""
    key = name.lower().removesuffix(".npz")
    if key not in MEDMNIST_MD5:
        raise DataError(f"unknown MedMNIST dataset {name!r}; choose one of {', '.join(sorted(MEDMNIST_MD5))}")
    if size not in MEDMNIST_MD5[key]:
        sizes = ", ".join(str(s) for s in MEDMNIST_MD5[key])
        raise DataError(f"{key} is published at {sizes} px, not {size}")
    return f"{key}.npz" if size == 28 else f"{key}_{size}.npz"


def file_md5(path: Path) -> str:
    h = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(_CHUNK), b""):
            h.update(chunk)
    return h.hexdigest()


def download(
    url: str,
    dest: str | Path,
    *,
    md5: str,
    timeout: float = 60.0,
    max_bytes: int = MAX_BYTES,
    progress: Callable[[int, int | None], None] | None = None,
) -> Path:
    """Download ``url`` to ``dest`` and return it, verified against ``md5``.

    An existing ``dest`` with the right checksum is kept and nothing is downloaded; one with another checksum
    is an error (it is never overwritten). ``progress(bytes_so_far, total_or_None)`` is called per chunk.
    """
    dest = Path(dest)
    if dest.exists():
        if dest.is_file() and file_md5(dest) == md5:
            return dest
        raise DataError(
            f"{dest} already exists and is not the expected file (MD5 {md5}): move it away or choose "
            "another --out"
        )
    dest.parent.mkdir(parents=True, exist_ok=True)
    request = urllib.request.Request(url, headers={"User-Agent": "medclf"})
    fd, tmp_name = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".part", dir=dest.parent)
    tmp = Path(tmp_name)
    try:
        h = hashlib.md5(usedforsecurity=False)
        received = 0
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(request, timeout=timeout) as response:
            length = response.headers.get("Content-Length")
            total = int(length) if length and length.isdigit() else None
            if total is not None and total > max_bytes:
                raise DataError(
                    f"{url}: the server announces {total} bytes, more than the {max_bytes} allowed"
                )
            while chunk := response.read(_CHUNK):
                received += len(chunk)
                if received > max_bytes:
                    raise DataError(f"{url}: more than {max_bytes} bytes received; stopped")
                h.update(chunk)
                out.write(chunk)
                if progress is not None:
                    progress(received, total)
            out.flush()
            os.fsync(out.fileno())
        if total is not None and received != total:
            raise DataError(f"{url}: the download stopped after {received} of {total} bytes; try again")
        if h.hexdigest() != md5:
            raise DataError(
                f"{url}: checksum mismatch (MD5 {h.hexdigest()}, expected {md5}); the file was not kept"
            )
        os.replace(tmp, dest)
    except urllib.error.HTTPError as exc:
        raise DataError(f"{url}: the server answered {exc.code} {exc.reason}") from None
    except (urllib.error.URLError, TimeoutError, ConnectionError) as exc:
        reason = getattr(exc, "reason", exc)
        raise DataError(
            f"cannot download {url} ({reason}); without internet access, fetch the file elsewhere and copy "
            "it here, or point --mirror at a copy"
        ) from None
    except http.client.HTTPException as exc:  # e.g. IncompleteRead: the connection dropped mid-body
        raise DataError(f"{url}: the transfer broke off ({type(exc).__name__}); try again") from None
    except OSError as exc:  # writing: disk full, permissions
        raise DataError(f"cannot write {dest}: {exc.strerror or exc}") from None
    finally:
        tmp.unlink(missing_ok=True)
    return dest


def fetch_medmnist(
    name: str,
    size: int = 28,
    out_dir: str | Path = ".",
    *,
    mirror: str | None = None,
    timeout: float = 60.0,
    progress: Callable[[int, int | None], None] | None = None,
) -> Path:
    """Download one official MedMNIST file into ``out_dir`` (verified; kept if already there)."""
    filename = medmnist_filename(name, size)
    key = filename.removesuffix(".npz").split("_")[0]
    base = (mirror or MEDMNIST_RECORD).rstrip("/")
    url = f"{base}/{filename}" + ("" if mirror else "?download=1")
    return download(
        url, Path(out_dir) / filename, md5=MEDMNIST_MD5[key][size], timeout=timeout, progress=progress
    )
