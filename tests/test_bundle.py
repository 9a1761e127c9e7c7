"""Bundles: hashes verified on load, any changed byte refused, atomic writes, no pickle anywhere."""

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from medclf import bundle as bundle_mod
from medclf.bundle import load_bundle, save_bundle, update_bundle, verify_bundle, zip_bundle
from medclf.errors import BundleError
from medclf.models import create_model
from medclf.predictor import Predictor
from medclf.preprocess import PreprocessSpec

SRC = Path(__file__).resolve().parents[1] / "src" / "medclf"


def _manifest(spec=None):
    spec = spec or PreprocessSpec(size=(16, 16))
    return {
        "model": {"arch": "compact-s", "kwargs": {}, "in_channels": 1, "n_classes": 3, "spatial_dims": 2},
        "classes": ["a", "b", "c"],
        "preprocess": spec.to_dict(),
        "metrics": {"val": {"auc": 0.5}},
    }


@pytest.fixture
def saved(tmp_path):
    torch.manual_seed(0)
    model = create_model("compact-s", 1, 3, 2)
    path = save_bundle(tmp_path / "b", model=model, manifest=_manifest(), extra_files={"notes.txt": "hello"})
    return path, model


def test_roundtrip_gives_identical_predictions(saved):
    path, model = saved
    b = Predictor(load_bundle(path))
    x = torch.rand(4, 1, 16, 16)
    model.eval()
    with torch.no_grad():
        expected = torch.softmax(model(x), 1).numpy()
    assert np.allclose(b.predict_tensors(x), expected, atol=1e-6)
    assert b.classes == ["a", "b", "c"] and b.spec == PreprocessSpec(size=(16, 16))
    assert len(b.sha256) == 64
    assert set(b.manifest["files"]) == {"model.safetensors", "notes.txt"}
    assert b.manifest["versions"]["torch"] == torch.__version__


@pytest.mark.parametrize("name", ["model.safetensors", "bundle.json", "notes.txt"])
def test_one_changed_byte_is_refused(saved, name):
    path, _ = saved
    f = path / name
    data = bytearray(f.read_bytes())
    pos = len(data) // 2
    if name == "bundle.json":
        # change a digit inside the metrics: still valid JSON, different content
        text = data.decode()
        pos = text.index('"auc": 0.5') + len('"auc": 0.')
    data[pos] = ord("7") if data[pos] != ord("7") else ord("8")
    f.write_bytes(bytes(data))
    with pytest.raises(BundleError, match="integrity check failed"):
        load_bundle(path)


