"""Which layers get a target and how a round's residuals reach the written layers: the
``editing.strategy`` axis, the same for every least-squares method (docs/algorithms.md, "BLUE").

- ``distribute``: one target ``z`` at the last critical layer ``l_m``; each layer ``l_i`` of
  ``ℛ = [l_1 .. l_m]`` in turn gets the method's share of ``z − v^{l_m}``
  (``method.spread``; MEMIT: ``(z − v) / (m − i)``), ``v`` re-read after each earlier write.
- ``boundary`` (BLUE): only ``l_1`` and ``l_m`` are written, each with a target optimized at that
  layer and its whole residual ``z^l − v^l``.

``v`` is the block output ``h`` or, when the method's residuals live there, the ``W_out`` output
``m``. Each function runs one round on an :class:`~blueedit.editing.editor.Editor` and writes
through :meth:`~blueedit.editing.editor.Editor.write`.
"""

from __future__ import annotations

from collections.abc import Callable

from blueedit.data.records import EditRequest


def distribute(editor, requests: list[EditRequest], report) -> None:
    layers = editor.hp.layers
    last = layers[-1]
    z = editor.round_target(requests, last, report).T  # [d, B]
    for i, l in enumerate(layers):
        keys, values = editor.keys_and_values(requests, l, last)
        residuals = editor.method.spread(z, values, i, len(layers))
        editor.write(requests, l, last, residuals, keys, report)


def boundary(editor, requests: list[EditRequest], report) -> None:
    for l in editor.hp.edited_layers:
        z = editor.round_target(requests, l, report).T
        keys, values = editor.current_values(requests, l)
        editor.write(requests, l, l, z - values, keys, report)


#: ``editing.strategy`` -> the round it runs
STRATEGIES: dict[str, Callable] = {"distribute": distribute, "boundary": boundary}
