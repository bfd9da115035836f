"""An edited model directory carries its editor state: continue editing it later, or undo rounds.

``blueedit edit --output DIR`` writes, beside the model, ``DIR/editor_state.safetensors``:

- the edit history ``H^l``, AlphaEdit's projections ``P^l``, the weights ``W_0^l`` of the edited
  layers before the first round (PRUNE's original weights), the round count, the context
  templates, and each round's update as low-rank factors (:mod:`blueedit.editing.updates`);
- in its metadata: the base model's name and content fingerprint, the cache keys of its key
  statistics ``C_0``, the settings that decide the edit, where the edited matrices lie in the
  model's safetensors files, and the SHA-256 of every tensor of the file. The checksums are
  verified whenever the state is read (continue, revert, generate): a damaged file is refused,
  naming the tensor, before anything is used or written. The file is written to a temporary
  name and renamed into place.

A later ``blueedit edit`` or ``fit`` with ``model.name_or_path: DIR`` continues as if all rounds
had been one run (:func:`prepare_continuation`): the base weights are put back into the edited
layers for as long as ``C_0`` is read (from the cache, by its key; recomputed on the *base*
weights when the cache lacks it), never on the edited ones. ``blueedit revert DIR --rounds k``
(:func:`revert`) returns DIR to its state before its last ``k`` rounds. See
``docs/algorithms.md``, "Carrying an edited model forward and undoing rounds".
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import shutil
import uuid
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from blueedit.config import UserInputError, settings_in_roles
from blueedit.editing import solvers
from blueedit.editing.editor import EditorState
from blueedit.editing.updates import LayerUpdate, replay_history, replay_weights, round_nbytes

#: The editor state's file name inside an edited model directory.
STATE_FILE = "editor_state.safetensors"
#: Version of the file's layout.
STATE_FORMAT = "blueedit-editor-state-v1"

#: Settings that may differ between sittings: they change how fast new rounds run, how their targets
#: are optimized, or where the model is read from, never the saved state or ``C_0`` (field metadata
#: roles ``speed``, ``round`` and ``source``, :func:`blueedit.config.setting`).
FREE_SETTINGS = settings_in_roles("speed", "round", "source")


class CarryError(UserInputError):
    """An edited model directory's editor state is missing, damaged, or does not fit this run."""


def tolerance(dtype: torch.dtype, scale: float) -> float:
    """How far rebuilt weights may be from the saved ones: 4 units in the last place of
    ``dtype`` at magnitude ``scale`` (the largest entry). On one machine they are bit-identical."""
    return 4 * torch.finfo(dtype).eps * max(scale, 1e-30)


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.to(torch.float64) - b.to(torch.float64)).abs().max()) if a.numel() else 0.0


def state_path(directory: str | Path) -> Path:
    return Path(directory).expanduser() / STATE_FILE


def has_state(name_or_path: str | Path | None) -> bool:
    """Whether ``name_or_path`` is a local directory holding an editor state."""
    if not name_or_path:
        return False
    try:
        return state_path(name_or_path).is_file()
    except (OSError, ValueError):
        return False


# -- the file ---------------------------------------------------------------------------------
def write_state(path: str | Path, state: EditorState, meta: dict[str, Any]) -> int:
    """Write ``state`` and ``meta`` to the safetensors file ``path``, with the SHA-256 of every
    tensor in its metadata, atomically (a temporary file renamed into place); returns its size in
    bytes."""
    from safetensors.torch import save_file

    from blueedit.editing.statistics import atomic_write
    from blueedit.models.loading import entry_digests

    tensors: dict[str, torch.Tensor] = {}
    for group in ("history", "projection", "original", "fisher"):
        for l, t in getattr(state, group).items():
            tensors[f"{group}.{l}"] = t.detach().cpu().contiguous()
    for r, updates in enumerate(state.updates):
        for l, u in updates.items():
            tensors[f"round.{r}.{l}.left"] = u.left.detach().cpu().contiguous()
            if u.right is not None:
                tensors[f"round.{r}.{l}.right"] = u.right.detach().cpu().contiguous()
            tensors[f"round.{r}.{l}.keys"] = u.keys.detach().cpu().contiguous()
    header = {
        "format": STATE_FORMAT,
        "rounds_done": str(state.rounds_done),
        "finalized": json.dumps(state.finalized),
        "context_templates": json.dumps(list(state.context_templates)),
        "total_rounds": json.dumps(state.total_rounds),
        "refused_rounds": json.dumps([r for r, updates in enumerate(state.updates) if not updates]),
        "meta": json.dumps(meta, default=str),
    }
    header["metadata_sha256"] = json.dumps(entry_digests(header))
    header["sha256"] = json.dumps(entry_digests(tensors))
    atomic_write(Path(path), lambda tmp: save_file(tensors, str(tmp), metadata=header))
    return Path(path).stat().st_size


