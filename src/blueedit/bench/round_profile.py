"""Where an editing round spends its time: CPU seconds and linear-layer FLOPs per phase.

:class:`RoundProfile` wraps the engine's steps while it is active (nothing is changed outside the
``with`` block):

- ``target l: prefix cache``: the pass over the prompts' constant prefixes (``Chunk``);
- ``target l: forward``: the passes with ``δ`` injected (``chunk_loss``: blocks ``l..L``, the final
  norm and ``lm_head`` at the read positions, the loss terms);
- ``target l: backward``: ``loss.backward()`` (gradients of ``δ`` only: the weights are frozen);
- ``target l: other``: the rest of the target optimization (Adam, clamping, exits);
- ``keys and values``: the keys ``k`` and current values ``v`` at the written layers;
- ``solve and write``: the method's solve and the weight update.

FLOPs are counted for ``nn.Linear`` calls only (``2 · tokens · in · out`` per call; attention
scores and element-wise work are left out); a backward pass through frozen weights costs the same
as its forward (``∂L/∂x = ∂L/∂y · W``), so its linear FLOPs are taken equal to the forward's.
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Callable
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn


class RoundProfile:
    """``with RoundProfile() as prof: editor.edit_round(...)`` then ``prof.rows()``.

    Times are this process's CPU seconds (``time.process_time``): with one thread, the time on a
    quiet core. Phases nest (a forward pass inside a target optimization): each phase's own time
    excludes the phases inside it, so the rows add up to the profiled total.
    """

    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)
        self.flops: dict[str, float] = defaultdict(float)
        self.calls: dict[str, int] = defaultdict(int)
        self.layer: int | None = None
        self._stack: list[list[Any]] = []  # [phase, start, time of the phases inside]
        self._undo: list[Callable[[], None]] = []

    # -- phases ------------------------------------------------------------------------------------
    def _name(self, phase: str) -> str:
        return f"target {self.layer}: {phase}" if phase in ("prefix cache", "forward", "backward", "other") else phase

    @contextmanager
    def phase(self, phase: str):
        """Time ``phase`` (its own CPU seconds, without the phases nested in it)."""
        name = self._name(phase)
        self._stack.append([name, time.process_time(), 0.0])
        try:
            yield
        finally:
            name, start, inner = self._stack.pop()
            spent = time.process_time() - start
            self.seconds[name] += spent - inner
            self.calls[name] += 1
            if self._stack:
                self._stack[-1][2] += spent

    def _wrap(self, owner: Any, attr: str, phase: str | Callable[[tuple], str], before=None) -> None:
        original = getattr(owner, attr)

        def wrapped(*args, **kwargs):
            if before is not None:
                before(args)
            with self.phase(phase(args) if callable(phase) else phase):
                return original(*args, **kwargs)

        setattr(owner, attr, wrapped)
        self._undo.append(lambda: setattr(owner, attr, original))

    def _set_layer(self, args: tuple) -> None:
        self.layer = args[2]  # Editor.round_target(self, requests, layer, report)

    def _count_linear(self, module: nn.Module, args: tuple, output: Any) -> None:
        if isinstance(module, nn.Linear) and self._stack and isinstance(output, torch.Tensor):
            tokens = output.numel() // module.out_features
            self.flops[self._stack[-1][0]] += 2.0 * tokens * module.in_features * module.out_features

    def __enter__(self) -> RoundProfile:
        import blueedit.editing.targets as targets
        from blueedit.editing.editor import Editor

        self._wrap(Editor, "round_target", "other", before=self._set_layer)
        self._wrap(targets, "Chunk", "prefix cache")
        self._wrap(targets, "chunk_loss", "forward")
        self._wrap(torch.Tensor, "backward", "backward")
        self._wrap(Editor, "keys_and_values", "keys and values")
        self._wrap(Editor, "current_values", "keys and values")
        self._wrap(Editor, "write", "solve and write")
        handle = nn.modules.module.register_module_forward_hook(self._count_linear)
        self._undo.append(handle.remove)
        return self

    def __exit__(self, *exc) -> None:
        while self._undo:
            self._undo.pop()()

    # -- the table ---------------------------------------------------------------------------------
    def rows(self, total_seconds: float, peak_flops: float) -> list[dict[str, Any]]:
        """One row per phase: own CPU seconds, share of ``total_seconds``, linear GFLOP, achieved
        GFLOP/s and that rate as a fraction of ``peak_flops`` (a measured matmul rate). A backward
        phase is credited with the linear FLOPs of the forward phase of its layer."""
        out = []
        for name, seconds in sorted(self.seconds.items(), key=lambda kv: -kv[1]):
            flops = self.flops.get(name, 0.0)
            if name.endswith(": backward"):
                flops = self.flops.get(name.replace(": backward", ": forward"), 0.0)
            rate = flops / seconds if seconds > 0 else 0.0
            out.append({"phase": name, "calls": self.calls[name], "cpu_seconds": seconds,
                        "share": seconds / total_seconds if total_seconds > 0 else float("nan"),
                        "gflop": flops / 1e9, "gflop_per_s": rate / 1e9,
                        "fraction_of_peak": rate / peak_flops if flops and peak_flops > 0 else None})
        rest = total_seconds - sum(self.seconds.values())
        out.append({"phase": "rest of the rounds", "calls": 0, "cpu_seconds": rest,
                    "share": rest / total_seconds if total_seconds > 0 else float("nan"), "gflop": 0.0,
                    "gflop_per_s": 0.0, "fraction_of_peak": None})
        return out


def shaped_matmul_rate(dtype: torch.dtype, m: int, k: int, n: int, seconds: float = 1.0) -> float:
    """Measured FLOP/s (per CPU second) of ``[m, k] @ [k, n]`` in ``dtype``: the rate the model's
    own layer shapes can reach on this CPU."""
    a, b = torch.randn(m, k).to(dtype), torch.randn(k, n).to(dtype)
    for _ in range(3):
        a @ b
    reps, t0 = 0, time.process_time()
    while time.process_time() - t0 < seconds:
        a @ b
        reps += 1
    return 2.0 * m * k * n * reps / (time.process_time() - t0)


def markdown(rows: list[dict[str, Any]], peak_label: str) -> str:
    lines = ["| phase | calls | CPU s | share | linear GFLOP | GFLOP/s | of " + peak_label + " |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        frac = f"{100 * r['fraction_of_peak']:.0f} %" if r["fraction_of_peak"] is not None else "-"
        lines.append(f"| {r['phase']} | {r['calls']} | {r['cpu_seconds']:.1f} | {100 * r['share']:.1f} % | "
                     f"{r['gflop']:.0f} | {r['gflop_per_s']:.1f} | {frac} |")
    return "\n".join(lines)
