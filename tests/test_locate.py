"""``blueedit locate``: the causal-tracing math (ROME §2.1, docs/algorithms.md §12) on tiny random
models, the window choice on hand-made curves, λ's width rule and the command end to end."""

from __future__ import annotations

import json
import math

import pytest
import torch

from blueedit.locate import (
    CausalTracer,
    FactTrace,
    KnownFact,
    choose_window,
    embedding_std,
    lambda_for_width,
    load_known_facts,
    mean_effects,
    restore_window,
    subject_noise,
)
from blueedit.models.adapters import ModelAdapter
from helpers import benchmark, make_model, make_tokenizer

# -- pure functions ---------------------------------------------------------------------------

def test_embedding_std_is_the_population_std_of_all_elements():
    a, b = torch.tensor([[1.0, 3.0]]), torch.tensor([[5.0, 7.0], [9.0, 11.0]])
    values = [1, 3, 5, 7, 9, 11]
    mean = sum(values) / 6
    expected = math.sqrt(sum((v - mean) ** 2 for v in values) / 6)
    assert embedding_std([a, b]) == pytest.approx(expected, rel=1e-12)
    with pytest.raises(ValueError):
        embedding_std([torch.tensor([[1.0]])])


def test_subject_noise_has_scale_times_std():
    g = torch.Generator().manual_seed(0)
    eps = subject_noise(64, 8, 128, std=0.02, scale=3.0, generator=g)
    assert eps.shape == (64, 8, 128)
    assert float(eps.std()) == pytest.approx(0.06, rel=0.02)
    assert abs(float(eps.mean())) < 0.002
    again = subject_noise(64, 8, 128, std=0.02, scale=3.0, generator=torch.Generator().manual_seed(0))
    assert torch.equal(eps, again)  # seeded: the same noise for every restoration of a fact


def test_restore_window():
    assert restore_window(4, 1, 30) == [4]
    assert restore_window(4, 10, 30) == list(range(0, 9))  # ROME: 5 before, 4 after
    assert restore_window(20, 10, 30) == list(range(15, 25))
    assert restore_window(28, 10, 30) == list(range(23, 30))
    assert restore_window(5, 3, 30) == [4, 5, 6]
    with pytest.raises(ValueError):
        restore_window(0, 0, 30)


def test_choose_window_takes_the_early_peak():
    # a hand-made MLP curve over 30 layers: a broad early bump around 5-7, a taller late one at 22
    curve = [0.0] * 30
    for l, v in {3: 0.02, 4: 0.05, 5: 0.08, 6: 0.09, 7: 0.08, 8: 0.05, 9: 0.02}.items():
        curve[l] = v
    curve[22] = curve[23] = 0.5  # late: outside the early half, never chosen
    # window means: [3..7] 0.064, [4..8] 0.070, [5..9] 0.064 -> best is 4..8
    assert choose_window(curve, size=5, tolerance=1.0) == [4, 5, 6, 7, 8]
    # with a 0.9 tolerance (0.063) the earliest window within reach wins: 3..7
    assert choose_window(curve, size=5, tolerance=0.9) == [3, 4, 5, 6, 7]
    # allowing late starts finds the late bump
    assert choose_window(curve, size=5, tolerance=1.0, max_start_fraction=1.0)[0] in (19, 20, 21, 22)
    assert choose_window(curve[:4], size=5) == [0, 1, 2, 3]  # shallower than the window: every layer
    assert choose_window([0.1, 0.3, 0.2], size=1, tolerance=1.0, max_start_fraction=1.0) == [1]


def test_choose_window_on_a_flat_or_negative_curve_is_the_first():
    assert choose_window([0.0] * 12, size=5) == [0, 1, 2, 3, 4]
    assert choose_window([-0.1] * 12, size=5) == [0, 1, 2, 3, 4]


@pytest.mark.parametrize("d_k, lam", [(1536, 1500), (2048, 2000), (14336, 14000), (16384, 16000),
                                      (4864, 4900), (18944, 19000), (896, 900), (64, 64), (8960, 9000)])
def test_lambda_for_width_is_d_k_to_two_significant_figures(d_k, lam):
    assert lambda_for_width(d_k) == lam


def test_mean_effects_is_the_mean_difference_and_its_standard_error():
    def trace(pc, hidden):
        return FactTrace(0, "s", "p", 0, "a", True, 1.0, pc, hidden, hidden, (0, 1))

    mean, se = mean_effects([trace(0.1, [0.2, 0.5]), trace(0.3, [0.2, 0.9])], "hidden")
    assert mean == pytest.approx([0.0, 0.5])
    assert se == pytest.approx([0.1, 0.1])  # std of (0.1, -0.1) = sqrt(0.02) / sqrt(2)