def read_header(directory: str | Path) -> dict[str, Any]:
    """The metadata of ``DIR``'s editor state (no tensors read), each entry verified against its
    recorded SHA-256: ``meta`` plus ``rounds_done``, ``finalized``, ``context_templates``,
    ``total_rounds`` and ``sha256`` (the tensors' checksums, ``None`` in older files)."""
    from safetensors import safe_open

    from blueedit.models.loading import verify_digests

    path = state_path(directory)
    if not path.is_file():
        raise CarryError(f"{directory} holds no editor state ({STATE_FILE}); it was not written by "
                         "`blueedit edit --output` of this version")
    try:
        with safe_open(str(path), framework="pt") as f:
            header = dict(f.metadata() or {})
    except Exception as e:  # damaged or not safetensors
        raise CarryError(f"{path} is unreadable ({type(e).__name__}: {e})") from None
    if header.get("format") != STATE_FORMAT:
        raise CarryError(f"{path} has format {header.get('format')!r}, this blueedit reads {STATE_FORMAT!r}")
    recorded = header.pop("metadata_sha256", None)
    tensor_digests = header.pop("sha256", None)
    verify_digests(path, header, None if recorded is None else json.loads(recorded), kind="metadata entry")
    return {"meta": json.loads(header["meta"]), "rounds_done": int(header["rounds_done"]),
            "finalized": json.loads(header["finalized"]),
            "context_templates": json.loads(header["context_templates"]),
            "total_rounds": json.loads(header.get("total_rounds", "null")),
            "sha256": None if tensor_digests is None else json.loads(tensor_digests),
            "refused_rounds": json.loads(header.get("refused_rounds", "[]"))}


def read_state(directory: str | Path) -> tuple[EditorState, dict[str, Any]]:
    """``(state, meta)`` of ``DIR``'s editor state, every tensor verified against its recorded
    SHA-256 (:class:`~blueedit.models.loading.ChecksumError` names the tensor at fault)."""
    from safetensors.torch import load_file

    from blueedit.models.loading import verify_digests

    header = read_header(directory)
    path = state_path(directory)
    try:
        tensors = load_file(str(path))
    except Exception as e:  # a damaged header or truncated data
        raise CarryError(f"{path} is unreadable ({type(e).__name__}: {e}); nothing was used or written") from None
    verify_digests(path, tensors, header["sha256"])
    state = EditorState(context_templates=header["context_templates"], rounds_done=header["rounds_done"],
                        finalized=header["finalized"], total_rounds=header["total_rounds"])
    rounds: dict[int, dict[int, dict[str, torch.Tensor]]] = {}
    for name, t in tensors.items():
        parts = name.split(".")
        if parts[0] in ("history", "projection", "original", "fisher"):
            getattr(state, parts[0])[int(parts[1])] = t
        elif parts[0] == "round":
            rounds.setdefault(int(parts[1]), {}).setdefault(int(parts[2]), {})[parts[3]] = t
    for r in header["refused_rounds"]:  # rounds refused by a health gate: no update
        rounds.setdefault(int(r), {})
    if sorted(rounds) != list(range(len(rounds))) or len(rounds) != state.rounds_done:
        raise CarryError(f"{state_path(directory)} holds updates of rounds {sorted(rounds)} for "
                         f"{state.rounds_done} rounds done: the file is damaged")
    state.updates = [{l: LayerUpdate(u["left"], u.get("right"), u["keys"]) for l, u in sorted(rounds[r].items())}
                     for r in range(len(rounds))]
    return state, header["meta"]


