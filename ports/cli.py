"""Command-line helpers shared by every port's (and, through its config, every reference's) CLI."""

from __future__ import annotations

from typing import Any

FLAG_VALUES = {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False}


def parse_flag(key: str, value: Any) -> bool:
    """A run-level switch (``resume=``, ``overwrite=``, ``progress=``): true/false/1/0/yes/no in any case.

    Anything else is refused rather than read as False: ``resume=ture`` once restarted a run and wrote
    over its 8-epoch checkpoint."""
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text not in FLAG_VALUES:
        raise ValueError(f"{key}={value!r}: expected true or false (or 1/0, yes/no; any case)")
    return FLAG_VALUES[text]