# -- tracing a model --------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tok():
    return make_tokenizer()


def _tracer(arch="llama", scale=3.0, samples=2, **kw):
    """A tracer on a tiny random model whose weights are scaled up, so its predictions are peaked
    (at the default scale every probability is close to uniform and all effects vanish)."""
    model = make_model(arch, n_layer=4)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(4.0)
    t = CausalTracer(model, ModelAdapter(model), make_tokenizer(), noise_std=0.5, noise_scale=scale,
                     samples=samples, **kw)
    return t


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_restoring_a_one_token_subject_at_the_end_recovers_the_clean_probability_at_every_layer(arch):
    """A one-token subject that ends the prompt: the tokens before it are clean (causal attention)
    and its own state, restored after block ``l``, makes every later block's input clean, so
    p_l = p_clean exactly at every layer. A subject inside the prompt gives no such identity: the
    tokens after it have already attended to its noisy states in blocks ``0..l``."""
    tracer = _tracer(arch)
    fact = KnownFact("X", "The city of {}", None, 0)
    ids, b, e = tracer.encode(fact)
    assert e - b == 1 and e == len(ids)
    tr = tracer.trace(fact)
    assert abs(tr.p_corrupt - tr.p_clean) > 1e-3  # the noise does change the answer
    assert tr.hidden == pytest.approx([tr.p_clean] * 4, abs=1e-6)
    assert tr.mlp[0] != pytest.approx(tr.p_clean, abs=1e-6)  # one MLP output alone is not enough
    inside = tracer.trace(KnownFact("X", "{} is the city of the", None, 0))
    assert inside.hidden[0] != pytest.approx(inside.p_clean, abs=1e-4)


def test_restoring_the_last_layer_at_the_last_token_is_clean():
    """Subject at the end of the prompt: the last block's output at the fact token is the state the
    head reads, so restoring it gives p_clean; earlier layers do not (other subject tokens stay noisy)."""
    tracer = _tracer()
    fact = KnownFact("Danielle Darrieux", "The mother tongue of {}", None, 0)
    ids, b, e = tracer.encode(fact)
    assert e == len(ids) and e - b >= 2
    tr = tracer.trace(fact)
    assert tr.hidden[-1] == pytest.approx(tr.p_clean, abs=1e-6)
    assert tr.hidden[0] != pytest.approx(tr.p_clean, abs=1e-6)


def test_no_noise_means_no_effect():
    tracer = _tracer(scale=0.0)
    tr = tracer.trace(KnownFact("Danielle Darrieux", "{} spoke the language", None, 0))
    assert tr.p_corrupt == pytest.approx(tr.p_clean, abs=1e-6)
    assert tr.hidden == pytest.approx([tr.p_clean] * 4, abs=1e-6)
    assert tr.mlp == pytest.approx([tr.p_clean] * 4, abs=1e-6)


