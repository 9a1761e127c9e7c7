"""Figures and the HTML report: files written, self-contained, hostile text escaped, deterministic."""

from __future__ import annotations

import base64
import re
from pathlib import Path

import numpy as np
import pytest

from medclf.evaluation.plots import plot_confusion, plot_reliability, plot_roc
from medclf.evaluation.report import ALL_SAMPLES_LABEL, write_report
from medclf.metrics.classification import compute_metrics

HOSTILE = ["<script>alert(1)</script>", "cost $5 & $6", 'quote" onload="x']
PNG = b"\x89PNG\r\n\x1a\n"


def _data(n: int = 240, k: int = 3, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = rng.integers(0, k, n)
    z = rng.normal(size=(n, k))
    z[np.arange(n), y] += 1.5
    p = np.exp(z)
    return y, p / p.sum(axis=1, keepdims=True)


@pytest.fixture(scope="module")
def outputs(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("eval")
    y, probs = _data()
    metrics = compute_metrics(y[:200], probs[:200], HOSTILE, n_bootstrap=100)
    metrics.update(
        split="test",
        n_removed_duplicates=40,
        protocol="copies of training samples removed",
        all_samples=compute_metrics(y, probs, HOSTILE, n_bootstrap=100),
    )
    figures = {
        "ROC curves": plot_roc(y[:200], probs[:200], HOSTILE, out / "roc.png"),
        "Confusion matrix": plot_confusion(metrics["confusion_matrix"], HOSTILE, out / "confusion.png"),
        "Reliability diagram": plot_reliability(y[:200], probs[:200], out / "reliability.png"),
    }
    sections = {
        "Model": {"bundle": "/runs/<model>", "epochs": 12, "lr": 0.000312, "kwargs": {"width": 32}},
        "Unreadable files (left out)": [{"path": "a<b>.png", "error": "truncated"}, {"path": "c.dcm"}],
        "Warnings": "class <script> is rare\nsecond line",
    }
    report = write_report(
        out / "report.html", title="Evaluation <test>", metrics=metrics, figures=figures, sections=sections
    )
    return {"report": report, "figures": figures, "html": report.read_text(encoding="utf-8")}


def test_figures_are_pngs(outputs):
    for path in outputs["figures"].values():
        assert path.is_file() and path.read_bytes()[:8] == PNG


def test_report_is_self_contained(outputs):
    html = outputs["html"]
    assert outputs["report"].name == "report.html"
    assert not re.search(r"""(src|href)\s*=\s*["']?\s*(https?:|//)""", html, re.I)
    # Base64 payloads can spell anything; look for URLs in the rest.
    text = re.sub(r"base64,[A-Za-z0-9+/=]+", "base64,", html).lower()
    assert "http" not in text and "url(" not in text and "@import" not in text
    assert "<script" not in text and "<link" not in text and "<iframe" not in text
    images = re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', html)
    assert len(images) == 3
    assert all(base64.b64decode(b)[:8] == PNG for b in images)


def test_hostile_text_is_escaped(outputs):
    html = outputs["html"]
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html
    assert "cost $5 &amp; $6" in html
    assert 'quote" onload' not in html and "quote&quot; onload=&quot;x" in html
    assert "Evaluation &lt;test&gt;" in html and "/runs/&lt;model&gt;" in html and "a&lt;b&gt;.png" in html


def test_report_contents(outputs):
    html = outputs["html"]
    assert "40 samples removed" in html
    assert ALL_SAMPLES_LABEL[1:] in html  # capitalised in the table header
    assert html.count("95% CI") >= 3
    for heading in ("Per class", "Confusion matrix", "Model", "Unreadable files (left out)", "Warnings"):
        assert f"<h2>{heading}</h2>" in html
    assert "Specificity" in html and "Sensitivity" in html
    assert "class &lt;script&gt; is rare\nsecond line" in html


def test_missing_figure_and_minimal_metrics(tmp_path):
    y, probs = _data(60, 2)
    m = compute_metrics(y, probs, ["neg", "pos"], n_bootstrap=0)
    path = write_report(
        tmp_path / "r" / "report.html", title="t", metrics=m, figures={"ROC": tmp_path / "no.png"}
    )
    html = path.read_text(encoding="utf-8")
    assert "is missing" in html and "CI not available" in html
    assert "samples removed" not in html and "All samples" not in html


def test_plots_are_deterministic_and_survive_odd_inputs(tmp_path):
    y, probs = _data(100, 3)
    names = ["$x$", "$", "\\alpha"]  # would be mathtext, or a parse error, if not drawn as plain text
    a = plot_roc(y, probs, names, tmp_path / "a.png").read_bytes()
    b = plot_roc(y, probs, names, tmp_path / "b.png").read_bytes()
    assert a == b
    # A class absent from the labels, and a binary problem with a single class present.
    y2 = np.where(y == 1, 0, y)
    plot_roc(y2, probs, names, tmp_path / "absent.png")
    plot_confusion(np.array([[3, 0], [0, 0]]), ["a", "b"], tmp_path / "cm.png", normalise=False)
    plot_reliability(np.zeros(5, dtype=int), np.tile([0.7, 0.3], (5, 1)), tmp_path / "rel.png")
    assert all(Path(tmp_path / f).stat().st_size > 1000 for f in ("absent.png", "cm.png", "rel.png"))
