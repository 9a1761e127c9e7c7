"""Run the ``medclf`` command line in the test process: the same entry point (``medclf.cli.main``) as
``python -m medclf``, without the seconds a fresh interpreter spends importing PyTorch, MONAI and scikit-learn.

For tests whose point is what a command does or says, not the process around it. What only a real process
shows (nothing but one line on stderr, including what C libraries or import-time warnings print there; a
kill; a resume) stays tested with ``subprocess`` in at least one test per contract (tests/test_cli.py,
tests/test_crash.py, ...).
"""

from __future__ import annotations

import io
import os
import subprocess
import sys
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path


def run_medclf(
    *args: str | Path, cwd: str | Path | None = None, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """``medclf ARGS`` as a :class:`subprocess.CompletedProcess` (returncode, stdout, stderr), run in-process.

    ``env`` adds to (not replaces) the environment for the call. The process-wide state a command may
    change (environment, working folder, ``sys.argv``, PyTorch's thread count and the applied thread
    policy) is put back afterwards, so that later tests see the process as before. An exception that
    escapes ``main`` (a would-be traceback) propagates and fails the test.
    """
    import torch

    from medclf import threads
    from medclf.cli import main

    argv = [str(a) for a in args]
    saved_env, saved_argv, saved_cwd = dict(os.environ), sys.argv, os.getcwd()
    saved_threads, saved_policy = torch.get_num_threads(), threads._policy
    out, err = io.StringIO(), io.StringIO()
    code: int | str | None = 0
    try:
        os.environ.update(env or {})
        sys.argv = ["medclf", *argv]
        if cwd is not None:
            os.chdir(cwd)
        with redirect_stdout(out), redirect_stderr(err):
            try:
                main(argv)
            except SystemExit as exc:
                code = exc.code
    finally:
        os.chdir(saved_cwd)
        sys.argv = saved_argv
        os.environ.clear()
        os.environ.update(saved_env)
        torch.set_num_threads(saved_threads)
        threads._policy = saved_policy
    if code is None:
        code = 0
    elif not isinstance(code, int):  # sys.exit("message"): printed to stderr, exit status 1
        err.write(f"{code}\n")
        code = 1
    return subprocess.CompletedProcess(["medclf", *argv], code, out.getvalue(), err.getvalue())
