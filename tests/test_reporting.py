"""medclf.reporting: the Python API is silent unless a caller installs a reporter; the CLI installs one on
stderr for each command and puts the silent one back afterwards."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
from rich.console import Console

import medclf
from medclf import reporting

from .inprocess import run_medclf

TINY = ("--epochs", "1", "--size", "32", "--batch-size", "16", "--arch", "compact-s")


def test_the_python_api_prints_nothing_by_default(sim_data: Path, tmp_path: Path, capsys) -> None:
    # progress=True (the default) too: without a reporter there is nothing to draw a bar on.
    result = medclf.train(sim_data, tmp_path / "m", epochs=1, size=32, batch_size=16, arch="compact-s")
    assert result.bundle.exists()
    out, err = capsys.readouterr()
    assert out == "" and err == ""


def test_evaluate_and_the_audit_print_nothing_unless_a_reporter_is_installed(
    tiny_bundle: Path, sim_data: Path, tmp_path: Path, capsys
) -> None:
    metrics = medclf.evaluate(tiny_bundle, sim_data, tmp_path / "eval")
    report = medclf.audit(sim_data, progress=False)
    report.render()
    assert metrics["n"] > 0
    assert capsys.readouterr() == ("", "")
    # The same calls under a reporter show their summaries there.
    console = Console(record=True, width=200, file=io.StringIO())
    with reporting.use(reporting.ConsoleReporter(console)):
        medclf.evaluate(tiny_bundle, sim_data, tmp_path / "eval2", progress=False)
        report.render()
    shown = console.export_text()
    assert f"Report: {tmp_path / 'eval2' / 'report.html'}" in shown and "Samples per class and split" in shown
    assert capsys.readouterr() == ("", "")


def test_the_cli_reports_on_stderr_and_puts_the_silent_reporter_back(sim_data: Path, tmp_path: Path) -> None:
    proc = run_medclf("train", sim_data, "--out", tmp_path / "m", *TINY)
    assert proc.returncode == 0, proc.stderr
    # Not a terminal: one line per epoch instead of a live bar.
    for line in ("Plan", "epoch 1/1", "Bundle written", "sanity check"):
        assert line in proc.stderr.replace("Sanity", "sanity")
    assert isinstance(reporting.current(), reporting.SilentReporter)


def test_use_nests_and_puts_the_previous_reporter_back() -> None:
    outer, inner = reporting.ConsoleReporter(Console(file=io.StringIO())), reporting.SilentReporter()
    assert isinstance(reporting.current(), reporting.SilentReporter)
    with reporting.use(outer):
        assert reporting.current() is outer
        with reporting.use(inner):
            assert reporting.current() is inner
        assert reporting.current() is outer
        with pytest.raises(RuntimeError), reporting.use(inner):
            raise RuntimeError("an exception inside the block")
        assert reporting.current() is outer
    assert isinstance(reporting.current(), reporting.SilentReporter)


def test_console_reporter_prints_markup_and_plain_warnings(capsys) -> None:
    console = Console(record=True, width=100, file=io.StringIO())
    rep = reporting.ConsoleReporter(console)
    rep.print("[bold]Plan[/] arch=compact")
    rep.warn("step [3] skipped")  # brackets in a warning are text, not markup
    assert console.export_text().splitlines() == ["Plan arch=compact", "warning: step [3] skipped"]
    silent = reporting.SilentReporter()
    silent.print("[bold]Plan[/]")
    silent.warn("x")
    assert capsys.readouterr() == ("", "")


def test_progress_bars_are_drawn_on_a_terminal_only() -> None:
    def drawn(force_terminal: bool, enabled: bool = True) -> str:
        buf = io.StringIO()
        console = Console(file=buf, force_terminal=force_terminal, width=100)
        with (
            reporting.use(reporting.ConsoleReporter(console)),
            reporting.progress("checking", 3, enabled=enabled, info=True) as bar,
        ):
            for k in range(3):
                bar.advance(info=f"item {k}")
        return buf.getvalue()

    assert "checking" in drawn(True)
    assert drawn(False) == ""
    assert drawn(True, enabled=False) == ""
