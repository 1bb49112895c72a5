"""tests/cli_helpers.run_main: stdout, stderr and exit status as a new ``python -m melcore`` process gives them."""

from __future__ import annotations

import logging
import warnings

import pytest
from cli_helpers import run_main


def _noisy_command(argv):
    warnings.warn("careful", UserWarning, stacklevel=1)
    warnings.warn("old", DeprecationWarning, stacklevel=1)  # a new interpreter hides these outside __main__
    logging.getLogger("melcore.noisy").warning("logged %s", argv[0])
    logging.getLogger("melcore.noisy").info("below WARNING: not shown")
    print("out")
    raise ValueError("boom")


@pytest.mark.parametrize("fixture", [None, "capsys", "capfd"])
def test_warnings_log_records_and_a_traceback_reach_stderr_as_in_a_new_process(fixture, request, monkeypatch):
    import melcore.__main__

    monkeypatch.setattr(melcore.__main__, "main", _noisy_command)
    done = run_main(["x"], request.getfixturevalue(fixture) if fixture else None)
    assert (done.returncode, done.stdout) == (1, "out\n")
    assert "UserWarning: careful" in done.stderr and "old" not in done.stderr
    assert "logged x" in done.stderr and "not shown" not in done.stderr
    assert "Traceback (most recent call last)" in done.stderr and done.stderr.endswith("ValueError: boom\n")


def test_exit_statuses_are_the_interpreters():
    assert run_main(["no-such-command"]).returncode == 2  # main's own value
    usage = run_main(["cache", "--no-such-option"])  # argparse: SystemExit(2)
    assert usage.returncode == 2 and "unrecognized arguments: --no-such-option" in usage.stderr
    helped = run_main(["cache", "--help"])  # SystemExit(0)
    assert helped.returncode == 0 and "--max-size" in helped.stdout