# -- settings -------------------------------------------------------------------------------------
def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        name = f"{prefix}{k}"
        if name in FREE_SETTINGS:
            continue
        if isinstance(v, dict):
            out.update(_flatten(v, name + "."))
        else:
            out[name] = v
    return out


def check_settings(directory: str | Path, saved: dict[str, Any], now: dict[str, Any]) -> None:
    """Refuse, naming every difference, to continue ``DIR`` with settings that change the saved
    state or ``C_0`` (method, strategy, layers, λ, ..., the statistics, the model's dtype).
    ``saved``/``now``: ``{"model": ..., "editing": ..., "stats": ...}`` as plain values."""
    from dataclasses import asdict

    from blueedit.editing.editor import EditingConfig
    from blueedit.editing.statistics import StatsConfig

    plain = lambda d: _flatten(json.loads(json.dumps(d, default=str)))  # noqa: E731
    a, b = plain(saved), plain(now)
    # a setting added to blueedit after DIR was saved had its default value then
    defaults = plain({"editing": asdict(EditingConfig()), "stats": asdict(StatsConfig())})
    a = {**{k: v for k, v in defaults.items() if k in b}, **a}
    diffs = [f"{k}: {a.get(k, '<absent>')!r} in {directory}, {b.get(k, '<absent>')!r} now"
             for k in sorted(set(a) | set(b)) if a.get(k, "<absent>") != b.get(k, "<absent>")]
    if diffs:
        raise CarryError(f"{directory} was edited with other settings; continuing it needs the same ones "
                         "(or start from its base model): " + "; ".join(diffs))


# -- saving ---------------------------------------------------------------------------------------
def whole_model_fingerprint(model, tokenizer, adapter) -> str:
    """A fingerprint of everything the model computes (every weight, the config, the tokenizer)."""
    from blueedit.models.loading import model_content_fingerprints

    last = adapter.num_layers - 1
    return model_content_fingerprints(model, tokenizer, [last], blocks=adapter.layout.blocks)[last]


@contextmanager
def base_weights(adapter, original: dict[int, torch.Tensor]):
    """Temporarily put the weights ``W_0^l`` before the first round back into the edited layers."""
    saved = {l: adapter.get_w_out(l) for l in original}
    try:
        for l, w in original.items():
            adapter.set_w_out(l, w)
        yield
    finally:
        for l, w in saved.items():
            adapter.set_w_out(l, w)


def _weight_files(directory: Path) -> dict[str, str]:
    """Tensor name -> safetensors file (relative) of a saved Hugging Face model."""
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        return dict(json.loads(index.read_text())["weight_map"])
    single = directory / "model.safetensors"
    if not single.is_file():
        return {}
    from safetensors import safe_open

    with safe_open(str(single), framework="pt") as f:
        return {k: "model.safetensors" for k in f.keys()}


def save_state(directory: str | Path, module) -> dict[str, Any]:
    """Write the editor state of ``module`` (an :class:`~blueedit.module.EditingModule` after
    editing) into ``directory`` (the model already saved there). Returns a summary: ``bytes`` of
    the file, ``rounds``, ``bytes_per_round`` (mean), ``fixed_bytes`` (H, P, W_0)."""
    directory = Path(directory)
    editor = module.editor
    state, adapter = editor.state, module.adapter
    if len(state.updates) != state.rounds_done:
        raise CarryError(f"the editor holds the updates of {len(state.updates)} of its {state.rounds_done} rounds "
                         "(resumed from a checkpoint written by an older blueedit)")
    carried = getattr(module, "carried", None)
    if carried is not None:  # a continuation: the base is the one the directory it continues was edited from
        base_name, base_fp = carried.meta["base_model"], carried.meta["base_fingerprint"]
    else:
        base_name = module.model_spec.name_or_path
        with base_weights(adapter, state.original):
            base_fp = whole_model_fingerprint(module.lm, module.tokenizer, adapter)
    files = _weight_files(directory)
    weights = {}
    for l in state.original:
        name = f"{adapter.layout.blocks}.{l}.{adapter.layout.w_out}.weight"
        weights[str(l)] = {"name": name, "file": files.get(name), "transposed": adapter.layout.transposed}
    meta = {
        "base_model": base_name,
        "base_fingerprint": base_fp,
        "settings": module.settings_fingerprint(),
        "stats_keys": {str(l): k for l, k in (getattr(module, "stats_keys", None) or {}).items()},
        "stats_model_id": getattr(module, "stats_model_id", None),
        "weights": weights,
        "method": module.hp.method,
        "prune_base": module.hp.prune_base,
        "layers": list(state.original),
    }
    size = write_state(directory / STATE_FILE, state, meta)
    per_round = [round_nbytes(u) for u in state.updates]
    fixed = sum(t.numel() * t.element_size() for g in (state.history, state.projection, state.original)
                for t in g.values())
    return {"bytes": size, "rounds": len(per_round), "fixed_bytes": fixed,
            "bytes_per_round": sum(per_round) / len(per_round) if per_round else 0.0}


