"""Starting the dashboard: ``melreview [--home DIR] [STREAMLIT OPTIONS]``.

Runs ``streamlit run`` on the dashboard's ``app.py``: the one beside ``melcore/`` in a
checkout or an editable install, else the copy installed with the package
(``melreview_app``: app.py, pages/, assets/ and .streamlit/config.toml, whose settings
apply wherever the command is started). The data folder is ``MELREVIEW_HOME`` as
everywhere (:mod:`melcore.settings`); ``--home`` sets it for this server. Other options
go to Streamlit unchanged, e.g. ``melreview --server.port 8600``.

This module only finds files and starts a process: melcore never imports Streamlit.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
from pathlib import Path

from melcore.errors import ConfigError

APP_FILE = "app.py"
APP_PACKAGE = "melreview_app"


def app_path() -> Path:
    """The dashboard's entry point (``app.py``), with its ``pages/`` folder beside it.

    Raises
    ------
    ConfigError
        Neither a checkout nor an installed ``melreview_app`` holds it.
    """
    checkout = Path(__file__).resolve().parents[1] / APP_FILE
    if checkout.is_file() and (checkout.parent / "pages").is_dir():
        return checkout
    spec = importlib.util.find_spec(APP_PACKAGE)
    for folder in (spec.submodule_search_locations or []) if spec else []:
        candidate = Path(folder) / APP_FILE
        if candidate.is_file():
            return candidate
    raise ConfigError(
        f"the dashboard's {APP_FILE} is neither beside {Path(__file__).resolve().parent} nor in an "
        f"installed {APP_PACKAGE} package; reinstall melreview (pip install .) or run "
        f"`streamlit run app.py` in a checkout"
    )


def command(streamlit_args: list[str] | None = None) -> list[str]:
    """The command line that serves the dashboard (this interpreter's Streamlit)."""
    return [sys.executable, "-m", "streamlit", "run", str(app_path()), *(streamlit_args or [])]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="melreview",
        description="Start the melreview dashboard (streamlit run on its app.py).",
        epilog="Other options are passed to `streamlit run`, e.g. --server.port 8600.",
    )
    parser.add_argument(
        "--home",
        metavar="DIR",
        help="data folder for this server (sets MELREVIEW_HOME; default: its current value or ~/.melreview)",
    )
    args, streamlit_args = parser.parse_known_args(sys.argv[1:] if argv is None else argv)
    if args.home:
        os.environ["MELREVIEW_HOME"] = str(Path(args.home).expanduser().resolve())
    try:
        cmd = command(streamlit_args)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    sys.stdout.flush()
    os.execv(cmd[0], cmd)  # the server replaces this process: Ctrl-C and signals reach Streamlit directly
    return 0  # not reached


if __name__ == "__main__":
    sys.exit(main())
