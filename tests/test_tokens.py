"""Fact-token positions and target masks under left/right padding, with and without BOS."""

from __future__ import annotations

import pytest
import torch

from blueedit.data.records import EditRequest
from blueedit.editing.targets import fact_states
from blueedit.models.adapters import ModelAdapter
from blueedit.models.forward import forward, traced
from blueedit.models.tokens import (
    encode_batch,
    encode_prompt,
    gather_positions,
    pad_batch,
    tokenize_target,
)
from helpers import make_model, make_tokenizer

CASES = [
    ("{} is located in the capital of", "The Eiffel Tower"),
    ("The mother tongue of {} is", "Thomas Joannes Stieltjes"),
    ("{} plays the", "Toko Yasuda"),
    ("Where is {}? It is in", "Autonomous University of Madrid"),
    ("{}", "Danielle Darrieux"),
]
TARGETS = ["Paris", "Dutch language", "piano", "Spain", "French and English"]


def _decode(tok, ids):
    return tok.decode(ids, skip_special_tokens=True)


@pytest.mark.parametrize("bos", [False, True])
def test_encode_prompt_fact_token_is_subject_end(bos):
    tok = make_tokenizer(bos=bos)
    for template, subject in CASES:
        ids, fact = encode_prompt(tok, template, subject)
        assert (ids[0] == tok.bos_token_id) == bos
        assert 0 <= fact < len(ids)
        piece = _decode(tok, [ids[fact]]).strip()
        assert piece and subject.endswith(piece), (subject, piece)
        # everything up to and including the fact token is the prompt up to the end of the subject
        prefix = template[: template.index("{}")] + subject
        assert _decode(tok, ids[: fact + 1]) == prefix
        assert _decode(tok, ids) == template.replace("{}", subject)


@pytest.mark.parametrize("bos", [False, True])
def test_encode_prompt_without_subject(bos):
    tok = make_tokenizer(bos=bos)
    ids, fact = encode_prompt(tok, "Paris is the capital of", None)
    assert fact == -1
    assert _decode(tok, ids) == "Paris is the capital of"
    with pytest.raises(ValueError):
        encode_prompt(tok, "no slot here", "Paris")


@pytest.mark.parametrize("bos", [False, True])
def test_tokenize_target_leading_space_no_bos(bos):
    tok = make_tokenizer(bos=bos)
    for target in TARGETS + [" Paris"]:
        ids = tokenize_target(tok, target)
        assert tok.bos_token_id not in ids
        text = tok.decode(ids)
        assert text == " " + target.lstrip(" ")
        # same ids as the target appended to a prompt
        full = tok("Toko Yasuda plays the" + " " + target.lstrip(" "), add_special_tokens=False)["input_ids"]
        assert full[-len(ids):] == ids


@pytest.mark.parametrize("bos", [False, True])
@pytest.mark.parametrize("side", ["left", "right"])
def test_encode_batch_indices_and_targets(bos, side):
    tok = make_tokenizer(bos=bos, padding_side=side)
    templates = [c[0] for c in CASES]
    subjects = [c[1] for c in CASES]
    conts = [tokenize_target(tok, t) for t in TARGETS]
    conts[2] = []  # a row without continuation
    batch = encode_batch(tok, templates, subjects, conts)
    single = [encode_prompt(tok, t, s) for t, s in zip(templates, subjects)]
    T = batch.input_ids.shape[1]
    assert T == max(len(ids) + len(c) for (ids, _), c in zip(single, conts))
    for b, ((ids, fact), cont) in enumerate(zip(single, conts)):
        n = len(ids) + len(cont)
        off = T - n if side == "left" else 0
        assert int(batch.attention_mask[b].sum()) == n
        assert batch.input_ids[b, off : off + n].tolist() == ids + cont
        if side == "left":
            assert batch.attention_mask[b, :off].sum() == 0
            assert (batch.input_ids[b, :off] == tok.pad_token_id).all()
        else:
            assert batch.attention_mask[b, n:].sum() == 0
        assert int(batch.fact_index[b]) == fact + off
        assert int(batch.last_prompt_index[b]) == off + len(ids) - 1
        piece = _decode(tok, [int(batch.input_ids[b, batch.fact_index[b]])]).strip()
        assert subjects[b].endswith(piece)
        # position ids count real tokens from 0
        assert batch.position_ids[b, off : off + n].tolist() == list(range(n))
        # target positions: the token after target_index is the target token
        m = batch.target_mask[b].bool()
        assert int(m.sum()) == len(cont)
        idx = batch.target_index[b][m]
        assert batch.input_ids[b, idx + 1].tolist() == cont
        assert batch.target_ids[b][m].tolist() == cont
        if cont:
            assert int(idx[0]) == int(batch.last_prompt_index[b])


def test_left_padding_shifts_by_pad_count():
    tok = make_tokenizer(bos=True)
    templates = [c[0] for c in CASES]
    subjects = [c[1] for c in CASES]
    right = encode_batch(tok, templates, subjects, padding_side="right")
    left = encode_batch(tok, templates, subjects, padding_side="left")
    pads = (right.attention_mask == 0).sum(1)
    assert torch.equal(left.fact_index, right.fact_index + pads)
    assert torch.equal(left.last_prompt_index, right.last_prompt_index + pads)
    assert torch.equal(gather_positions(left.input_ids.unsqueeze(-1), left.fact_index),
                       gather_positions(right.input_ids.unsqueeze(-1), right.fact_index))


def test_pad_batch_rejects_bad_side():
    with pytest.raises(ValueError):
        pad_batch([[1, 2]], [0], pad_id=0, padding_side="middle")


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("bos", [False, True])
def test_hidden_states_independent_of_padding_side(arch, bos):
    model = make_model(arch)
    adapter = ModelAdapter(model)
    templates = [c[0] for c in CASES]
    subjects = [c[1] for c in CASES]
    conts = [tokenize_target(make_tokenizer(bos=bos), t) for t in TARGETS]
    out = {}
    for side in ("left", "right"):
        tok = make_tokenizer(bos=bos, padding_side=side)
        batch = encode_batch(tok, templates, subjects, conts)
        with torch.no_grad(), traced(adapter, key_layers=[2], hidden_layers=[1, 5]) as tr:
            logits = forward(model, batch)
        out[side] = {
            "h1": gather_positions(tr.hidden[1], batch.fact_index),
            "h5": gather_positions(tr.hidden[5], batch.fact_index),
            "k2": gather_positions(tr.keys[2], batch.fact_index),
            "tgt": gather_positions(logits, batch.target_index)[batch.target_mask.bool()],
        }
    for name in out["left"]:
        assert torch.allclose(out["left"][name], out["right"][name], atol=1e-5), name


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_fact_states_independent_of_padding_side(arch):
    model = make_model(arch)
    adapter = ModelAdapter(model)
    reqs = [EditRequest(i, t, s, "Paris") for i, (t, s) in enumerate(CASES)]
    templates = ["{}", "Because I said so. {}"]
    res = {}
    for side in ("left", "right"):
        tok = make_tokenizer(bos=True, padding_side=side)
        res[side] = fact_states(model, adapter, tok, reqs, templates, [1, 3], [2, 3], batch_size=3)
    for part in (0, 1):
        for l, v in res["left"][part].items():
            assert torch.allclose(v, res["right"][part][l], atol=1e-5), (part, l)
    keys, hidden = res["right"]
    assert keys[1].shape == (adapter.key_size(1), len(reqs))
    assert hidden[2].shape == (adapter.hidden_size(), len(reqs))
