"""Per-round updates ΔW of every method × strategy on a tiny random model, as digests.

``tests/test_pinned_deltas.py`` compares a fresh run with ``tests/fixtures/pinned_deltas.json``;
``python tests/pinned_deltas.py`` rewrites that file (run it only when a change of the edit is
intended, and say why in the commit).

A digest of a tensor ``T`` is its Frobenius norm ``‖T‖``, its sum and four projections
``⟨T, G_k⟩`` on fixed standard-normal matrices ``G_k`` (seeded by ``k``): a change of ``T`` by
``E`` moves a projection by about ``‖E‖``, so comparing projections to ``~1e-6 ‖T‖`` pins ``T`` to
float round-off without storing it.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

from helpers import CORPUS, make_model, make_tokenizer  # noqa: E402

FIXTURE = HERE / "fixtures" / "pinned_deltas.json"
TEMPLATES = ["{}", "Because I said so. {}"]
LAYERS = [1, 2, 3]
ROUNDS = 2
PROJECTIONS = 4

LEAST_SQUARES = ("memit", "alphaedit", "prune", "rect", "pmet", "hse")
#: name -> (method, strategy, extra EditingConfig fields, extra TargetConfig fields)
CASES: dict[str, tuple[str, str, dict, dict]] = {
    f"{m}/{s}": ("memit" if m == "hse" else m, s,
                 {"history_schedule": "inverse"} if m == "hse" else {},
                 {"forget_weight": 0.25, "fisher_weight": 1.0, "fisher_estimator": "full"} if m == "hse" else {})
    for m in LEAST_SQUARES for s in ("distribute", "boundary")
}
CASES.update({
    "memit_site_mlp/boundary": ("memit", "boundary", {}, {"site": "mlp"}),
    "memit_no_history/distribute": ("memit", "distribute", {"use_history": False}, {}),
    "memit_reference_path/distribute": ("memit", "distribute", {"optimize": False}, {}),
    "memit_micro_batches/boundary": ("memit", "boundary", {"max_batch_tokens": 16}, {}),
    "hse_diagonal/boundary": ("memit", "boundary", {}, {"forget_weight": 0.25, "fisher_weight": 1.0}),
    "pmet_top1_exit/distribute": ("pmet", "distribute", {}, {"top1_nll_factor": 0.1}),
    "prune_current/distribute": ("prune", "distribute", {"prune_base": "current"}, {}),
    # benchmarks/vs_published.py's MEMIT and MEMIT + BLUE settings (the TargetConfig defaults: 25 steps)
    "memit_published_settings/distribute": ("memit", "distribute", {}, {"v_num_grad_steps": 25}),
    "memit_published_settings/boundary": ("memit", "boundary", {}, {"v_num_grad_steps": 25}),
    "wise/distribute": ("wise", "distribute", {}, {}),
})


def _requests():
    from blueedit.data.records import EditRequest

    return [
        EditRequest(10, "{} plays the", "Toko Yasuda", "violin", "guitar"),
        EditRequest(11, "The mother tongue of {} is", "Thomas Joannes Stieltjes", "French", "Dutch"),
        EditRequest(12, "{} is located in", "Autonomous University of Madrid", "Tokyo Beijing", "Spain"),
        EditRequest(13, "{} is in", "The Eiffel Tower", "Rome", "Paris"),
    ]


def digest(t: torch.Tensor) -> list[float]:
    """``[‖T‖, ΣT, ⟨T, G_1⟩ .. ⟨T, G_4⟩]`` of ``t`` in float64."""
    t = t.detach().to(torch.float64).cpu()
    out = [float(t.norm()), float(t.sum())]
    for k in range(PROJECTIONS):
        g = torch.randn(t.shape, generator=torch.Generator().manual_seed(k), dtype=torch.float64)
        out.append(float((t * g).sum()))
    return out


def _mom2(model, adapter, tok, layers):
    from blueedit.editing.statistics import accumulate_key_moments

    st = accumulate_key_moments(model, adapter, tok, CORPUS, layers, max_length=32, batch_size=4)
    return {l: (st["sums"][l] / st["count"]).float() for l in layers}


def _config(name: str):
    from blueedit.editing.editor import EditingConfig
    from blueedit.editing.targets import TargetConfig
    from blueedit.editing.wise import WiseConfig

    method, strategy, extra, target = CASES[name]
    if method == "wise":
        wise = WiseConfig(alpha=0.05, beta=0.5, gamma=0.3, n_iter=5, lr=100.0, mask_ratio=0.5, shard_size=2,
                          merge_every=2)
        return EditingConfig(method="wise", layers=[LAYERS[-1]], wise=wise)
    return EditingConfig(method=method, strategy=strategy, layers=list(LAYERS),
                         target=TargetConfig(**{"v_num_grad_steps": 3, "v_lr": 0.5, **target}), **extra)


def _wise_digests(model, tok, hp) -> dict[str, list[float]]:
    from blueedit.editing.wise import WiseEditor
    from blueedit.models.adapters import ModelAdapter

    editor = WiseEditor(model, tok, ModelAdapter(model), hp, TEMPLATES, ["The Eiffel Tower is in Paris",
                                                                         "Google makes Android"])
    out = {}
    requests = _requests()
    per = len(requests) // ROUNDS
    for r in range(ROUNDS):
        editor.edit_round(requests[r * per:(r + 1) * per], r)
        st = editor.state
        for i, m in enumerate(st.memories + st.shards + ([st.current] if st.current is not None else [])):
            out[f"round{r}/side{i}"] = digest(m - st.original)
    return out


def case_digests(name: str) -> dict[str, list[float]]:
    """Digests of the case's per-round ``ΔW^l`` (``round{r}/layer{l}``), the history keys and the
    weights after finalizing (``final/layer{l}``: ``W − W_0``); WISE: its side memories."""
    from blueedit.editing.editor import Editor
    from blueedit.models.adapters import ModelAdapter

    torch.manual_seed(0)
    model, tok = make_model("llama"), make_tokenizer()
    hp = _config(name)
    if hp.method == "wise":
        return _wise_digests(model, tok, hp)
    adapter = ModelAdapter(model)
    editor = Editor(model, tok, adapter, hp, _mom2(model, adapter, tok, hp.edited_layers), TEMPLATES,
                    total_rounds=ROUNDS)
    requests = _requests()
    per = len(requests) // ROUNDS
    for r in range(ROUNDS):
        editor.edit_round(requests[r * per:(r + 1) * per], r)
    out = {}
    for r, updates in enumerate(editor.state.updates):
        for l, u in sorted(updates.items()):
            out[f"round{r}/layer{l}"] = digest(u.delta())
            out[f"round{r}/keys{l}"] = digest(u.keys)
    editor.finalize()
    for l in hp.edited_layers:
        out[f"final/layer{l}"] = digest(adapter.get_w_out(l).double() - editor.state.original[l].double())
    return out


def all_digests() -> dict[str, dict[str, list[float]]]:
    torch.set_num_threads(1)
    return {name: case_digests(name) for name in CASES}


if __name__ == "__main__":
    FIXTURE.parent.mkdir(parents=True, exist_ok=True)
    FIXTURE.write_text(json.dumps(all_digests(), indent=1, sort_keys=True) + "\n")
    print(f"wrote {FIXTURE}")
