"""Shared pieces of the configuration dataclasses: the dtype names, the choice check, and the
field metadata that says which settings decide an edit (:func:`setting`)."""

from __future__ import annotations

from dataclasses import MISSING, field, fields, is_dataclass
from typing import Any, Literal, get_args

class UserInputError(ValueError):
    """A bad option, record, file or directory given by the user: the CLI prints its message on one
    line (exit status 2). Errors from inside the engine keep their own types and tracebacks."""


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
    raise UserInputError(f"{option} {value!r} is not one of {shown}")


# -- which settings decide an edit ------------------------------------------------------------------
#: Field metadata key of a setting's role (:func:`setting`).
ROLE = "blueedit.role"
#: Field metadata key: the setting was added after checkpoints and saved models existed, so at its
#: default it is left out of the settings fingerprint (those older files still resume).
ADDED_LATER = "blueedit.added_later"

#: The roles: ``decides`` (the default): decides the saved state or ``C_0``; must be equal to resume
#: a checkpoint or continue an edited model. ``speed``: only how fast or where caches live; free in
#: both. ``round``: how new rounds find their targets and run their passes, never the saved state;
#: free between sittings of an edited model, equal within one resumed run. ``source``: where the
#: model is read from (a continued model is read from its edited directory); free between sittings.
Role = Literal["decides", "speed", "round", "source"]


def setting(default: Any = MISSING, *, role: Role = "decides", added_later: bool = False,
            default_factory: Any = MISSING) -> Any:
    """A dataclass field with its role in deciding an edit (the one definition the resume check of
    :class:`blueedit.module.EditingModule` and the continuation check of :mod:`blueedit.carry` read)."""
    check_choice("setting role", role, Role)
    return field(default=default, default_factory=default_factory,
                 metadata={ROLE: role, ADDED_LATER: added_later})


def walk_settings(cls: type, prefix: str = "") -> list[tuple[str, Any]]:
    """``(dotted name, dataclass field)`` of every field of ``cls`` and, depth first, of the
    dataclasses its fields default to (``target`` -> ``target.site``, ...)."""
    out = []
    for f in fields(cls):
        name = f"{prefix}{f.name}"
        out.append((name, f))
        value = f.default_factory() if f.default_factory is not MISSING else f.default
        if is_dataclass(value):
            out.extend(walk_settings(type(value), name + "."))
    return out


def setting_groups() -> dict[str, type]:
    """The configuration groups whose settings decide an edit: ``model``, ``editing``, ``stats``."""
    from blueedit.editing.editor import EditingConfig
    from blueedit.editing.statistics import StatsConfig
    from blueedit.models.loading import ModelConfig

    return {"model": ModelConfig, "editing": EditingConfig, "stats": StatsConfig}


def settings_in_roles(*roles: str) -> frozenset[str]:
    """Dotted names (``editing.key_batch_size``) of the settings whose role is one of ``roles``."""
    return frozenset(f"{group}.{name}" for group, cls in setting_groups().items()
                     for name, f in walk_settings(cls) if f.metadata.get(ROLE, "decides") in roles)


def settings_added_later() -> dict[str, Any]:
    """``{dotted name: default}`` of the settings marked ``added_later``."""
    out = {}
    for group, cls in setting_groups().items():
        for name, f in walk_settings(cls):
            if f.metadata.get(ADDED_LATER):
                out[f"{group}.{name}"] = f.default_factory() if f.default_factory is not MISSING else f.default
    return out