def _oracle(tracer, fact, index=0):
    """The same trace, one layer and one noise sample per forward pass: the noise added to
    ``inputs_embeds`` (not by a hook on the embedding) and the clean state written back by a
    hook on that single block or MLP output projection."""
    model, adapter = tracer.model, tracer.adapter
    ids, b, e = tracer.encode(fact)
    x = torch.tensor([ids])
    with torch.no_grad():
        clean_emb = model.get_input_embeddings()(x)
        states = {}
        hooks = [adapter.block(l).register_forward_hook(
                     lambda m, a, o, l=l: states.__setitem__(("hidden", l), (o[0] if isinstance(o, tuple) else o).clone()))
                 for l in range(adapter.num_layers)]
        hooks += [adapter.w_out_module(l).register_forward_hook(
                      lambda m, a, o, l=l: states.__setitem__(("mlp", l), o.clone()))
                  for l in range(adapter.num_layers)]
        p_clean = model(input_ids=x).logits[0, -1].softmax(-1)
        for h in hooks:
            h.remove()
        answer = int(p_clean.argmax())
        g = torch.Generator().manual_seed(tracer.seed + index)
        eps = torch.randn(tracer.samples, e - b, clean_emb.shape[-1], generator=g) * (tracer.noise_scale * tracer.noise_std)

        def run(s, kind=None, layer=None):
            emb = clean_emb.clone()
            emb[0, b:e] += eps[s]
            handle = None
            if kind == "hidden":
                def hook(m, a, o):
                    h = (o[0] if isinstance(o, tuple) else o).clone()
                    h[0, e - 1] = states[("hidden", layer)][0, e - 1]
                    return (h,) + tuple(o[1:]) if isinstance(o, tuple) else h
                handle = adapter.block(layer).register_forward_hook(hook)
            elif kind == "mlp":
                def hook(m, a, o):
                    o = o.clone()
                    o[0, e - 1] = states[("mlp", layer)][0, e - 1]
                    return o
                handle = adapter.w_out_module(layer).register_forward_hook(hook)
            try:
                return float(model(inputs_embeds=emb).logits[0, -1].softmax(-1)[answer])
            finally:
                if handle is not None:
                    handle.remove()

        S, L = tracer.samples, adapter.num_layers
        corrupt = sum(run(s) for s in range(S)) / S
        hidden = [sum(run(s, "hidden", l) for s in range(S)) / S for l in range(L)]
        mlp = [sum(run(s, "mlp", l) for s in range(S)) / S for l in range(L)]
    return float(p_clean[answer]), corrupt, hidden, mlp


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("max_rows", [256, 5])
def test_batched_trace_matches_one_pass_per_layer(arch, max_rows):
    tracer = _tracer(arch, samples=3, seed=7, max_rows=max_rows)
    fact = KnownFact("Danielle Darrieux", "{} spoke French and", None, 0)
    tr = tracer.trace(fact, index=2)
    p_clean, corrupt, hidden, mlp = _oracle(tracer, fact, index=2)
    assert tr.p_clean == pytest.approx(p_clean, abs=1e-6)
    assert tr.p_corrupt == pytest.approx(corrupt, abs=1e-5)
    assert tr.hidden == pytest.approx(hidden, abs=1e-5)
    assert tr.mlp == pytest.approx(mlp, abs=1e-5)
    assert max(tr.mlp) - min(tr.mlp) > 1e-3  # the layers differ: the check has teeth


def test_measure_std_reads_the_subject_embeddings():
    tracer = _tracer()
    facts = [KnownFact("Danielle Darrieux", "{} spoke", None, 0), KnownFact("Toko Yasuda", "{} plays", None, 1)]
    emb = tracer.model.get_input_embeddings()
    rows = []
    for f in facts:
        ids, b, e = tracer.encode(f)
        rows.append(emb.weight[ids[b:e]].detach())
    assert tracer.measure_std(facts) == pytest.approx(float(torch.cat(rows).flatten().std(unbiased=False)), rel=1e-5)


# -- records and the command ------------------------------------------------------------------

def test_load_known_facts(tmp_path):
    path = tmp_path / "known.json"
    path.write_text(json.dumps([
        {"known_id": 3, "subject": "Vinson Massif", "attribute": "Antarctica",
         "template": "{} is located in the continent", "prompt": "Vinson Massif is located in the continent of"},
        {"known_id": 4, "subject": "X", "attribute": "Y", "template": "{} is in", "prompt": "Something else"},
    ]))
    facts = load_known_facts(path)
    assert facts[0] == KnownFact("Vinson Massif", "{} is located in the continent of", "Antarctica", 3)
    assert facts[1].template == "{} is in"
    path.write_text(json.dumps([{"subject": "X", "attribute": "Y", "prompt": "no subject", "template": "none"}]))
    with pytest.raises(ValueError, match="known fact 0"):
        load_known_facts(path)
    users = tmp_path / "edits.json"
    users.write_text(json.dumps([{"prompt": "{} plays the", "subject": "Toko Yasuda", "target_new": "piano",
                                  "target_true": "guitar"}]))
    assert load_known_facts(users) == [KnownFact("Toko Yasuda", "{} plays the", "guitar", 0)]
    with pytest.raises(FileNotFoundError, match="--records"):
        load_known_facts(tmp_path / "missing.json")


@pytest.fixture
def saved_tiny(tmp_path):
    model = make_model("llama", n_layer=8)
    d = tmp_path / "tiny"
    model.save_pretrained(d)
    make_tokenizer().save_pretrained(d)
    facts = tmp_path / "known.json"
    facts.write_text(json.dumps([
        {"known_id": i, "subject": s, "attribute": a, "template": t, "prompt": t.replace("{}", s)}
        for i, (s, a, t) in enumerate([("Danielle Darrieux", "French", "{} spoke"),
                                       ("Toko Yasuda", "guitar", "{} plays the"),
                                       ("Autonomous University of Madrid", "Spain", "{} is located in")])
    ]))
    return d, facts


