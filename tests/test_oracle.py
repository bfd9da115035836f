"""blueedit against the independent oracle of ``tests/oracle.py`` (which shares only the model and the
tokenizer with blueedit), on tiny random GPT-2 and Llama models.

Every method × strategy is compared on both target paths (``editing.optimize`` true: batched,
prefix-cached; false: the reference loop). The named tests below each pin one detail of
``docs/algorithms.md`` that a plausible change could silently revert: the KL direction, the number
of Adam updates, the key weights, the division by ``m − i``, RECT's ordering, ``loss_layer`` on
both paths, the context-template length and a subject whose last token merges with the next
character. Each named test also checks that the wrong variant is far outside its tolerance, so it
can fail.

Tolerances (relative Frobenius norms; each about 10x the largest difference measured over all
cases of ``test_round_matches_oracle``). Both sides run float32 forward passes; blueedit pads and
batches prompts and, on the fast path, reuses a prefix key/value cache and replays blocks, while
the oracle runs each prompt alone, so every hidden state differs by float32 round-off. Keys,
current values and the history ``H`` involve no optimization: ``TOL_STATE`` 2e-5 (measured ≤ 3.2e-6).
The targets go through a few Adam steps, whose normalized updates amplify round-off in small
gradient components: ``TOL_Z`` 1e-4 (measured ≤ 5e-6). ``R = z − h`` is a difference of nearby
vectors (at later layers of ``distribute`` most of it has already been written), which amplifies
the relative error again, and ΔW and the final float32 weights inherit it: ``TOL_OPT`` 5e-4
(measured ≤ 4.4e-5). Each wrong variant in the named tests differs by more than ``WRONG`` (1e-2).

The models' final norms are scaled by ``SHARPEN`` so that their next-token distributions are far
from uniform: on a plain tiny random model δ hardly moves the output, and the KL direction or the
loss layer would barely change the target.
"""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch

from blueedit.data.records import EditRequest
from blueedit.editing.editor import EditingConfig, Editor
from blueedit.editing.targets import TargetConfig
from blueedit.models.adapters import ModelAdapter
from helpers import CORPUS, make_model, make_tokenizer
from oracle import Model, Oracle, OracleHParams, prune

LAYERS = [1, 2, 3]
TEMPLATES = ["{}", "The a. {}", "Berlin Rome. {}"]
REQUESTS = [
    EditRequest(0, "{} plays the", "Toko Yasuda", "violin", "guitar"),
    EditRequest(1, "The mother tongue of {} is", "Danielle Darrieux", "English", "French"),
]
LAM = 1.0  # small λ: updates large enough that later layers see earlier ones
STEPS = 4
SHARPEN = 10.0  # see sharp_model
TOL_STATE = 2e-5  # keys, hidden states, history: no optimization involved (measured ≤ 3.2e-6)
TOL_Z = 1e-4  # targets z after Adam steps (measured ≤ 5.0e-6)
TOL_OPT = 5e-4  # R = z − h (a difference: cancellation), the ΔW solved from it, final weights (≤ 4.4e-5)
WRONG = 1e-2  # the smallest difference a wrong variant must show


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp(min=1e-30))


# -- inputs shared by both sides --------------------------------------------------------------------------
def key_moments(model, tok, layers) -> dict[int, torch.Tensor]:
    """``C_0^l = E[k kᵀ]`` over every token of the test corpus (computed with the oracle's hooks)."""
    m = Model(model, tok)
    sums = {l: 0.0 for l in layers}
    count = 0
    with torch.no_grad():
        for text in CORPUS:
            _, _, ks = m.run(list(tok(text)["input_ids"]), keys=layers)
            for l in layers:
                sums[l] = sums[l] + ks[l].double().T @ ks[l].double()
            count += ks[layers[0]].shape[0]
    return {l: (s / count).float() for l, s in sums.items()}


def midpoint_threshold(mom2: dict[int, torch.Tensor]) -> float:
    """An AlphaEdit threshold between two eigenvalues of every ``C_0`` (so ``P`` is far from 0 and
    from I and no eigenvalue sits near the threshold)."""
    C = mom2[LAYERS[0]].double()
    ev = torch.linalg.eigvalsh(C)
    i = len(ev) // 2
    return float((ev[i - 1] + ev[i]) / 2)


@dataclasses.dataclass
class Run:
    editor: Editor
    steps: list  # LayerStep, in write order
    targets: dict  # layer -> TargetResult
    before: dict  # layer -> W before the round
    oracle: Oracle
    round: object  # OracleRound


