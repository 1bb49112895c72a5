"""Checks on paths and text that come from users: folder confinement, file kinds, Markdown escaping.

Paths typed into the app or written in a lesion table may name any file the server
can read. Every read of such a path goes through :func:`inside` (is it under one of
the allowed folders once ``..`` and symbolic links are resolved?) and
:func:`not_a_regular_file` (a named pipe would block the reader forever, a device
would never end). Text typed by users (dataset, reviewer and image names, notes) is
shown on pages through :func:`escape_markdown`, so it renders as the characters
typed and never as a link, an image, a heading or a coloured directive.

Only the standard library is imported.
"""

from __future__ import annotations

import os
import re
import stat
from pathlib import Path
from typing import Iterable, Union

__all__ = ["escape_markdown", "inside", "not_a_regular_file", "resolve_roots"]

PathLike = Union[str, os.PathLike]

# Characters that start a Markdown construct anywhere in a line: code, emphasis, links and
# images ("[" and "]": "(", ")" and "!" mean nothing without them), raw HTML and "<url>"
# links, math, strikethrough, Streamlit's ":red[...]" / ":material/x:" directives (and the
# "http://" of a bare link), e-mail autolinks, entities.
_ANYWHERE = re.compile(r"([\\`*\[\]<>$~:@&])")
# "_" starts emphasis only at a word boundary ("ISIC_0001" is plain text), and "." only makes
# a link in "www." (GitHub-flavoured bare links).
_BOUNDARY_UNDERSCORE = re.compile(r"(?<![A-Za-z0-9])_|_(?![A-Za-z0-9])")
_WWW_DOT = re.compile(r"(?i)(?<=www)\.")
# At the start of the text: a heading, a list item ("- ", "+ ", "1. ", "1) ") or a setext line.
_LEADING = re.compile(r"^(\s*)([-+=#]|\d+(?=[.)]))")
_LINE_BREAKS = re.compile(r"[\r\n\u2028\u2029\x0b\x0c\x85]+")


def resolve_roots(roots: Iterable[PathLike | None]) -> list[Path]:
    """The folders of ``roots`` made absolute with symbolic links followed; None and "" entries dropped."""
    resolved: list[Path] = []
    for root in roots:
        if root is None or os.fspath(root) == "":
            continue
        path = Path(os.fspath(root)).expanduser().resolve(strict=False)
        if path not in resolved:
            resolved.append(path)
    return resolved


def inside(path: PathLike, roots: Iterable[PathLike | None]) -> Path | None:
    """The real location of ``path`` when it lies inside one of ``roots``, else None.

    Both sides are resolved first (``..`` removed, symbolic links followed), so
    ``images/../../etc/passwd`` and a symlink inside an allowed folder that points
    elsewhere are outside. A path holding a NUL byte is never inside. The file need
    not exist.
    """
    raw = os.fspath(path)
    if "\x00" in raw:
        return None
    resolved = Path(raw).expanduser().resolve(strict=False)
    for root in resolve_roots(roots):
        if resolved == root or resolved.is_relative_to(root):
            return resolved
    return None


def not_a_regular_file(path: PathLike) -> str | None:
    """What ``path`` is when it is not a regular file ("a folder", "a named pipe (FIFO)"...), else None.

    Symbolic links are followed; a path that does not exist gives ``"missing"``.
    """
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        return "missing"
    except OSError as exc:
        return f"unreadable ({exc.strerror or type(exc).__name__})"
    if stat.S_ISREG(mode):
        return None
    if stat.S_ISDIR(mode):
        return "a folder"
    if stat.S_ISFIFO(mode):
        return "a named pipe (FIFO)"
    if stat.S_ISSOCK(mode):
        return "a socket"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device"
    return "not a regular file"


def escape_markdown(text) -> str:
    """``text`` as Markdown that renders exactly the characters typed, on one line.

    Every character with a meaning in Markdown or in Streamlit's Markdown extensions is
    backslash-escaped (links, images, emphasis, headings, lists, tables, HTML, colour
    and icon directives, math), and line breaks become spaces so a note cannot start a
    new paragraph that looks like part of the page. None becomes "".
    """
    if text is None:
        return ""
    text = _LINE_BREAKS.sub(" ", str(text))
    text = _ANYWHERE.sub(r"\\\1", text)
    text = _BOUNDARY_UNDERSCORE.sub(r"\\_", text)
    text = _WWW_DOT.sub(r"\\.", text)
    return _LEADING.sub(_escape_leading, text)


def _escape_leading(match: re.Match) -> str:
    """``- x`` -> ``\\- x``; ``12. x`` -> ``12\\. x`` (the dot or bracket after the number is escaped)."""
    space, mark = match.group(1), match.group(2)
    return space + (mark + "\\" if mark[0].isdigit() else "\\" + mark)