def test_locate_command_writes_the_trace_and_a_config_that_parses(saved_tiny, tmp_path, capsys, monkeypatch):
    from blueedit.cli import main

    d, facts = saved_tiny
    out = tmp_path / "out"
    main(["locate", "--model", str(d), "--records", str(facts), "--all-facts", "--num-facts", "2",
          "--window-size", "3", "--method", "alphaedit", "--blue", "--out", str(out), "--samples", "2"])
    text = capsys.readouterr().out
    assert "recommended: editing.layers" in text and "AIE(mlp)" in text
    summary = json.loads((out / "summary.json").read_text())
    assert summary["facts"] == 2 and summary["num_layers"] == 8 and summary["loss_layer"] == 7
    assert summary["mom2_update_weight"] == 64  # d_k 64
    assert len(summary["layers"]) == 3 and summary["layers"] == list(range(summary["layers"][0], summary["layers"][0] + 3))
    rows = (out / "trace.csv").read_text().splitlines()
    assert rows[0] == "layer,aie_hidden,se_hidden,aie_mlp,se_mlp" and len(rows) == 9
    assert (out / "trace.png").is_file()
    config = (out / "alphaedit_blue.yaml").read_text()
    assert "strategy: boundary" in config and "method: alphaedit" in config
    assert f"layers: [{', '.join(map(str, summary['layers']))}]" in config

    # the written config parses and instantiates through the CLI
    import blueedit.module
    from blueedit.cli import run_cli

    monkeypatch.setattr(blueedit.module, "load_model_and_tokenizer",
                        lambda spec, cache_dir=None: (make_model("llama", n_layer=8), make_tokenizer()))
    monkeypatch.setattr("sys.argv", ["blueedit"])
    cli = run_cli(["--config", str(out / "alphaedit_blue.yaml"), f"--trainer.default_root_dir={tmp_path}"], run=False)
    assert cli.model.hp.layers == summary["layers"] and cli.model.hp.strategy == "boundary"
    assert cli.model.hp.target.loss_layer == 7


def test_locate_command_errors_before_loading(saved_tiny, tmp_path, capsys):
    from blueedit.cli import main

    d, facts = saved_tiny
    with pytest.raises(SystemExit) as e:
        main(["locate", "--model", str(d), "--records", str(tmp_path / "nope.json")])
    assert e.value.code == 2 and "--records" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        main(["locate", "--model", str(d), "--records", str(facts), "--samples", "0"])
    assert e.value.code == 2 and "--samples" in capsys.readouterr().err
    # the tiny random model knows none of the facts
    with pytest.raises(SystemExit) as e:
        main(["locate", "--model", str(d), "--records", str(facts), "--out", str(tmp_path / "o")])
    assert e.value.code == 2 and "--all-facts" in capsys.readouterr().err


# -- the benchmark scripts (smoke runs) -------------------------------------------------------

def test_locate_shapes_writes_configs_that_parse(tmp_path, monkeypatch, data_dir):
    """blueedit.bench.locate_shapes on one architecture (SmolLM2's tokenizer from the package when
    installed, else the tiny one): the two configs parse through the CLI with the traced layers and carry
    the needs-locate mark."""
    bench = benchmark("locate_shapes")
    import blueedit.models.loading as loading

    tok_dir = tmp_path / "tok"
    make_tokenizer().save_pretrained(tok_dir)
    monkeypatch.setattr(loading, "local_model_dir", lambda spec, cache=None: tok_dir)
    bench.main(["--only", "gemma3-1b", "--num-facts", "2", "--samples", "1", "--hidden", "32",
                "--out", str(tmp_path / "out"), "--configs", str(tmp_path / "configs")])
    summary = json.loads((tmp_path / "out" / "gemma3-1b" / "summary.json").read_text())
    assert summary["random_weights"] and summary["num_layers"] == 26 and summary["mom2_update_weight"] == 6900
    import blueedit.module
    from blueedit.cli import run_cli

    monkeypatch.setattr(blueedit.module, "load_model_and_tokenizer",
                        lambda spec, cache_dir=None: (make_model("llama", n_layer=26), make_tokenizer()))
    monkeypatch.setattr("sys.argv", ["blueedit"])
    for tag in ("memit", "alphaedit"):
        path = tmp_path / "configs" / "gemma3-1b" / f"{tag}.yaml"
        assert "\n# needs-locate: " in path.read_text()
        cli = run_cli(["--config", str(path), f"--trainer.default_root_dir={tmp_path}"], run=False)
        assert cli.model.hp.layers == summary["layers"] and cli.model.hp.target.loss_layer == 25
        assert cli.model.model_spec.name_or_path == "google/gemma-3-1b-it"


