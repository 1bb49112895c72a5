"""``python -m melcore ARGV`` run as ``melcore.__main__.main(argv)`` inside the test process.

What a new process would add is the interpreter start and the imports (TensorFlow among them for
training, scoring and Grad-CAM): several seconds a command on two cores. The command's own code, exit
status and printed output are the same in this process; the ``python -m melcore`` entry point itself
(``sys.exit(main())`` in a new process) is run by ``tests/test_readme_commands.py`` in a real shell.
"""

from __future__ import annotations

import subprocess
import sys
import traceback


def run_main(argv: list[str], capture) -> subprocess.CompletedProcess:
    """``sys.exit(main(argv))`` as ``python -m melcore`` ends, with its output; never raises.

    Parameters
    ----------
    argv : list of str
        The words after ``python -m melcore`` (what bash passes for a command of plain words).
    capture : pytest's ``capsys`` (``sys.stdout``/``sys.stderr``) or ``capfd`` (file descriptors 1 and 2,
        including what C extensions write)
        Read, and so emptied, before the command runs.

    Returns
    -------
    subprocess.CompletedProcess
        ``returncode`` as the interpreter gives it (``main``'s value; argparse's ``SystemExit`` code; 1
        with the traceback on stderr for an uncaught exception; 1 with the message for ``sys.exit(text)``),
        ``stdout`` and ``stderr`` as text.
    """
    from melcore.__main__ import main

    capture.readouterr()
    try:
        code = main(list(argv))
    except SystemExit as exc:  # argparse's usage errors and --help end the process this way
        code = exc.code
    except Exception:  # the interpreter prints the traceback and exits 1
        traceback.print_exc()
        code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    out, err = capture.readouterr()
    if code is None:
        code = 0
    elif not isinstance(code, int):  # sys.exit("message"): the message on stderr, status 1
        err, code = f"{err}{code}\n", 1
    return subprocess.CompletedProcess(["python", "-m", "melcore", *argv], code, out, err)