def sharp_model(arch: str, sharpen: float = 1.0):
    """A tiny random model; ``sharpen`` scales the final norm's weight, so the next-token
    distributions are far from uniform and δ moves them (a random tiny model is almost uniform)."""
    model = make_model(arch)
    if sharpen != 1.0:
        with torch.no_grad():
            Model(model, None).norm.weight.mul_(sharpen)
    return model


def run_both(arch="llama", method="memit", strategy="distribute", optimize=True, *, bos=False, sharpen=SHARPEN,
             requests=REQUESTS, templates=TEMPLATES, tok=None, finalize=True, oracle_kw=None, **target_kw):
    model = sharp_model(arch, sharpen)
    tok = tok or make_tokenizer(bos=bos)
    mom2 = key_moments(model, tok, LAYERS)
    twin = copy.deepcopy(model)
    tkw = dict(v_num_grad_steps=STEPS, v_lr=0.5) | target_kw
    threshold = midpoint_threshold(mom2)
    hp = EditingConfig(method=method, strategy=strategy, layers=list(LAYERS), mom2_update_weight=LAM,
                     nullspace_threshold=threshold, L2=1.0, target=TargetConfig(**tkw), optimize=optimize)
    adapter = ModelAdapter(model)
    editor = Editor(model, tok, adapter, hp, mom2, templates)
    before = {l: adapter.get_w_out(l) for l in range(adapter.num_layers)}
    steps, targets = [], {}
    editor.on_layer = steps.append
    real_targets = editor.targets

    def record(reqs, layer):
        targets[layer] = real_targets(reqs, layer)
        return targets[layer]

    editor.targets = record
    editor.edit_round(requests)
    if finalize:
        editor.finalize()
    ohp = OracleHParams(method=method, strategy=strategy, layers=list(LAYERS), lam=LAM, nullspace_threshold=threshold,
                        alpha=1.0, **tkw, **(oracle_kw or {}))
    oracle = Oracle(twin, tok, ohp, mom2, templates)
    rnd = oracle.edit_round(requests)
    if finalize:
        oracle.finalize()
    return Run(editor, steps, targets, before, oracle, rnd)


def oracle_z(run: Run, layer: int) -> torch.Tensor:
    return torch.stack([t.z for t in run.round.targets[layer]])  # [B, d]


def assert_round_matches(run: Run, method: str) -> None:
    ed, o = run.editor, run.oracle
    # targets: z and the number of Adam updates
    assert sorted(run.targets) == sorted(run.round.targets)
    for l, res in run.targets.items():
        assert rel(res.z, oracle_z(run, l)) < TOL_Z, l
        assert res.steps.tolist() == [t.updates for t in run.round.targets[l]], l
    # per written layer: keys, residuals and (except RECT, whose step holds its full update) ΔW
    assert [s.layer for s in run.steps] == [s.layer for s in run.round.steps]
    for s, os_ in zip(run.steps, run.round.steps):
        assert s.target_layer == os_.target_layer
        assert rel(s.keys, os_.keys) < TOL_STATE, s.layer
        assert rel(s.residuals, os_.residuals) < TOL_OPT, s.layer
        if method != "rect":
            assert rel(s.delta, os_.delta) < TOL_OPT, s.layer
    # final weights: every layer, the edited ones against the oracle's update
    for l in range(ed.adapter.num_layers):
        W, W_o = ed.adapter.get_w_out(l).double(), o.m.get_W(l).double()
        if l in o.edited:
            assert rel(W - run.before[l].double(), W_o - run.before[l].double()) < TOL_OPT, l
        else:
            assert torch.equal(W, run.before[l].double()), l
    # edit history
    for l in o.edited:
        assert rel(ed.state.history[l], o.history[l]) < TOL_STATE, l


# -- every method × strategy × path × architecture ----------------------------------------------------------
@pytest.mark.parametrize("optimize", [True, False], ids=["fast", "reference"])
@pytest.mark.parametrize("strategy", ["distribute", "boundary"])
@pytest.mark.parametrize("method", ["memit", "alphaedit", "prune", "rect"])
@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_round_matches_oracle(arch, method, strategy, optimize):
    run = run_both(arch, method, strategy, optimize)
    assert_round_matches(run, method)
    if method == "alphaedit":  # a non-trivial projection: the update is neither 0 nor unconstrained
        for s in run.round.steps:
            assert s.delta.norm() > 0


