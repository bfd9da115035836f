"""Shared pieces of the configuration dataclasses: the dtype names and the choice check."""

from __future__ import annotations

from typing import Any, Literal, get_args

#: The floating-point dtypes a model, a compute copy or the statistics may use.
Dtype = Literal["float32", "bfloat16", "float16"]


def check_choice(option: str, value: Any, choices: Any, optional: bool = False) -> None:
    """Raise a ``ValueError`` naming ``option`` when ``value`` is not one of the ``Literal``
    ``choices`` (or ``None`` when ``optional``).

    jsonargparse checks the same ``Literal`` when it parses a config; this check covers the
    dataclasses built in Python, from their ``__post_init__``."""
    allowed = get_args(choices)
    if value in allowed or (optional and value is None):
        return
    shown = ", ".join(repr(a) for a in allowed) + (" or null" if optional else "")
    raise ValueError(f"{option} {value!r} is not one of {shown}")