def describe_saved(summary: dict[str, Any]) -> str:
    mb = lambda n: f"{n / 2**20:.1f} MB"  # noqa: E731
    return (f"editor state: {mb(summary['bytes'])} ({mb(summary['fixed_bytes'])} for H, P and W_0; "
            f"{summary['rounds']} rounds at {summary['bytes_per_round'] / 1024:.1f} KiB per round)")


# -- continuing -----------------------------------------------------------------------------------
def working_weights(state: EditorState) -> dict[int, torch.Tensor]:
    """The weights of the edited layers the next round starts from: ``W_0`` plus every round's
    update (for PRUNE: before its restraint, which the last round of the whole run applies)."""
    return {l: replay_weights(w0, state.updates, l) for l, w0 in state.original.items()}


def saved_weights(state: EditorState, prune_base: str) -> dict[int, torch.Tensor]:
    """The weights DIR holds for this state: :func:`working_weights`, restrained once when the
    state was finalized (PRUNE)."""
    work = working_weights(state)
    if state.finalized:
        return {l: solvers.prune_postprocess(state.original[l], w, prune_base) for l, w in work.items()}
    return work


def check_weights(directory, expected: dict[int, torch.Tensor], actual: dict[int, torch.Tensor]) -> None:
    """Refuse a directory whose edited matrices are not what its editor state rebuilds."""
    for l, w in expected.items():
        diff, tol = max_diff(w, actual[l]), tolerance(w.dtype, float(w.abs().max()))
        if diff > tol:
            raise CarryError(f"{directory}: W_out of layer {l} differs from what its editor state rebuilds "
                             f"(max |Δ| {diff:.3g} > {tol:.3g}); the weights were changed after editing "
                             "(the editor state file itself passed its checksums)")


@dataclass
class Continuation:
    """What :func:`prepare_continuation` reads from DIR."""

    state: EditorState
    meta: dict[str, Any]
    record: dict[str, Any] = field(default_factory=dict)


def load_continuation(directory: str | Path, settings_now: dict[str, Any]) -> Continuation:
    """Read DIR's editor state and check that this run's settings fit it (before any slow work)."""
    header = read_header(directory)
    check_settings(directory, header["meta"]["settings"], settings_now)
    state, meta = read_state(directory)
    edits = Path(directory).expanduser() / "edits.json"
    record = json.loads(edits.read_text()) if edits.is_file() else {}
    return Continuation(state, meta, record)


def prepare_continuation(cont: Continuation, model, tokenizer, adapter, directory) -> dict[int, torch.Tensor]:
    """Check the loaded model is DIR's (its edited matrices are what the state rebuilds, and with
    ``W_0`` put back it is the base model); for a finalized PRUNE state write the unrestrained
    weights into it (the others continue from DIR's weights as they are). Returns ``W_0`` for the
    caller to put back while it reads ``C_0``."""
    state, meta = cont.state, cont.meta
    layers = sorted(state.original)
    current = {l: adapter.get_w_out(l).cpu() for l in layers}
    prune_base = meta.get("prune_base", "original")
    check_weights(directory, saved_weights(state, prune_base), current)
    with base_weights(adapter, state.original):
        fp = whole_model_fingerprint(model, tokenizer, adapter)
    if fp != meta["base_fingerprint"]:
        raise CarryError(f"{directory}: with the edited layers put back to W_0 the model is not the base model "
                         f"{meta['base_model']!r} it was edited from (its fingerprint differs): its other weights, "
                         "config or tokenizer were changed")
    if state.finalized:  # PRUNE: continue from the unrestrained weights; the restraint is applied again at the end
        for l, w in working_weights(state).items():
            adapter.set_w_out(l, w)
        state.finalized = False
    return state.original