@pytest.mark.parametrize("option", [dict(use_history=False), dict(prune_base="current")], ids=["no-history", "prune-current"])
def test_published_variants_match_oracle(option):
    """The options for the published behaviour: plain MEMIT (no ``H`` in the solve; a second round
    makes ``H`` non-zero) and PRUNE added to the current ``W``."""
    model = sharp_model("llama", SHARPEN)
    tok = make_tokenizer()
    mom2 = key_moments(model, tok, LAYERS)
    twin = copy.deepcopy(model)
    hp = EditingConfig(method="prune", strategy="distribute", layers=list(LAYERS), mom2_update_weight=LAM,
                     target=TargetConfig(v_num_grad_steps=STEPS, v_lr=0.5), **option)
    ed = Editor(model, tok, ModelAdapter(model), hp, mom2, TEMPLATES)
    oracle = Oracle(twin, tok, OracleHParams(method="prune", layers=list(LAYERS), lam=LAM, v_num_grad_steps=STEPS,
                                             **option), mom2, TEMPLATES)
    second = [EditRequest(5, "{} is in", "The Eiffel Tower", "Rome", "Paris")]
    for reqs in (REQUESTS, second):
        ed.edit_round(reqs)
        oracle.edit_round(reqs)
    ed.finalize()
    oracle.finalize()
    for l in LAYERS:
        W0 = oracle.original[l]
        assert rel(ed.adapter.get_w_out(l).double() - W0, oracle.m.get_W(l).double() - W0) < TOL_OPT, l


def test_round_matches_oracle_with_bos():
    assert_round_matches(run_both("llama", "memit", "distribute", True, bos=True), "memit")


def test_two_rounds_use_history():
    """A second round solves with ``H`` of the first (keys read on the edited model)."""
    model = sharp_model("llama", SHARPEN)
    tok = make_tokenizer()
    mom2 = key_moments(model, tok, LAYERS)
    twin = copy.deepcopy(model)
    hp = EditingConfig(method="memit", strategy="distribute", layers=list(LAYERS), mom2_update_weight=LAM,
                     target=TargetConfig(v_num_grad_steps=STEPS, v_lr=0.5))
    ed = Editor(model, tok, ModelAdapter(model), hp, mom2, TEMPLATES)
    oracle = Oracle(twin, tok, OracleHParams(layers=list(LAYERS), lam=LAM, v_num_grad_steps=STEPS), mom2, TEMPLATES)
    second = [EditRequest(5, "{} is in", "The Eiffel Tower", "Rome", "Paris")]
    for reqs in (REQUESTS, second):
        ed.edit_round(reqs)
        oracle.edit_round(reqs)
    for l in LAYERS:
        assert rel(ed.state.history[l], oracle.history[l]) < TOL_STATE
        W0 = oracle.original[l]
        assert rel(ed.adapter.get_w_out(l).double() - W0, oracle.m.get_W(l).double() - W0) < TOL_OPT


# -- named details -------------------------------------------------------------------------------------
@pytest.mark.parametrize("optimize", [True, False], ids=["fast", "reference"])
def test_kl_direction_edited_first(optimize):
    """KL(P_δ ‖ P_init), the edited distribution first. ``kl_factor`` 1 (16x the paper's) makes the
    KL term steer δ; the reversed KL gives a clearly different target."""
    kw = dict(kl_factor=1.0, v_num_grad_steps=6)
    run = run_both("llama", "memit", "distribute", optimize, **kw)
    L = LAYERS[-1]
    assert rel(run.targets[L].z, oracle_z(run, L)) < TOL_Z
    wrong = Oracle(sharp_model("llama", SHARPEN), make_tokenizer(), dataclasses.replace(run.oracle.hp, kl_edited_first=False),
                   run.oracle.mom2, TEMPLATES)
    z_wrong = torch.stack([wrong.target(r, L).z for r in REQUESTS])
    assert rel(z_wrong, oracle_z(run, L)) > WRONG


@pytest.mark.parametrize("optimize", [True, False], ids=["fast", "reference"])
def test_at_most_steps_minus_one_updates(optimize):
    """``v_num_grad_steps`` iterations compute the loss; the last one takes no Adam step."""
    run = run_both("llama", "memit", "distribute", optimize, v_num_grad_steps=3, early_stop_loss=0.0)
    L = LAYERS[-1]
    assert run.targets[L].steps.tolist() == [2, 2]
    assert rel(run.targets[L].z, oracle_z(run, L)) < TOL_Z
    # one iteration: the loss is computed once and δ stays 0
    run1 = run_both("llama", "memit", "distribute", optimize, v_num_grad_steps=1, early_stop_loss=0.0)
    res = run1.targets[L]
    assert res.steps.tolist() == [0, 0]
    assert torch.equal(res.delta, torch.zeros_like(res.delta))