def test_missing_file_and_not_a_bundle(saved, tmp_path):
    path, _ = saved
    (path / "notes.txt").unlink()
    with pytest.raises(BundleError, match=r"notes\.txt is missing"):
        load_bundle(path)
    with pytest.raises(BundleError, match="not a model bundle"):
        load_bundle(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(BundleError, match=r"bundle\.json is missing"):
        load_bundle(tmp_path / "empty")


def test_expected_sha256(saved):
    path, _ = saved
    b = load_bundle(path)
    assert load_bundle(path, expected_sha256=b.sha256).sha256 == b.sha256
    with pytest.raises(BundleError, match="expected"):
        load_bundle(path, expected_sha256="0" * 64)


def test_crash_while_writing_keeps_previous_bundle(saved, monkeypatch):
    path, model = saved
    before = verify_bundle(path)["self_sha256"]

    def boom(*a, **k):
        raise RuntimeError("simulated crash while writing weights")

    monkeypatch.setattr(bundle_mod, "save_file", boom)
    with pytest.raises(RuntimeError):
        save_bundle(path, model=model, manifest=_manifest(PreprocessSpec(size=(32, 32))))
    assert verify_bundle(path)["self_sha256"] == before
    assert not [p for p in path.parent.iterdir() if p.name.startswith(".")], "temporary folders left behind"


def test_overwrite_and_update(saved):
    path, _model = saved
    first = load_bundle(path).sha256
    update_bundle(path, {"metrics": {"val": {"auc": 0.9}, "test": {"auc": 0.8}}})
    b = load_bundle(path)
    assert b.sha256 != first and b.manifest["metrics"]["test"]["auc"] == 0.8
    assert (path / "notes.txt").read_text() == "hello"


def test_zip_roundtrip_and_zip_slip(saved, tmp_path):
    path, _ = saved
    z = zip_bundle(path)
    assert load_bundle(z).sha256 == load_bundle(path).sha256
    import zipfile

    evil = tmp_path / "evil.zip"
    with zipfile.ZipFile(evil, "w") as zf:
        zf.writestr("../escape.txt", "x")
    with pytest.raises(BundleError, match="unsafe file name"):
        load_bundle(evil)


def test_manifest_cannot_point_outside_the_bundle(saved):
    path, _ = saved
    m = json.loads((path / "bundle.json").read_text())
    assert "self_sha256" in m
    with pytest.raises(BundleError):
        bundle_mod._check_name("../model.safetensors")


def test_no_pickle_anywhere_in_the_package():
    offenders = []
    for f in SRC.rglob("*.py"):
        text = f.read_text()
        if re.search(r"^\s*import pickle|torch\.load\(|allow_pickle\s*=\s*True|joblib\.load", text, re.M):
            offenders.append(str(f))
    assert not offenders, f"pickle-based loading found in {offenders}"


# -- issue 21 item 6: nothing is allocated before the weights are known to fit ---------------------------
def _reseal(path: Path, edit) -> None:
    """Edit bundle.json and recompute every hash, as anyone with a text editor and sha256sum can."""
    m = json.loads((path / "bundle.json").read_text())
    edit(m)
    m["files"] = {name: bundle_mod.sha256_file(path / name) for name in m["files"]}
    m["self_sha256"] = bundle_mod._SELF_PLACEHOLDER
    (path / "bundle.json").write_bytes(bundle_mod._seal(m))


def _widen(width: int):
    def edit(m):
        m["model"]["kwargs"]["width"] = width

    return edit


# Peak memory of this process only: VmHWM (ru_maxrss would include the forking parent's peak on Linux).
_PEAK = """
import re, sys
from medclf.bundle import load_bundle
from medclf.errors import BundleError
def peak_kb():
    with open("/proc/self/status") as fh:
        return int(re.search(r"VmHWM:\\s+(\\d+) kB", fh.read()).group(1))
before = peak_kb()
try:
    load_bundle(sys.argv[1])
    print("loaded")
except BundleError as exc:
    print("refused:", exc)
print((peak_kb() - before) // 1024)
"""


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="measures VmHWM in /proc (Linux)")
def test_a_wider_network_in_the_manifest_is_refused_before_allocating(saved):
    # A 7 KB edit (width 256: 79 M parameters, ~315 MB) used to build the whole network, then fail.
    path, _ = saved
    _reseal(path, _widen(256))
    import subprocess
    import sys

    proc = subprocess.run(
        [sys.executable, "-c", _PEAK, str(path)], capture_output=True, text=True, timeout=300, check=True
    )
    lines = proc.stdout.strip().splitlines()
    assert int(lines[-1]) < 100, f"peak memory grew by {lines[-1]} MB while refusing"
    assert lines[0].startswith("refused:") and "does not fit the network bundle.json describes" in lines[0]
    assert "[256, 1, 3, 3]" in lines[0]


def test_parameter_budget(saved, monkeypatch):
    path, _ = saved
    _reseal(path, _widen(1024))  # 1.26 G parameters: 5 GB before refusal, before the fix
    with pytest.raises(
        BundleError, match=r"the network bundle\.json describes has 1,2\d\d,\d{3},\d{3} param"
    ):
        load_bundle(path)
    _reseal(path, _widen(16))
    assert load_bundle(path).arch == "compact-s"
    monkeypatch.setenv("MEDCLF_MAX_BUNDLE_PARAMETERS", "1000")  # the stored weights alone exceed this
    with pytest.raises(
        BundleError, match=r"model\.safetensors holds 3\d\d,\d{3} values, more than the limit"
    ):
        load_bundle(path)
    assert load_bundle(path, max_parameters=10**6).arch == "compact-s"


def test_weights_that_lie_about_their_shape_or_dtype_are_refused(saved):
    from safetensors.torch import save_file

    path, model = saved
    state = {k: v.clone() for k, v in model.state_dict().items()}
    state["head.3.weight"] = state["head.3.weight"].double()
    save_file(state, str(path / "model.safetensors"))
    _reseal(path, lambda m: None)
    with pytest.raises(BundleError, match=r"head\.3\.weight is F64 \[3, 128\], the network needs F32"):
        load_bundle(path)
    del state["head.3.weight"]
    save_file(state, str(path / "model.safetensors"))
    _reseal(path, lambda m: None)
    with pytest.raises(BundleError, match=r"it lacks \['head\.3\.weight'\]"):
        load_bundle(path)
    (path / "model.safetensors").write_bytes((10**9).to_bytes(8, "little") + b"{}")
    _reseal(path, lambda m: None)
    with pytest.raises(BundleError, match="not a valid safetensors file"):
        load_bundle(path)


def test_a_huge_manifest_is_not_read(saved):
    path, _ = saved
    with open(path / "bundle.json", "r+b") as fh:
        fh.truncate(200 << 20)  # sparse: costs no disk; read whole, it cost 1.5 GB of memory
    with pytest.raises(BundleError, match=r"bundle\.json is larger than 8192 KiB"):
        load_bundle(path)


