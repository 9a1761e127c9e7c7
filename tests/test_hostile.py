"""The hostile corpus (tests/hostile_corpus.py): every file refused with its specific reason, nothing else
raised, and one `medclf predict` over the whole corpus stays under 1 GiB of memory with exit code 2."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings
from collections import Counter
from pathlib import Path

import pytest

from medclf.errors import InputRejected
from medclf.io import ReadLimits, iter_npz_images, read_image

from .hostile_corpus import CorpusFile, build_corpus

_GIB = 1 << 30

# Runs a command and reports its peak resident memory: the wrapper's only child is the command, so
# RUSAGE_CHILDREN's ru_maxrss (KiB on Linux) is that command's peak, whatever else pytest ran before.
_PEAK_WRAPPER = """
import resource, subprocess, sys
proc = subprocess.run(sys.argv[2:], capture_output=True, text=True)
sys.stdout.write(proc.stdout)
sys.stderr.write(proc.stderr)
with open(sys.argv[1], "w") as fh:
    fh.write(str(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024))
sys.exit(proc.returncode)
"""


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> list[CorpusFile]:
    return build_corpus(tmp_path_factory.mktemp("hostile") / "corpus")


def _refusal(path: Path) -> InputRejected:
    """What reading ``path`` raises, the way `predict` reads it (a dataset .npz is read image by image)."""
    try:
        read_image(path)
    except InputRejected as exc:
        if exc.reason != "dataset_npz":
            return exc
    else:
        raise AssertionError(f"{path.name} was accepted")
    try:
        for _ in iter_npz_images(path):
            pass
    except InputRejected as exc:
        return exc
    raise AssertionError(f"{path.name}: every image of the dataset was accepted")


def test_corpus_is_large_and_varied(corpus: list[CorpusFile]) -> None:
    kinds = Counter(entry.kind for entry in corpus)
    assert len(corpus) >= 40 and len(kinds) >= 12, kinds
    assert len({entry.path.name for entry in corpus}) == len(corpus)
    # Bombs really are bombs: small files (the sparse file takes no disk space but is not one of them).
    bombs = [e for e in corpus if e.kind == "decompression_bomb"]
    assert len(bombs) >= 8 and all(e.path.stat().st_size < 4 << 20 for e in bombs)


def test_every_file_is_refused_with_its_reason(corpus: list[CorpusFile]) -> None:
    wrong = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pydicom and Pillow warn about the damage they see
        for entry in corpus:
            exc = _refusal(entry.path)  # anything but InputRejected propagates and fails the test
            assert exc.message and entry.path.name in exc.message
            if exc.reason not in entry.reasons:
                wrong[entry.path.name] = (exc.reason, exc.message)
    assert not wrong, wrong


def test_refusals_map_to_http_4xx(corpus: list[CorpusFile]) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        statuses = {_refusal(e.path).http_status for e in corpus}
    assert statuses <= {413, 415, 422}, statuses
    assert {413, 415, 422} <= statuses


def test_lower_memory_limit_refuses_an_ordinary_image(tmp_path: Path) -> None:
    """The memory ceiling is checked from the header, before decoding, and follows the limit given."""
    import numpy as np
    from PIL import Image as PILImage

    p = tmp_path / "ordinary.png"
    PILImage.fromarray(np.zeros((512, 512), np.uint8)).save(p)
    assert read_image(p).pixels.shape == (1, 512, 512)
    with pytest.raises(InputRejected) as info:
        read_image(p, limits=ReadLimits(max_memory_bytes=1 << 20))
    assert info.value.reason in ("too_large", "decompression_bomb") and "memory limit" in info.value.message


def test_predict_over_the_corpus_is_bounded(
    corpus: list[CorpusFile], tiny_bundle: Path, tmp_path: Path
) -> None:
    folder = corpus[0].path.parent
    peak_file = tmp_path / "peak"
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    env.pop("MEDCLF_MAX_READ_MEMORY", None)  # the default ceiling (1 GiB) is what is tested
    cmd = [sys.executable, "-m", "medclf", "predict", str(tiny_bundle), str(folder), "--format", "json"]
    proc = subprocess.run(
        [sys.executable, "-c", _PEAK_WRAPPER, str(peak_file), *cmd],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert proc.returncode == 2, proc.stderr[-3000:]
    results = json.loads(proc.stdout)
    by_path = {r["path"]: r for r in results}
    assert len(results) == len(corpus) == len(by_path)
    for entry in corpus:
        r = by_path[str(entry.path)]
        assert "error" in r and "predicted" not in r, r
        assert r["reason"] in entry.reasons, (entry.path.name, r)
    peak = int(peak_file.read_text())
    assert 0 < peak < _GIB, f"peak resident memory {peak / 2**20:.0f} MiB"


def test_read_time_is_bounded(tmp_path: Path, monkeypatch) -> None:
    """A decode that runs past ReadLimits.max_seconds is interrupted and refused (the watchdog)."""
    import time

    import numpy as np
    from PIL import Image as PILImage

    import medclf.io.raster

    p = tmp_path / "slow.png"
    PILImage.fromarray(np.zeros((16, 16), np.uint8)).save(p)

    def stuck_decoder(*args, **kwargs):
        time.sleep(30)  # stands for a decoder stuck on hostile data

    monkeypatch.setattr(medclf.io.raster, "read_raster", stuck_decoder)
    with pytest.raises(InputRejected) as info:
        read_image(p, limits=ReadLimits(max_seconds=0.2))
    assert info.value.reason == "timeout"
    monkeypatch.undo()
    assert read_image(p).pixels.shape == (1, 16, 16)  # the timer is gone with the read


def test_training_lists_hostile_files_and_trains_on_the_rest(
    corpus: list[CorpusFile], sim_data: Path, tmp_path: Path
) -> None:
    """Hostile files hidden among the training images are refused one by one, never fatally."""
    import shutil

    from medclf.training import train

    data = tmp_path / "data"
    shutil.copytree(sim_data, data)
    from medclf.data.sources import NON_IMAGE_SUFFIXES

    # One in four, of every kind but FIFOs and links; names a folder scan takes as images (not notes.txt).
    candidates = [
        e for e in corpus if e.kind != "filesystem" and e.path.suffix.lower() not in NON_IMAGE_SUFFIXES
    ]
    planted = candidates[::4]
    for i, entry in enumerate(planted):
        shutil.copyfile(entry.path, data / "train" / "tumour" / f"planted{i}_{entry.path.name}")
    result = train(data, tmp_path / "model", epochs=1, size=32, arch="compact-s", progress=False)
    refused = {Path(u["path"]).name: u for u in result.unreadable}
    assert len(refused) == len(planted)
    for i, entry in enumerate(planted):
        u = refused[f"planted{i}_{entry.path.name}"]
        # A .npz among images is a dataset, not an image: refusing it as such is right too.
        assert u["reason"] in entry.reasons | {"dataset_npz"}, (entry.path.name, u)
    assert result.bundle.exists()