@pytest.mark.parametrize("optimize", [True, False], ids=["fast", "reference"])
def test_key_weights_half_bare_half_generated(optimize):
    """``k = ½·k("{}") + ½·mean(k(generated))`` (three templates, so the uniform mean differs)."""
    run = run_both("llama", "memit", "distribute", optimize, v_num_grad_steps=1)
    o = run.oracle
    uniform = Oracle(copy.deepcopy(o.m.model), o.m.tok, dataclasses.replace(o.hp, key_weights="uniform"), o.mom2,
                     TEMPLATES)
    first = run.steps[0]  # layer l_1, read on the unedited model
    K_half = run.round.steps[0].keys  # the oracle's ½/½ keys, read before its first write
    assert rel(first.keys, K_half) < TOL_STATE
    # the uniform average on the same (unedited) weights
    for l in LAYERS:
        uniform.m.set_W(l, run.before[l])
    assert rel(uniform.keys(REQUESTS, first.layer), K_half) > WRONG


@pytest.mark.parametrize("optimize", [True, False], ids=["fast", "reference"])
def test_distribute_divides_by_remaining_layers(optimize):
    """``R^{l_i} = (z − h^{l_m}) / (m − i)`` with ``h^{l_m}`` re-read on the model as it is before
    layer ``l_i``'s write (read here by the oracle's own hooks on blueedit's model)."""
    model = sharp_model("llama", SHARPEN)
    tok = make_tokenizer()
    mom2 = key_moments(model, tok, LAYERS)
    hp = EditingConfig(method="memit", strategy="distribute", layers=list(LAYERS), mom2_update_weight=LAM,
                     target=TargetConfig(v_num_grad_steps=STEPS, v_lr=0.5), optimize=optimize)
    ed = Editor(model, tok, ModelAdapter(model), hp, mom2, TEMPLATES)
    probe = Oracle(model, tok, OracleHParams(layers=list(LAYERS)), mom2, TEMPLATES)
    L, m = LAYERS[-1], len(LAYERS)
    seen = []
    ed.on_layer = lambda step: seen.append((step, probe.hiddens(REQUESTS, L)))
    real = ed.targets
    zs = {}
    ed.targets = lambda reqs, layer: zs.setdefault(layer, real(reqs, layer))
    ed.edit_round(REQUESTS)
    z = zs[L].z.T.double()
    assert [s.layer for s, _ in seen] == LAYERS
    for i, (step, h) in enumerate(seen):
        expected = (z - h) / (m - i)
        assert rel(step.residuals, expected) < TOL_STATE, i
        assert rel(step.residuals, (z - h) / m) > WRONG or i == 0


@pytest.mark.parametrize("strategy", ["distribute", "boundary"])
@pytest.mark.parametrize("optimize", [True, False], ids=["fast", "reference"])
def test_rect_writes_full_updates_first(strategy, optimize):
    """RECT: the round computes every layer's update with the earlier layers' *full* updates written,
    then restores and writes the sparsified updates."""
    run = run_both("llama", "rect", strategy, optimize)
    assert_round_matches(run, "rect")
    # the other order (sparsify as you go) gives other keys/residuals at later layers and other weights
    wrong = Oracle(sharp_model("llama", SHARPEN), make_tokenizer(), dataclasses.replace(run.oracle.hp, rect_full_first=False),
                   run.oracle.mom2, TEMPLATES)
    wrong.edit_round(REQUESTS)
    l = run.oracle.edited[-1]
    right = run.oracle.m.get_W(l).double() - run.before[l].double()
    other = wrong.m.get_W(l).double() - run.before[l].double()
    assert rel(other, right) > WRONG
    # the written update keeps 40% of the entries
    W = run.editor.adapter.get_w_out(l).double()
    assert int(((W - run.before[l].double()) != 0).sum()) == round(0.4 * W.numel())


@pytest.mark.parametrize("optimize", [True, False], ids=["fast", "reference"])
def test_loss_layer_on_both_paths(optimize):
    """Target log-probs are read at ``loss_layer`` (3 of blocks 0..5) on both paths. ``kl_factor`` is 0
    here so that only the target term depends on where the log-probs are read."""
    run = run_both("llama", "memit", "distribute", optimize, loss_layer=3, kl_factor=0.0)
    L = LAYERS[-1]
    assert rel(run.targets[L].z, oracle_z(run, L)) < TOL_Z
    last = Oracle(sharp_model("llama", SHARPEN), make_tokenizer(), dataclasses.replace(run.oracle.hp, loss_layer=None),
                  run.oracle.mom2, TEMPLATES)
    z_last = torch.stack([last.target(r, L).z for r in REQUESTS])
    assert rel(z_last, oracle_z(run, L)) > WRONG


