"""Hostile bundles (issue 21, items 5-8): what loading each one costs, and how it ends.

    .venv/bin/python benchmarks/bundle_attacks.py [--out benchmarks/results/bundle_attacks.json]
        [--big-member-gib 3.9] [--manifest-mb 200]

Builds one small genuine bundle (compact-s, 2D), derives each attack from it in a temporary folder, and loads
each one in a fresh process (``python -m medclf info``, the way a user meets it), recording the exit code, the
first line of stderr (or "loaded"), whether a traceback appeared, the process's peak resident memory
(``VmHWM`` of the child; Linux only) and whether it left a ``medclf-bundle-*`` folder behind in its TMPDIR.

The attacks: a manifest widened to 1024 and 2048 (hashes recomputed), a ``--manifest-mb`` manifest, a
200k-deep manifest, a .zip holding an unlisted ``--big-member-gib`` member of zeros, .zip members with a bad
CRC, the encrypted flag and an unknown compression method, a MODEL_CARD.md that is a link to /etc/passwd, and
swapped class names with recomputed hashes under ``--trusted-keys`` (the genuine bundle is signed). The genuine
bundle and its .zip are loaded too, as the baseline.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import struct
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path
from typing import Any

import torch

from medclf import bundle as bundle_mod
from medclf.bundle import save_bundle, sign_bundle, zip_bundle
from medclf.models import create_model
from medclf.preprocess import PreprocessSpec
from medclf.signing import generate_key_pair


def reseal(path: Path, edit: Any) -> None:
    m = json.loads((path / "bundle.json").read_text())
    edit(m)
    m["files"] = {name: bundle_mod.sha256_file(path / name) for name in m["files"]}
    m["self_sha256"] = bundle_mod._SELF_PLACEHOLDER
    (path / "bundle.json").write_bytes(bundle_mod._seal(m))


def reseal_text(path: Path, insert: str) -> None:
    """Insert raw JSON text before "classes" and recompute bundle.json's own hash (json.dumps could not)."""
    text = (path / "bundle.json").read_text()
    claimed = json.loads(text)["self_sha256"]
    text = text.replace(claimed, bundle_mod._SELF_PLACEHOLDER).replace('"classes":', insert + '"classes":', 1)
    digest = hashlib.sha256(text.encode()).hexdigest()
    (path / "bundle.json").write_text(text.replace(bundle_mod._SELF_PLACEHOLDER, digest, 1))


def patch_zip(path: Path, name: str, *, method: int | None = None, flags: int | None = None) -> None:
    data = bytearray(path.read_bytes())
    for sig, name_len_at, name_at, flags_at, method_at in (
        (b"PK\x03\x04", 26, 30, 6, 8),
        (b"PK\x01\x02", 28, 46, 8, 10),
    ):
        pos = data.find(sig)
        while pos >= 0:
            n = struct.unpack_from("<H", data, pos + name_len_at)[0]
            if bytes(data[pos + name_at : pos + name_at + n]) == name.encode():
                if method is not None:
                    struct.pack_into("<H", data, pos + method_at, method)
                if flags is not None:
                    struct.pack_into("<H", data, pos + flags_at, flags)
            pos = data.find(sig, pos + 4)
    path.write_bytes(bytes(data))


def stored_zip(folder: Path, dest: Path) -> Path:
    with zipfile.ZipFile(dest, "w", compression=zipfile.ZIP_STORED) as zf:
        for f in sorted(folder.iterdir()):
            zf.write(f, f.name)
    return dest