@pytest.mark.parametrize(
    ("depth", "why"),
    [(200_000, "holds more than 100000 objects"), (5_000, "nested too deeply"), (100, "more than 64 levels")],
)
def test_a_deeply_nested_manifest_is_refused_with_one_line(saved, depth, why):
    # A 200k-deep manifest ended in a RecursionError traceback. The hashes are recomputed, as an attacker would.
    import hashlib

    path, _ = saved
    text = (path / "bundle.json").read_text()
    claimed = json.loads(text)["self_sha256"]
    deep = '"deep": ' + "[" * depth + "]" * depth + ', "metrics":'
    text = text.replace(claimed, bundle_mod._SELF_PLACEHOLDER).replace('"metrics":', deep, 1)
    sealed = text.replace(bundle_mod._SELF_PLACEHOLDER, hashlib.sha256(text.encode()).hexdigest(), 1)
    (path / "bundle.json").write_text(sealed)
    with pytest.raises(BundleError, match=f"refused: bundle\\.json (is nested|{why})") as info:
        load_bundle(path)
    assert why in str(info.value)


@pytest.mark.parametrize(
    "arch", [a for a in __import__("medclf.models").models.list_models() if a != "ensemble"]
)
def test_every_network_can_be_sized_without_memory(arch):
    # The weights check builds the network on the meta device: it must describe the real one exactly.
    with torch.device("meta"):
        meta = create_model(arch, 1, 3, 2).state_dict()
    real = create_model(arch, 1, 3, 2).state_dict()
    assert {k: (v.dtype, v.shape) for k, v in meta.items()} == {
        k: (v.dtype, v.shape) for k, v in real.items()
    }


# -- issue 21 item 7: zip bundles ----------------------------------------------------------------------------
def _zip_stored(folder: Path, dest: Path, extra: dict[str, bytes] | None = None) -> Path:
    import zipfile

    with zipfile.ZipFile(dest, "w", compression=zipfile.ZIP_STORED) as zf:
        for f in sorted(folder.iterdir()):
            zf.write(f, f.name)
        for name, data in (extra or {}).items():
            zf.writestr(name, data)
    return dest


def _patch_zip(
    path: Path, name: str, *, method: int | None = None, flags: int | None = None, size: int | None = None
) -> None:
    """Change a member's compression method, flag bits or declared size in its local and central headers."""
    import struct

    data = bytearray(path.read_bytes())
    raw = name.encode()
    # (signature, offsets of: name length, name, flags, method, uncompressed size)
    for sig, name_len_at, name_at, flags_at, method_at, size_at in (
        (b"PK\x03\x04", 26, 30, 6, 8, 22),
        (b"PK\x01\x02", 28, 46, 8, 10, 24),
    ):
        pos = data.find(sig)
        while pos >= 0:
            n = struct.unpack_from("<H", data, pos + name_len_at)[0]
            if bytes(data[pos + name_at : pos + name_at + n]) == raw:
                for at, fmt, value in (
                    (method_at, "<H", method),
                    (flags_at, "<H", flags),
                    (size_at, "<I", size),
                ):
                    if value is not None:
                        struct.pack_into(fmt, data, pos + at, value)
            pos = data.find(sig, pos + 4)
    path.write_bytes(bytes(data))


def test_zip_reads_only_listed_members_and_cleans_up(saved, tmp_path):
    path, _ = saved
    # An unlisted member that would fail if it were read at all (unknown compression), and a big one.
    z = _zip_stored(path, tmp_path / "b.zip", {"junk.bin": b"x" * 1000, "big.bin": b"\0" * (8 << 20)})
    _patch_zip(z, "junk.bin", method=98)
    b = load_bundle(z)
    unpacked = b.path
    assert sorted(p.name for p in unpacked.iterdir()) == ["bundle.json", "model.safetensors", "notes.txt"]
    assert b.source == z and b.read_file("notes.txt") == b"hello"
    b.close()
    assert not unpacked.exists()
    b = load_bundle(z)
    unpacked = b.path
    del b
    import gc

    gc.collect()
    assert not unpacked.exists(), "the unpacked folder outlived its Bundle"