@pytest.mark.parametrize("optimize", [True, False], ids=["fast", "reference"])
def test_kl_distribution_is_the_final_one(optimize):
    """With ``loss_layer`` below the last block, the KL term still compares the model's next-token
    distributions (its final logits), as the published ``compute_z`` does."""
    # loss_layer 4: between the edited layer (3) and the last block (5). (With loss_layer equal to
    # the edited layer the target term is flat along h_init, so z is not a stable quantity.)
    run = run_both("llama", "memit", "distribute", optimize, loss_layer=4, kl_factor=4.0)
    L = LAYERS[-1]
    assert rel(run.targets[L].z, oracle_z(run, L)) < TOL_Z


def test_context_templates_have_ten_tokens_with_the_seed_word():
    """Each generated prefix is 10 tokens long counting the seed word (the published
    ``generate_fast(max_out_len=10)``), unless generation stopped at EOS."""
    from blueedit.editing.targets import CONTEXT_SEEDS, generate_context_templates

    model, tok = make_model("llama"), make_tokenizer()
    outputs = []
    real = model.generate

    def generate(*args, **kwargs):
        out = real(*args, **kwargs)
        outputs.append((kwargs.get("input_ids", args[0] if args else None).shape[1], out[0].tolist()))
        return out

    model.generate = generate
    templates = generate_context_templates(model, tok)
    assert templates[0] == "{}" and len(templates) == 1 + len(CONTEXT_SEEDS)
    assert len(outputs) == len(CONTEXT_SEEDS)
    for (n_in, ids), seed, template in zip(outputs, CONTEXT_SEEDS, templates[1:]):
        assert n_in == len(tok(seed)["input_ids"])
        if tok.eos_token_id not in ids[n_in:]:
            assert len(ids) == 10, (seed, ids)
        assert template.startswith(seed) and template.endswith(". {}")


# -- a subject whose last token merges with the next character -------------------------------------------
def merging_tokenizer():
    """A byte-level BPE where "Apple" is ``Ap|ple`` but "Apples" is one token ``Apples``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {t: i for i, t in enumerate(["<pad>", "<s>", "</s>"] + alphabet)}
    merges = [("A", "p"), ("p", "l"), ("pl", "e"), ("ple", "s"), ("Ap", "ples")]
    for a, b in merges:
        vocab[a + b] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")


@pytest.mark.parametrize("optimize", [True, False], ids=["fast", "reference"])
def test_subject_merged_with_next_character(optimize):
    """Prompt "{}s are red", subject "Apple": the fact token is "Apples" (position 0), the token that
    holds the subject's last character; counting the tokens of "Apple" alone (2) would point at the
    token after the subject."""
    from blueedit.models.tokens import encode_prompt

    tok = merging_tokenizer()
    assert tok.convert_ids_to_tokens(tok("Apple")["input_ids"]) == ["Ap", "ple"]
    ids, fact = encode_prompt(tok, "{}s are red", "Apple")
    assert tok.convert_ids_to_tokens(ids)[:2] == ["Apples", "Ġ"]
    assert fact == 0
    assert Model(make_model("llama"), tok).encode("{}s are red", "Apple") == (ids, 0)
    requests = [EditRequest(0, "{}s are red", "Apple", "blue", "red"),
                EditRequest(1, "The {} is", "Apple", "Paris", "red")]
    run = run_both("llama", "memit", "distribute", optimize, requests=requests, tok=tok,
                   templates=["{}", "A pl. {}"])
    assert_round_matches(run, "memit")


# -- PRUNE through the oracle's own restraint ------------------------------------------------------------------
def test_prune_finalize_matches_oracle_restraint():
    """After the round, ``finalize`` applies the restraint once: blueedit's weights equal the oracle's
    ``W_0 + restrained(W − W_0)`` and differ from the unrestrained round (the restraint acts)."""
    run = run_both("llama", "prune", "distribute", True)
    acted = []
    for l in run.oracle.edited:
        W0 = run.before[l].double()
        W = run.editor.adapter.get_w_out(l).double()
        assert rel(W - W0, run.oracle.m.get_W(l).double() - W0) < TOL_OPT, l
        unrestrained = W0 + run.round.written[l]
        acted.append(rel(prune(W0, unrestrained) - W0, unrestrained - W0) > WRONG)
    assert any(acted)