def build_cases(root: Path, big_member_gib: float, manifest_mb: int) -> dict[str, tuple[Path, list[str]]]:
    torch.manual_seed(0)
    manifest = {
        "model": {"arch": "compact-s", "kwargs": {}, "in_channels": 1, "n_classes": 3, "spatial_dims": 2},
        "classes": ["normal", "tumour", "oedema"],
        "preprocess": PreprocessSpec(size=(64, 64)).to_dict(),
    }
    genuine = save_bundle(
        root / "genuine",
        model=create_model("compact-s", 1, 3, 2),
        manifest=manifest,
        extra_files={"MODEL_CARD.md": "# Card\n", "notes.txt": "hello"},
    )
    key, pub = generate_key_pair(root / "keys" / "maker")
    trusted = root / "trusted"
    trusted.mkdir()
    shutil.copy(pub, trusted)
    sign_bundle(genuine, key)
    cases: dict[str, tuple[Path, list[str]]] = {"genuine folder": (genuine, [])}
    cases["genuine zip"] = (zip_bundle(genuine, root / "genuine.zip"), [])
    cases["genuine, --trusted-keys"] = (genuine, ["--trusted-keys", str(trusted)])

    def variant(name: str) -> Path:
        dest = root / name
        shutil.copytree(genuine, dest)
        return dest

    for width in (1024, 2048):
        b = variant(f"width{width}")
        reseal(b, lambda m, w=width: m["model"]["kwargs"].update(width=w))
        cases[f"manifest width {width}"] = (b, [])
    b = variant("huge-manifest")
    with open(root / "pad.json", "w") as fh:  # a long list of small numbers, streamed to disk
        fh.write('"padding": [')
        chunk = "0," * (1 << 19)
        for _ in range(manifest_mb):
            fh.write(chunk)
        fh.write("0], ")
    reseal_text(b, (root / "pad.json").read_text())
    (root / "pad.json").unlink()
    cases[f"{manifest_mb} MB manifest"] = (b, [])
    b = variant("deep-manifest")
    reseal_text(b, '"deep": ' + "[" * 200_000 + "]" * 200_000 + ", ")
    cases["200k-deep manifest"] = (b, [])

    z = root / "unlisted.zip"
    shutil.copy(cases["genuine zip"][0], z)
    with zipfile.ZipFile(z, "a", compression=zipfile.ZIP_DEFLATED) as zf:
        info = zipfile.ZipInfo("big.bin")
        info.compress_type = zipfile.ZIP_DEFLATED
        with zf.open(info, "w", force_zip64=True) as dst:
            zeros = bytes(1 << 24)
            for _ in range(int(big_member_gib * 64)):
                dst.write(zeros)
    cases[f"zip + unlisted {big_member_gib} GiB member"] = (z, [])
    for damage in ("bad CRC", "encrypted flag", "unknown method"):
        z = stored_zip(genuine, root / f"{damage.replace(' ', '-')}.zip")
        if damage == "bad CRC":
            z.write_bytes(z.read_bytes().replace(b"hello", b"jello", 1))
        elif damage == "encrypted flag":
            patch_zip(z, "notes.txt", flags=0x1)
        else:
            patch_zip(z, "notes.txt", method=98)
        cases[f"zip member: {damage}"] = (z, [])
    b = variant("symlink")
    (b / "MODEL_CARD.md").unlink()
    (b / "MODEL_CARD.md").symlink_to("/etc/passwd")
    reseal(b, lambda m: None)
    cases["MODEL_CARD.md -> /etc/passwd"] = (b, [])
    b = variant("swapped-classes")
    reseal(b, lambda m: m.update(classes=["tumour", "normal", "oedema"]))
    cases["swapped classes, no trust"] = (b, [])
    cases["swapped classes, --trusted-keys"] = (b, ["--trusted-keys", str(trusted)])
    return cases


# `medclf info ARGS` in a child that writes its own peak resident memory (KiB) to $PEAK_FILE as it exits.
# VmHWM, not ru_maxrss: Linux carries ru_maxrss over from the forked parent through exec.
_CHILD = """
import atexit, os, re, sys
def report():
    with open("/proc/self/status") as status, open(os.environ["PEAK_FILE"], "w") as fh:
        fh.write(re.search(r"VmHWM:\\s+(\\d+) kB", status.read()).group(1))
atexit.register(report)
sys.argv = ["medclf", "info", *sys.argv[1:]]
from medclf.cli import main
main()
"""


def run_case(path: Path, extra: list[str], tmp: Path) -> dict[str, Any]:
    tmp.mkdir()
    peak_file = tmp.parent / f"{tmp.name}.peak"
    env = {**os.environ, "TMPDIR": str(tmp), "PYTHONWARNINGS": "ignore", "PEAK_FILE": str(peak_file)}
    proc = subprocess.run(
        [sys.executable, "-c", _CHILD, str(path), *extra],
        capture_output=True,
        text=True,
        env=env,
        timeout=1800,
    )
    stderr = proc.stderr.strip().splitlines()
    return {
        "exit_code": proc.returncode,
        "outcome": (stderr[-1] if proc.returncode else "loaded").replace(str(path), "BUNDLE"),
        "traceback": "Traceback" in proc.stderr,
        "peak_rss_mb": round(int(peak_file.read_text()) / 1024) if peak_file.exists() else None,
        "left_behind": sorted(p.name for p in tmp.iterdir()),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/bundle_attacks.json"))
    ap.add_argument("--big-member-gib", type=float, default=3.9)
    ap.add_argument("--manifest-mb", type=int, default=200)
    args = ap.parse_args()
    results = {}
    with tempfile.TemporaryDirectory(prefix="bundle-attacks-") as d:
        root = Path(d)
        cases = build_cases(root, args.big_member_gib, args.manifest_mb)
        for i, name in enumerate(cases):
            path, extra = cases[name]
            results[name] = run_case(path, extra, root / f"tmp{i}")
            r = results[name]
            print(
                f"{name:38s} exit {r['exit_code']}  peak {r['peak_rss_mb']!s:>6} MB  "
                f"left {len(r['left_behind'])}  {'TRACEBACK ' if r['traceback'] else ''}{r['outcome'][:110]}",
                flush=True,
            )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"command": " ".join(sys.argv), "python": sys.version.split()[0], "torch": torch.__version__}
    args.out.write_text(json.dumps({"meta": meta, "cases": results}, indent=2) + "\n")
    print(f"written to {args.out}")


if __name__ == "__main__":
    main()
