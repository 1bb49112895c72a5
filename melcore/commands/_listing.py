"""What the listing commands (``jobs list``, ``runs list``) share: a dataset argument and the output."""

from __future__ import annotations

import json
import sys
from typing import Callable, Sequence


def dataset_arg(store, value: str) -> dict:
    """The registered dataset named ``value``, or with that id when it is all digits."""
    return store.get_dataset(int(value) if value.isdigit() else value)


def print_listing(
    rows: Sequence[dict], keys: Sequence[str], line: Callable[[dict], str], *, as_json: bool, what: str
) -> None:
    """``rows`` as one JSON array of ``keys``, or one ``line(row)`` each (``no <what>`` on stderr when empty)."""
    if as_json:
        print(json.dumps([{k: row.get(k) for k in keys} for row in rows], default=str))
        return
    for row in rows:
        print(line(row))
    if not rows:
        print(f"no {what}", file=sys.stderr)
