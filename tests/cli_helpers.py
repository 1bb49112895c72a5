"""``python -m melcore ARGV`` run as ``melcore.__main__.main(argv)`` inside the test process.

What a new process would add is the interpreter start and the imports (TensorFlow among them for
training, scoring and Grad-CAM): seconds a command on two cores. The command's own code, exit status
and printed output are the same in this process, including what a new interpreter would print on stderr
besides: Python warnings under the interpreter's default filters, and log records that reach no handler
(:data:`logging.lastResort`). The ``python -m melcore`` entry point itself (``sys.exit(main())`` in a new
process) is run by ``tests/test_readme_commands.py`` in a real shell.
"""

from __future__ import annotations

import contextlib
import io
import logging
import subprocess
import sys
import traceback
import warnings

#: A new interpreter's warning filters (no -W options), first match wins; anything else: "default".
_INTERPRETER_FILTERS = (
    ("default", DeprecationWarning, "__main__"),
    ("ignore", DeprecationWarning, ""),
    ("ignore", PendingDeprecationWarning, ""),
    ("ignore", ImportWarning, ""),
    ("ignore", ResourceWarning, ""),
)


def _show_on_stderr(message, category, filename, lineno, file=None, line=None) -> None:
    """The interpreter's own way of showing a warning (pytest's recording replaces it)."""
    sys.stderr.write(warnings.formatwarning(message, category, filename, lineno, line))


@contextlib.contextmanager
def _as_a_new_interpreter():
    """Warnings and unhandled log records go to ``sys.stderr`` as in a new process (pytest's capture off)."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    with warnings.catch_warnings():
        warnings.resetwarnings()
        for action, category, module in _INTERPRETER_FILTERS:
            warnings.filterwarnings(action, category=category, module=module, append=True)
        warnings.showwarning = _show_on_stderr
        root.handlers, root.level = [], logging.WARNING
        try:
            yield
        finally:
            root.handlers, root.level = handlers, level


def run_main(argv: list[str], capture=None) -> subprocess.CompletedProcess:
    """``sys.exit(main(argv))`` as ``python -m melcore`` ends, with its output; never raises.

    Parameters
    ----------
    argv : list of str
        The words after ``python -m melcore`` (what bash passes for a command of plain words).
    capture : pytest's ``capsys`` or ``capfd`` fixture, optional
        Where the output is read from (``capfd``: file descriptors 1 and 2, including what C extensions
        write); emptied before the command runs. Without it, ``sys.stdout`` and ``sys.stderr`` are
        redirected to strings for the call.

    Returns
    -------
    subprocess.CompletedProcess
        ``returncode`` as the interpreter gives it (``main``'s value; argparse's ``SystemExit`` code; 1
        with the traceback on stderr for an uncaught exception; 1 with the message for ``sys.exit(text)``),
        ``stdout`` and ``stderr`` as text.
    """
    from melcore.__main__ import main

    out_buffer, err_buffer = io.StringIO(), io.StringIO()
    if capture is not None:
        capture.readouterr()
        redirect = contextlib.nullcontext()
    else:
        redirect = contextlib.ExitStack()
        redirect.enter_context(contextlib.redirect_stdout(out_buffer))
        redirect.enter_context(contextlib.redirect_stderr(err_buffer))
    with redirect, _as_a_new_interpreter():
        try:
            code = main(list(argv))
        except SystemExit as exc:  # argparse's usage errors and --help end the process this way
            code = exc.code
        except Exception:  # the interpreter prints the traceback and exits 1
            traceback.print_exc()
            code = 1
        sys.stdout.flush()
        sys.stderr.flush()
    if capture is not None:
        out, err = capture.readouterr()
    else:
        out, err = out_buffer.getvalue(), err_buffer.getvalue()
    if code is None:
        code = 0
    elif not isinstance(code, int):  # sys.exit("message"): the message on stderr, status 1
        err, code = f"{err}{code}\n", 1
    return subprocess.CompletedProcess(["python", "-m", "melcore", *argv], code, out, err)
