"""editing.target.stop_after: the optimized target is o* followed by an end-of-answer token."""

from __future__ import annotations

import pytest

from blueedit.config import EditingConfig, TargetConfig
from blueedit.data.records import EditRequest
from blueedit.editing.targets.batching import stop_ids, target_rows
from blueedit.models.tokens import tokenize_target
from helpers import make_tokenizer

REQ = EditRequest(case_id=1, prompt="{} plays the", subject="Toko Yasuda", target_new="piano", target_true="guitar")


@pytest.mark.parametrize("stop_after, text", [("none", None), ("eos", "</s>"), ("period", "."), ("newline", "\n")])
def test_rewriting_rows_end_with_the_stop_token(stop_after, text):
    tok = make_tokenizer(bos=True)
    piano = tokenize_target(tok, "piano")
    want = piano if text is None else piano + [tok.convert_tokens_to_ids(tok.tokenize(text))[0]
                                                if text != "</s>" else tok.eos_token_id]
    assert stop_ids(tok, stop_after) == want[len(piano):]
    rows = target_rows(tok, [REQ], ["{}", "A. {}"], "{} is a", forget=True, stop_after=stop_after)
    rewriting = [r for r in rows if not r.is_kl and not r.is_old]
    assert len(rewriting) == 2 and all(r.target == want for r in rewriting)
    assert all(r.target == tokenize_target(tok, "guitar") for r in rows if r.is_old)  # o alone
    assert [r.target for r in rows if r.is_kl] == [[]]


def test_stop_after_is_checked():
    with pytest.raises(ValueError, match="editing.target.stop_after"):
        TargetConfig(stop_after="comma")
    with pytest.raises(ValueError, match="stop_after does not apply to editing.method 'wise'"):
        EditingConfig(method="wise", layers=[1], target=TargetConfig(stop_after="eos"))