# -- revert ---------------------------------------------------------------------------------------
def _rename_exchange(a: Path, b: Path) -> bool:
    """Atomically swap two directories (Linux ``renameat2(RENAME_EXCHANGE)``); False when unavailable."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError):
        return False
    AT_FDCWD, RENAME_EXCHANGE = -100, 2
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    return fn(AT_FDCWD, os.fsencode(a), AT_FDCWD, os.fsencode(b), RENAME_EXCHANGE) == 0


def replace_directory(new: Path, target: Path) -> None:
    """Put the complete directory ``new`` in the place of ``target``: an atomic swap where the
    system has one (then ``target`` is always the old or the new directory), else two renames
    (``target`` is briefly absent, the old one still beside it); the old directory is removed."""
    if _rename_exchange(new, target):
        shutil.rmtree(new, ignore_errors=True)  # now the old one
        return
    old = target.with_name(f".{target.name}.replaced-{uuid.uuid4().hex[:8]}")
    target.rename(old)
    new.rename(target)
    shutil.rmtree(old, ignore_errors=True)


def _link_or_copy(src: Path, dst: Path) -> None:
    if src.is_dir():
        shutil.copytree(src, dst, copy_function=_link_or_copy_file)
    else:
        _link_or_copy_file(src, dst)


def _link_or_copy_file(src, dst) -> None:
    try:  # files are never changed in place, only replaced: a hard link is as good as a copy
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def replayed_history(updates: list, like: dict[int, torch.Tensor]) -> dict[int, torch.Tensor]:
    """The edit history ``H^l`` of every layer of ``like`` rebuilt from the rounds ``updates``
    (in ``like``'s shapes, dtypes and devices)."""
    return {l: replay_history(updates, l, h.shape[0], h.dtype, h.device) for l, h in like.items()}


def refuse_last_round(state: EditorState, adapter) -> dict[int, torch.Tensor]:
    """Undo the last round of ``state`` in place, exactly: its update becomes an empty round (the
    round still counts, so later rounds keep their indices), the edit history ``H^l`` and the
    edited weights are rebuilt from ``W_0`` and the other rounds' stored factors (as
    :func:`revert` does; on one machine bit-identical to the weights before the round), and the
    weights are written through ``adapter``. Returns the weights written.

    Raises :class:`CarryError` for a state that cannot be undone round by round (HSE's Fisher sum,
    PRUNE's restraint already applied, no round yet)."""
    if state.fisher:
        raise CarryError("the last round cannot be refused: HSE's Fisher penalty (target.fisher_weight > 0) keeps "
                         "its information as one sum, not per round")
    if state.finalized:
        raise CarryError("the last round cannot be refused: post-processing (PRUNE) was already applied")
    if not state.updates or not state.updates[-1]:
        raise CarryError("there is no applied round to refuse")
    state.updates[-1] = {}
    state.history = replayed_history(state.updates, state.history)
    weights = working_weights(state)
    for l, w in weights.items():
        adapter.set_w_out(l, w)
    return weights


def revert(directory: str | Path, rounds: int) -> dict[str, Any]:
    """Return ``DIR`` to its state before its last ``rounds`` rounds: the edited matrices in its
    safetensors files, its editor state and ``edits.json``. Written to a new directory beside it
    and swapped in: ``DIR`` is never half-written. Returns a summary (rounds before and after,
    bytes of each removed round's stored update)."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    directory = Path(directory).expanduser().absolute()
    if not directory.is_dir():
        raise CarryError(f"revert: {directory} is not a directory")
    state, meta = read_state(directory)
    n = state.rounds_done
    if state.fisher:
        raise CarryError(f"revert: {directory} was edited with HSE's Fisher penalty (target.fisher_weight > 0), whose "
                         "accumulated Fisher information is stored as one sum, not per round; it cannot be reverted")
    if not isinstance(rounds, int) or not 1 <= rounds <= n:
        raise CarryError(f"--rounds {rounds}: {directory} holds {n} rounds; revert 1..{n} of them")
    prune_base = meta.get("prune_base", "original")
    files = _weight_files(directory)
    weights = meta["weights"]
    for l, where in weights.items():
        if where.get("file") is None or files.get(where["name"]) != where["file"]:
            raise CarryError(f"{directory}: the edited matrix of layer {l} ({where['name']}) is not in its "
                             "safetensors files; revert needs the model as `blueedit edit` saved it")
    # what DIR holds now must be what the state rebuilds (else reverting would not restore anything)
    current = {}
    for l, where in weights.items():
        with safe_open(str(directory / where["file"]), framework="pt") as f:
            w = f.get_tensor(where["name"])
        current[int(l)] = w.t() if where["transposed"] else w
    check_weights(directory, saved_weights(state, prune_base), current)

    keep = n - rounds
    removed = [round_nbytes(u) for u in state.updates[keep:]]
    kept_state = EditorState(history={}, projection=dict(state.projection), original=dict(state.original),
                             rounds_done=keep, context_templates=list(state.context_templates),
                             finalized=state.finalized and keep > 0, updates=state.updates[:keep])
    kept_state.history = replayed_history(kept_state.updates, state.history)
    new_w = saved_weights(kept_state, prune_base) if keep else {l: w.clone() for l, w in state.original.items()}

    tmp = directory.with_name(f".{directory.name}.revert-{uuid.uuid4().hex[:8]}")
    try:
        tmp.mkdir()
        by_file: dict[str, list[str]] = {}
        for l, where in weights.items():
            by_file.setdefault(where["file"], []).append(l)
        for item in directory.iterdir():
            if item.name in by_file or item.name in (STATE_FILE, "edits.json"):
                continue
            _link_or_copy(item, tmp / item.name)
        for fname, layers in by_file.items():
            with safe_open(str(directory / fname), framework="pt") as f:
                file_meta = f.metadata()
                tensors = {k: f.get_tensor(k) for k in f.keys()}
            for l in layers:
                where = weights[l]
                w = new_w[int(l)]
                tensors[where["name"]] = (w.t() if where["transposed"] else w).contiguous()
            save_file(tensors, str(tmp / fname), metadata=file_meta)
        write_state(tmp / STATE_FILE, kept_state, meta)
        edits = directory / "edits.json"
        if edits.is_file():
            record = json.loads(edits.read_text())
            kept_rounds = list(record.get("rounds", []))[:keep]
            record["rounds"] = kept_rounds
            # the requests are listed in the order the rounds edited them (case ids may repeat across sittings)
            record["requests"] = list(record.get("requests", []))[: sum(len(r.get("case_ids", [])) for r in kept_rounds)]
            (tmp / "edits.json").write_text(json.dumps(record, indent=1, default=str))
        replace_directory(tmp, directory)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return {"directory": str(directory), "rounds_before": n, "rounds_after": keep, "reverted": rounds,
            "bytes_per_round": removed}


def revert_main(argv: list[str]) -> None:
    """``blueedit revert DIR --rounds K``."""
    parser = argparse.ArgumentParser(
        prog="blueedit revert", exit_on_error=False,
        description="Return an edited model directory (written by `blueedit edit --output DIR`) to its state "
                    "before its last K rounds: weights, editor state and edits.json.")
    parser.add_argument("directory", help="the edited model directory")
    parser.add_argument("--rounds", type=int, default=1, help="how many of the last rounds to undo (default 1)")
    args = parser.parse_args(argv)
    out = revert(args.directory, args.rounds)
    sizes = out["bytes_per_round"]
    print(f"reverted the last {out['reverted']} of {out['rounds_before']} rounds: {out['directory']} now holds "
          f"{out['rounds_after']} rounds (the undone rounds' stored updates took "
          + ", ".join(f"{b / 1024:.1f} KiB" for b in sizes) + ")")