def test_chat_template_benchmark_smoke(tmp_path, monkeypatch):
    bench = benchmark("chat_template")
    from helpers import CHATML, RECORDS

    model_dir = tmp_path / "tiny"
    make_model("llama", n_layer=10).save_pretrained(model_dir)
    tok = make_tokenizer()
    tok.chat_template = CHATML
    tok.save_pretrained(model_dir)
    (tmp_path / "edits.json").write_text(json.dumps(RECORDS[:4]))
    from helpers import REPO

    config = (REPO / "configs" / "smollm2-135m" / "memit.yaml").read_text()
    for real, tiny in [("name_or_path: smollm2-135m", f"name_or_path: {model_dir}"),
                       ("corpus: wikipedia-sample", "corpus: model-samples"), ("num_samples: 300", "num_samples: 4"),
                       ("v_num_grad_steps: 25", "v_num_grad_steps: 2"),
                       ("dataset: counterfact", f"dataset: {tmp_path / 'edits.json'}")]:
        assert real in config
        config = config.replace(real, tiny)
    (tmp_path / "cfg.yaml").write_text(config)
    monkeypatch.setattr("sys.argv", ["blueedit"])
    results = bench.main(["--config", str(tmp_path / "cfg.yaml"), "--num-edits", "4", "--edits-per-round", "2",
                          "--root", str(tmp_path / "runs"), "--out", str(tmp_path / "out"),
                          f"--override=--model.stats.cache_dir={tmp_path / 'cache'}"])
    assert set(results) == {"plain", "chat template"}
    assert results["chat template"]["example_prompt"].startswith("<s>user\n")
    assert results["plain"]["example_prompt"] == "Toko Yasuda plays the"
    assert "| chat template | plain |" in (tmp_path / "out.md").read_text()


def test_locate_command_with_the_chat_template(saved_tiny, tmp_path, capsys):
    from blueedit.cli import main
    from helpers import CHATML

    d, facts = saved_tiny
    tok = make_tokenizer()
    tok.chat_template = CHATML
    tok.save_pretrained(d)
    out = tmp_path / "out"
    main(["locate", "--model", str(d), "--records", str(facts), "--all-facts", "--num-facts", "1",
          "--window-size", "3", "--chat-template", "--out", str(out), "--samples", "1"])
    trace = json.loads((out / "facts.jsonl").read_text().splitlines()[0])
    assert trace["prompt"] == "<s>user\nDanielle Darrieux spoke</s>\n<s>assistant\n"
    b, e = trace["subject_tokens"]
    ids = tok(trace["prompt"])["input_ids"]
    assert tok.decode(ids[b:e]).strip() == "Danielle Darrieux"
    assert "chat_template: true" in (out / "memit.yaml").read_text()


def _tiny_arch(name: str):
    import transformers

    common = dict(vocab_size=300, max_position_embeddings=64)
    if name == "gpt_neox":
        cfg = transformers.GPTNeoXConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                                         num_attention_heads=4, **common)
    elif name == "gptj":
        cfg = transformers.GPTJConfig(n_embd=32, n_layer=3, n_head=4, rotary_dim=4, n_positions=64, vocab_size=300)
    else:
        cls = {"qwen2": "Qwen2Config", "qwen3": "Qwen3Config", "mistral": "MistralConfig",
               "gemma3_text": "Gemma3TextConfig"}[name]
        cfg = getattr(transformers, cls)(hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                                         num_attention_heads=4, num_key_value_heads=2, head_dim=8, **common)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(8.0 if name == "gemma3_text" else 4.0)
    return model


@pytest.mark.parametrize("arch", ["qwen2", "qwen3", "mistral", "gemma3_text", "gpt_neox", "gptj"])
def test_tracing_identities_hold_on_every_architecture(arch):
    """The hooks find the embeddings, blocks and ``W_out`` of each family: the one-token-subject
    identity holds exactly, and the batched trace equals the one-pass-per-layer oracle."""
    model = _tiny_arch(arch)
    tracer = CausalTracer(model, ModelAdapter(model), make_tokenizer(), noise_std=0.5, samples=2)
    tr = tracer.trace(KnownFact("X", "The city of {}", None, 0))
    assert abs(tr.p_corrupt - tr.p_clean) > 1e-4
    assert tr.hidden == pytest.approx([tr.p_clean] * 3, abs=1e-6)
    fact = KnownFact("Danielle Darrieux", "{} spoke French and", None, 0)
    tr = tracer.trace(fact)
    p_clean, corrupt, hidden, mlp = _oracle(tracer, fact)
    assert (tr.p_clean, tr.p_corrupt) == pytest.approx((p_clean, corrupt), abs=1e-5)
    assert tr.hidden == pytest.approx(hidden, abs=1e-5) and tr.mlp == pytest.approx(mlp, abs=1e-5)
