"""Shared fixtures: small simulated datasets (one class per image; findings), quickly trained bundles
(multi-class, multi-label, ordinal), an isolated cache folder."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

SHARED = Path(__file__).resolve().parents[2] / "shared" / "datasets"


@pytest.fixture(autouse=True, scope="session")
def _isolated_cache(tmp_path_factory):
    # Tests never read or write the user's ~/.cache/medclf.
    os.environ["MEDCLF_CACHE_DIR"] = str(tmp_path_factory.mktemp("medclf-cache"))
    yield


@pytest.fixture(scope="session")
def sim_data(tmp_path_factory) -> Path:
    """3 classes x 24 simulated brain MRI slices at 64 px, split 70/30 train/test."""
    from medclf.data.simulate import make_dataset

    return make_dataset(tmp_path_factory.mktemp("sim") / "data", n_per_class=24, size=64, seed=0)


@pytest.fixture(scope="session")
def tiny_bundle(sim_data, tmp_path_factory) -> Path:
    """A bundle trained for 2 epochs at 32 px (seconds): for tests of what comes after training."""
    from medclf.training import train

    out = tmp_path_factory.mktemp("bundle") / "model"
    train(sim_data, out, epochs=2, size=32, batch_size=16, arch="compact-s", progress=False)
    return out


@pytest.fixture(scope="session")
def findings_data(tmp_path_factory) -> Path:
    """60 simulated brain MRI at 32 px with co-occurring findings (multi-label), split 70/30 train/test."""
    from medclf.data.simulate import make_multilabel_dataset

    return make_multilabel_dataset(tmp_path_factory.mktemp("findings") / "data", n=60, size=32, seed=0)


@pytest.fixture(scope="session")
def findings_bundle(findings_data, tmp_path_factory) -> Path:
    """A multi-label bundle trained for 2 epochs (seconds), with per-finding thresholds."""
    from medclf.training import train

    out = tmp_path_factory.mktemp("findings_bundle") / "model"
    train(findings_data, out, epochs=2, size=32, batch_size=16, arch="compact-s", progress=False)
    return out


@pytest.fixture(scope="session")
def ordinal_bundle(sim_data, tmp_path_factory) -> Path:
    """An ordinal bundle (a CORN head over sim_data's three classes read as grades), trained for 2 epochs."""
    from medclf.training import train

    out = tmp_path_factory.mktemp("ordinal_bundle") / "model"
    train(sim_data, out, epochs=2, size=32, batch_size=16, arch="compact-s", task="ordinal", progress=False)
    return out


def shared_dataset(name: str) -> Path:
    """Path of a dataset in ../shared/datasets, or skip the test (with the reason) when absent."""
    p = SHARED / name
    if not p.exists():
        pytest.skip(f"real dataset {p} not present (../shared/datasets is only on the team's machines)")
    return p
