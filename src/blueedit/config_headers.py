"""What the header comments of a config file say about where its settings come from.

Every model config under ``configs/<model>/`` says in its header where its layers and
hyperparameters come from, in one of three forms:

- ``# Published: <owner/repo> <path> @ <commit>``: a published hyperparameter file;
- ``# Located: ...``: found on the real weights (``blueedit locate``, a layer sweep);
- ``# needs-locate: ...``: no published settings exist for this model and method, and the layers
  are a placeholder. ``blueedit fit`` and ``edit`` warn (:class:`PlaceholderLayersWarning`) while
  such a file's layers are the ones in use; passing the layers ``blueedit locate`` found on the
  real weights (``--model.editing.layers``) silences it.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import yaml

#: The header line that marks a config whose layers are a placeholder.
NEEDS_LOCATE = "# needs-locate:"

#: A published source: ``# Published: owner/repo path/in/repo @ <40 hex digits>``.
PUBLISHED = re.compile(r"^# Published: (?P<repo>[\w.-]+/[\w.-]+) (?P<path>\S+) @ (?P<commit>[0-9a-f]{40})\b", re.M)


class PlaceholderLayersWarning(UserWarning):
    """A run uses the placeholder layers of a config marked ``needs-locate``."""


def header(text: str) -> list[str]:
    """The comment lines at the top of a YAML text, up to its first key."""
    lines = []
    for line in text.splitlines():
        if not line.startswith("#"):
            break
        lines.append(line)
    return lines


def placeholder_layers(text: str) -> list[int] | None:
    """The ``model.editing.layers`` of a config marked ``needs-locate`` (``None`` when it is not
    marked, or sets no layers)."""
    if not any(line.startswith(NEEDS_LOCATE) for line in header(text)):
        return None
    editing = ((yaml.safe_load(text) or {}).get("model") or {}).get("editing") or {}
    layers = editing.get("layers")
    return [int(layer) for layer in layers] if layers is not None else None


def placeholder_warnings(configs: Iterable[tuple[str, str]], layers: Sequence[int] | None) -> list[str]:
    """One message per ``(name, text)`` config that is marked ``needs-locate`` and whose layers
    are ``layers``, the layers the run will edit."""
    if layers is None:
        return []
    used = [int(layer) for layer in layers]
    return [f"{name} is marked needs-locate: its layers {used} are a placeholder, not located on this model's "
            f"weights; run `blueedit locate --model <the model>` and pass the layers it finds "
            f"(--model.editing.layers '[...]')"
            for name, text in configs if placeholder_layers(text) == used]


def read_config_files(paths: Iterable[Any]) -> list[tuple[str, str]]:
    """``(name, text)`` of the ``--config`` files a command was given (paths or jsonargparse's
    ``Path`` objects; ones that cannot be read are skipped: the parser has read them already)."""
    out = []
    for path in paths or []:
        try:
            text = path.get_content() if hasattr(path, "get_content") else Path(os.fspath(path)).read_text()
        except (OSError, TypeError, ValueError):
            continue
        out.append((str(path), text))
    return out


def warn_placeholder_layers(config_files: Iterable[Any], layers: Sequence[int] | None) -> None:
    """Warn (once, on rank zero) for each ``--config`` file marked ``needs-locate`` whose layers
    the run is about to edit."""
    from lightning.pytorch.utilities import rank_zero_warn

    for message in placeholder_warnings(read_config_files(config_files), layers):
        rank_zero_warn(message, category=PlaceholderLayersWarning)
