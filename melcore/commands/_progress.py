"""A one-line ``(done, total)`` progress bar on stderr for the CLI commands (not a command itself)."""

from __future__ import annotations

import sys


class StderrBar:
    """``progress(done, total)`` callback that rewrites one stderr line, only when stderr is a terminal.

    The line is ended by :meth:`close` (or leaving a ``with`` block), so a callback that
    reports the total more than once (e.g. decoding, then scoring) still draws one line::

        with StderrBar("scoring") as bar:
            predict_folder(model, folder, progress=bar)
    """

    width = 30

    def __init__(self, label: str):
        self.label = label
        self.active = sys.stderr.isatty()
        self._shown = False

    def __call__(self, done: int, total: int) -> None:
        if not self.active or total <= 0:
            return
        filled = int(self.width * done / total)
        sys.stderr.write(f"\r{self.label} [{'#' * filled}{'.' * (self.width - filled)}] {done:,}/{total:,}")
        sys.stderr.flush()
        self._shown = True

    def close(self) -> None:
        """End the line (once) if anything was drawn."""
        if self._shown:
            sys.stderr.write("\n")
            sys.stderr.flush()
            self._shown = False

    def __enter__(self) -> StderrBar:
        return self

    def __exit__(self, *exc) -> bool:
        self.close()
        return False
