"""Integration on the real datasets in ../shared/datasets (skipped cleanly when they are absent).

Full training runs are benchmarks (benchmarks/run.py), not tests; these check that the data layer reads the
real layouts with the documented counts, and that the audit finds the documented leakage.
"""

import os

import numpy as np
import pytest

from medclf.data.sources import load_source

from .conftest import shared_dataset

pytestmark = pytest.mark.realdata


def test_brain_tumour_layout_and_counts():
    s = load_source(shared_dataset("brain-tumor-mri"))
    assert s.classes == ["glioma", "meningioma", "notumor", "pituitary"]
    assert s.class_counts("train") == {"glioma": 1321, "meningioma": 1339, "notumor": 1595, "pituitary": 1457}
    assert s.class_counts("test") == {"glioma": 300, "meningioma": 306, "notumor": 405, "pituitary": 300}
    # a few real files decode, greyscale or collapsed-RGB alike
    for i in np.linspace(0, len(s) - 1, 5).astype(int):
        img = s.load(int(i))
        assert img.channels in (1, 3) and min(img.spatial_shape) >= 150


@pytest.mark.parametrize(
    "name,counts",
    [("pneumoniamnist", (4708, 524, 624)), ("breastmnist", (546, 78, 156))],
)
def test_medmnist_official_splits(name, counts):
    s = load_source(shared_dataset(f"medmnist/{name}.npz"))
    assert tuple(len(s.indices(sp)) for sp in ("train", "val", "test")) == counts
    assert s.load(0).pixels.shape == (1, 28, 28)


def test_pneumonia_val_copies_are_found():
    from medclf.data.scan import scan, train_copy_flags

    s = load_source(shared_dataset("medmnist/pneumoniamnist.npz"))
    flags = train_copy_flags(s, scan(s, workers=2, progress=False))
    # The official validation split holds 8 byte copies of training images; the test split none.
    assert int(flags[s.indices("val")].sum()) == 8
    assert int(flags[s.indices("test")].sum()) == 0


@pytest.mark.skipif(
    os.environ.get("MEDCLF_SLOW") != "1", reason="slow (decodes 7,023 JPEGs): set MEDCLF_SLOW=1"
)
def test_brain_tumour_test_copies_of_training_images():
    from medclf.data.scan import scan, train_copy_matches

    s = load_source(shared_dataset("brain-tumor-mri"))
    exact, near, _ = train_copy_matches(s, scan(s, workers=2, progress=False))
    test = s.indices("test")
    assert int(exact[test].sum()) == 103  # documented: 103 test files also appear in Training
    assert 460 <= int((exact | near)[test].sum()) <= 500  # documented: "around 480"