def test_medclf_info_on_a_zip_leaves_nothing_behind(saved, tmp_path):
    import os
    import subprocess
    import sys

    path, _ = saved
    z = zip_bundle(path, tmp_path / "b.zip")
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    env = {**os.environ, "TMPDIR": str(tmp), "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run(
        [sys.executable, "-m", "medclf", "info", str(z)], capture_output=True, text=True, env=env, timeout=300
    )
    assert proc.returncode == 0, proc.stderr
    assert f"bundle      {z}" in proc.stdout
    assert list(tmp.iterdir()) == []


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        ("crc", r"cannot read notes\.txt from the zip: Bad CRC-32"),
        ("encrypted", r"notes\.txt in the zip is encrypted"),
        ("method", r"notes\.txt in the zip uses compression method 'ppmd'"),
        ("duplicate", r"the zip holds 'notes\.txt' twice"),
        ("symlink", r"notes\.txt in the zip is a symbolic link"),
        ("short", r"cannot read notes\.txt from the zip: it is shorter than it declares"),
        ("claims", r"the files the bundle lists claim more than 4 GiB"),
    ],
)
def test_damaged_zip_members_are_refused_with_one_line(saved, tmp_path, damage, message):
    import stat
    import tempfile
    import warnings
    import zipfile

    path, _ = saved
    z = tmp_path / "b.zip"
    if damage == "duplicate":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # zipfile warns about the duplicate name
            _zip_stored(path, z, {"notes.txt": b"hello"})
    elif damage == "symlink":
        with zipfile.ZipFile(z, "w") as zf:
            for f in sorted(path.iterdir()):
                info = zipfile.ZipInfo(f.name)
                if f.name == "notes.txt":
                    info.external_attr = (stat.S_IFLNK | 0o777) << 16
                zf.writestr(info, f.read_bytes())
    else:
        _zip_stored(path, z)
        if damage == "crc":
            z.write_bytes(z.read_bytes().replace(b"hello", b"jello", 1))
        elif damage == "encrypted":
            _patch_zip(z, "notes.txt", flags=0x1)
        elif damage == "method":
            _patch_zip(z, "notes.txt", method=98)
        elif damage == "short":
            _patch_zip(z, "notes.txt", size=10)
        elif damage == "claims":
            _patch_zip(z, "notes.txt", size=0xFFFFFFF0)
            _patch_zip(z, "model.safetensors", size=0xFFFFFFF0)
    leftovers = set(Path(tempfile.gettempdir()).glob("medclf-bundle-*"))
    with pytest.raises(BundleError, match=message) as info:
        load_bundle(z)
    assert "\n" not in str(info.value)
    assert set(Path(tempfile.gettempdir()).glob("medclf-bundle-*")) == leftovers


def test_a_zip_with_too_many_entries_is_refused_before_its_directory_is_parsed(saved, tmp_path, monkeypatch):
    import zipfile

    path, _ = saved
    z = _zip_stored(path, tmp_path / "b.zip", {f"x{i}": b"" for i in range(5000)})

    def must_not_parse(*a, **k):
        raise AssertionError("zipfile parsed the central directory")

    monkeypatch.setattr(zipfile.ZipFile, "_RealGetContents", must_not_parse)
    with pytest.raises(BundleError, match="the zip holds more than 4096 entries"):
        load_bundle(z)


# -- issue 21 item 8: links ------------------------------------------------------------------------------------
def test_a_listed_file_that_is_a_symlink_is_refused(saved, tmp_path):
    path, _ = saved
    secret = tmp_path / "passwd"
    secret.write_text("root:x:0:0:SECRET\n")
    (path / "MODEL_CARD.md").symlink_to(secret)
    _reseal(path, lambda m: m["files"].update({"MODEL_CARD.md": ""}))
    with pytest.raises(BundleError, match=r"MODEL_CARD\.md is a symbolic link"):
        load_bundle(path)
    with pytest.raises(BundleError, match=r"MODEL_CARD\.md is a symbolic link"):
        zip_bundle(path)
    assert not path.with_suffix(".zip").exists()


def test_zip_bundle_packs_only_listed_files(saved, tmp_path):
    import zipfile

    path, _ = saved
    (path / "private-notes.txt").write_text("not for the zip")
    (path / "linked.txt").symlink_to(tmp_path / "elsewhere.txt")
    z = zip_bundle(path, tmp_path / "out.zip")
    with zipfile.ZipFile(z) as zf:
        assert sorted(zf.namelist()) == ["bundle.json", "model.safetensors", "notes.txt"]
    assert load_bundle(z).sha256 == load_bundle(path).sha256


def test_a_file_swapped_for_a_link_after_loading_is_not_served(saved, tmp_path):
    # The server's /v1/model reads MODEL_CARD.md when asked: it re-reads plain and re-hashes.
    from medclf.serve.app import _model_card

    path, model = saved
    save_bundle(path, model=model, manifest=_manifest(), extra_files={"MODEL_CARD.md": "# Card\n"})
    b = load_bundle(path)
    assert _model_card(b)["markdown"] == "# Card\n"
    secret = tmp_path / "passwd"
    secret.write_text("root:x:0:0:SECRET\n")
    (path / "MODEL_CARD.md").unlink()
    (path / "MODEL_CARD.md").symlink_to(secret)
    assert "markdown" not in _model_card(b)
    with pytest.raises(BundleError, match="symbolic link"):
        b.read_file("MODEL_CARD.md")
