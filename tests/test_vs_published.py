"""blueedit.bench.vs_published: argument checks, blueedit's side on a tiny random Llama, and the
published side when a checkout of github.com/xpq-tech/BLUE is given in $BLUEEDIT_PUBLISHED_BLUE."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from blueedit.data.records import EditRequest
from helpers import CORPUS, benchmark, make_model, make_tokenizer

REQUESTS = [
    EditRequest(1, "{} plays the", "Toko Yasuda", "violin", "guitar",
                paraphrases=("Toko Yasuda is a musician. Toko Yasuda plays the",),
                neighborhood=("Danielle Darrieux plays the",)),
    EditRequest(2, "The mother tongue of {} is", "Thomas Joannes Stieltjes", "French", "Dutch",
                paraphrases=("Thomas Joannes Stieltjes spoke",), neighborhood=("The mother tongue of Danielle Darrieux is",)),
    EditRequest(3, "{} is in", "The Eiffel Tower", "Rome", "Paris",
                paraphrases=("Where is The Eiffel Tower? It is in",), neighborhood=("Berlin is in",)),
]
TINY = ["--layers", "1,2,3", "--num-edits", "3", "--edits-per-round", "2", "--steps", "3", "--stats-samples", "4",
        "--stats-max-length", "32"]
PUBLISHED = os.environ.get("BLUEEDIT_PUBLISHED_BLUE")
NO_CHECKOUT = ("the published side needs a checkout of github.com/xpq-tech/BLUE: set BLUEEDIT_PUBLISHED_BLUE "
               "to its path")


def test_arguments(tmp_path, capsys):
    vs = benchmark("vs_published")
    args = vs.build_parser().parse_args(["--published", "x"])
    assert (args.num_edits, args.edits_per_round, args.methods) == (100, 25, "memit,memit_blue,alphaedit,alphaedit_blue")
    with pytest.raises(SystemExit):  # the published side needs --published
        vs.main(["--methods", "memit"])
    assert "--published PATH is required" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # a directory that is not the published checkout
        vs.main(["--published", str(tmp_path)])
    assert "missing memit/memit_seq_main.py" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        vs.main(["--sides", "blueedit", "--methods", "memit,rome"])
    assert "--methods" in capsys.readouterr().err
    defaults = vs.alphaedit_defaults()  # read from configs/smollm2-135m/alphaedit.yaml
    assert defaults["L2"] > 0 and 0 < defaults["nullspace_threshold"] < 1
    parser = vs.build_parser()
    args = parser.parse_args(["--sides", "blueedit", "--methods", "all", "--layers", "1,2,3"])
    args.base, args.stats_config = vs.C.benchmark_configs(parser, args)
    assert [p.name for p in vs.check_args(parser, args)[0]] == list(vs.PAIRS)
    with pytest.raises(SystemExit):  # the published driver restrains PRUNE only when the rounds divide the records
        vs.main(["--sides", "blueedit", "--methods", "prune", "--num-edits", "3", "--edits-per-round", "2"])
    assert "not a multiple of --edits-per-round" in capsys.readouterr().err


def test_module_layout_of_llama():
    from blueedit.models.adapters import ModelAdapter

    layout = benchmark("vs_published").module_layout(ModelAdapter(make_model("llama")))
    assert layout == {"rewrite_module_tmp": "model.layers.{}.mlp.down_proj", "layer_module_tmp": "model.layers.{}",
                      "mlp_module_tmp": "model.layers.{}.mlp", "attn_module_tmp": "model.layers.{}.self_attn",
                      "ln_f_module": "model.norm", "lm_head_module": "lm_head"}


def test_pmet_sites_of_llama():
    from blueedit.models.adapters import ModelAdapter

    layout = benchmark("vs_published").module_layout(ModelAdapter(make_model("llama")), pmet=True)
    assert (layout["mlp_module_tmp"], layout["attn_module_tmp"], layout["rewrite_module_tmp"]) == (
        "model.layers.{}.mlp.down_proj", "model.layers.{}.self_attn.o_proj", "model.layers.{}.mlp.down_proj")


def test_published_rect_keeps_one_entry_more_than_its_percentage():
    vs = benchmark("vs_published")
    for numel in (2048, 576 * 1536, 100, 7):
        keep = vs.published_rect_keep(numel)
        kept = numel - int(numel * 0.6) + 1  # every score >= the int(0.6 numel)-th smallest
        assert round(keep * numel) == kept  # what blueedit's rect_sparsify keeps with this rect_keep
    assert vs.published_rect_keep(2048) * 2048 == 821 and round(0.4 * 2048) == 819


def test_published_prune_restraint_is_prune_base_current():
    """The driver's restraint (added to the edited weights) is blueedit's ``prune_base: current``,
    with singular values of the edit above and below ``σ_max(W_0)``."""
    from blueedit.editing import solvers

    vs = benchmark("vs_published")
    g = torch.Generator().manual_seed(0)
    w0 = torch.randn(6, 8, generator=g)
    u, v = torch.randn(6, 2, generator=g), torch.randn(2, 8, generator=g)
    w = w0 + 3.0 * (u @ v)  # an edit whose largest singular values exceed σ_max(W_0)
    assert torch.linalg.svdvals(w - w0)[0] > torch.linalg.svdvals(w0)[0]
    model = torch.nn.Linear(8, 6, bias=False)
    with torch.no_grad():
        model.weight.copy_(w)

    class Hook:  # the published nethook.get_parameter
        @staticmethod
        def get_parameter(m, name):
            return dict(m.named_parameters())[name]

    vs.published_prune_restraint(Hook, model, {"weight": w0.clone()})
    expected = solvers.prune_postprocess(w0, w, "current")
    assert torch.allclose(model.weight.detach(), expected, atol=1e-5)
    assert not torch.allclose(expected, solvers.prune_postprocess(w0, w, "original"))


def test_published_projection_annihilates_kept_directions():
    vs = benchmark("vs_published")
    torch.manual_seed(0)
    U, _ = torch.linalg.qr(torch.randn(6, 6))
    S = torch.tensor([5.0, 2.0, 1.0, 1e-3, 1e-4, 0.0])
    C0 = U @ torch.diag(S) @ U.T
    P = vs.published_projection(C0, 1e-2)
    small = U[:, 3:]
    assert torch.allclose(P, small @ small.T, atol=1e-5)  # the span of the three small directions
    assert torch.allclose(P @ C0, torch.zeros(6, 6), atol=1e-3)


def test_blueedit_side_on_tiny_model(tmp_path):
    vs = benchmark("vs_published")
    model, tok = make_model("llama"), make_tokenizer()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    out = tmp_path / "vs"
    res = vs.main(TINY + ["--sides", "blueedit", "--cache-dir", str(tmp_path / "cache"), "--out", str(out)],
                  model=model, tokenizer=tok, requests=REQUESTS, texts=CORPUS[:4])
    assert [(r["pair"], r["side"]) for r in res["runs"]] == [
        ("memit", "blueedit"), ("memit_blue", "blueedit"), ("alphaedit", "blueedit"), ("alphaedit_blue", "blueedit")]
    for r in res["runs"]:
        assert "error" not in r, r.get("traceback")
        assert r["seconds_per_edit"] > 0 and r["cpu_seconds_per_edit"] > 0 and len(r["round_cpu_seconds"]) == 2
        assert all(0 <= r[k] <= 100 for k in vs.METRICS)
    assert res["runs"][1]["edited_layers"] == [1, 3] and res["runs"][0]["edited_layers"] == [1, 2, 3]
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # restored
    assert "blueedit: memit (boundary)" in res["table"]
    saved = json.loads(out.with_suffix(".json").read_text())
    assert saved["runs"][0]["pair"] == "memit" and out.with_suffix(".md").is_file()
    assert [e["edits"] for e in saved["runs"][0]["per_round"]] == [3]  # evaluated after the last round only


def test_table_compares_after_the_same_number_of_edits():
    vs = benchmark("vs_published")

    def run(side, per_round):
        return {"pair": "memit", "side": side, "update_norms": [{"4": 1.0}], "update_fingerprints": [{"4": 2.0}],
                "per_round": [{"edits": n, "seconds": 10.0 * n, "efficacy": e, "generalization": e,
                               "specificity": 50.0} for n, e in per_round]}

    published = run("published", [(25, 90.0)])  # stopped after one round
    ours = run("blueedit", [(25, 92.0), (50, 80.0)])
    pre = {"25": {"efficacy": 10.0, "generalization": 20.0, "specificity": 60.0}, "50": {"efficacy": 5.0}}
    table = vs.markdown_table([published, ours], pre)
    assert "| MEMIT_seq | difference (blueedit − published) | 25 | +2.00 | +2.00 | +0.00 | 1.00x faster | - |" in table
    assert "| MEMIT_seq | unedited model | 25 | 10.00 | 20.00 | 60.00 | - | - |" in table
    assert "80.00" not in table
    ours["update_norms"] = [{"4": 1.1}]
    assert abs(vs.update_agreement(published, ours)["norm"] - 0.1) < 1e-12
    # relative to the round's largest update: a near-zero layer's round-off does not count as 100 %
    published.update(update_norms=[{"4": 10.0, "8": 1e-6}], update_fingerprints=[{"4": 3.0, "8": 1e-6}])
    ours.update(update_norms=[{"4": 10.0, "8": 2e-6}], update_fingerprints=[{"4": 3.0, "8": -1e-6}])
    agree = vs.update_agreement(published, ours)
    assert agree["norm"] < 1e-6 and agree["fingerprint"] < 1e-6
    ours["update_fingerprints"] = [{"4": 4.0, "8": 1e-6}]
    assert abs(vs.update_agreement(published, ours)["fingerprint"] - 0.1) < 1e-12


@pytest.mark.skipif(not PUBLISHED, reason=NO_CHECKOUT)
def test_published_side_on_tiny_model(tmp_path):
    """Both sides, MEMIT and AlphaEdit with BLUE, on a tiny Llama; then --merge of two partial files."""
    vs = benchmark("vs_published")
    model, tok = make_model("llama"), make_tokenizer()
    common = TINY + ["--methods", "memit,alphaedit_blue", "--published", PUBLISHED,
                     "--cache-dir", str(tmp_path / "cache"), "--published-log", str(tmp_path / "published.log")]
    res = vs.main(common + ["--eval-every-round", "--out", str(tmp_path / "both")], model=model, tokenizer=tok, requests=REQUESTS,
                  texts=CORPUS[:4])
    runs = {(r["pair"], r["side"]): r for r in res["runs"]}
    assert set(runs) == {("memit", "published"), ("memit", "blueedit"),
                         ("alphaedit_blue", "published"), ("alphaedit_blue", "blueedit")}
    for r in runs.values():
        assert "error" not in r, r.get("traceback")
        assert all(0 <= r[k] <= 100 for k in vs.METRICS)
    pub, ours = runs[("memit", "published")], runs[("memit", "blueedit")]
    assert pub["edited_layers"] == ours["edited_layers"] == [1, 2, 3]
    assert runs[("alphaedit_blue", "published")]["edited_layers"] == [1, 3]
    assert all(v > 0 for v in pub["update_norms"][0].values())  # the published code did edit
    for pair in ("memit", "alphaedit_blue"):  # same data, same C_0, same templates: the same updates
        a, b = runs[(pair, "published")]["update_norms"], runs[(pair, "blueedit")]["update_norms"]
        assert len(a) == len(b) == 2
        for ra, rb in zip(a, b):
            assert ra.keys() == rb.keys()
            assert all(abs(ra[l] - rb[l]) <= 1e-3 * ra[l] for l in ra), (pair, ra, rb)
    assert [e["edits"] for e in pub["per_round"]] == [2, 3] and pub["complete"]
    assert set(res["pre_edit_by_edits"]) == {"2", "3"} and "| MEMIT_seq | unedited model | 3 |" in res["table"]
    tc = res["tokenization"]
    assert tc["prompts"] == 3 * (len(res["context_templates"]) + 1)
    assert tc["token_ids_differ"] == 0 and tc["fact_index_differs"] == 0, tc["examples"]
    agree = vs.update_agreement(pub, ours)
    assert agree["rounds"] == 2 and agree["norm"] < 1e-3 and agree["fingerprint"] < 1e-3
    assert "difference (blueedit − published)" in res["table"]
    assert (tmp_path / "published.log").stat().st_size > 0
    merged = vs.main(["--merge", str(tmp_path / "both.json"), str(tmp_path / "both.json"),
                      "--out", str(tmp_path / "merged")])
    assert len(merged["runs"]) == 4 and Path(tmp_path / "merged.md").is_file()


#: The other pairs, two at a time: both sides on the tiny Llama (PRUNE's driver needs rounds that divide the records).
OTHER_PAIRS = [("pmet", "pmet_blue", []), ("rect", "rect_blue", []),
               ("prune", "prune_blue", ["--num-edits", "2", "--edits-per-round", "1"])]


@pytest.mark.skipif(not PUBLISHED, reason=NO_CHECKOUT)
@pytest.mark.parametrize("plain,blue,sizes", OTHER_PAIRS, ids=[p[0] for p in OTHER_PAIRS])
def test_other_pairs_on_tiny_model(tmp_path, plain, blue, sizes):
    """PMET, RECT and PRUNE, without and with BLUE: same data, same C_0, same templates, the same
    per-round updates on both sides (as the MEMIT test), with the settings mapped as documented."""
    vs = benchmark("vs_published")
    model, tok = make_model("llama"), make_tokenizer()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    res = vs.main(TINY + sizes + ["--methods", f"{plain},{blue}", "--published", PUBLISHED, "--no-pre-edit",
                                  "--cache-dir", str(tmp_path / "cache"), "--published-log", str(tmp_path / "log"),
                                  "--out", str(tmp_path / "out")],
                  model=model, tokenizer=tok, requests=REQUESTS, texts=CORPUS[:4])
    runs = {(r["pair"], r["side"]): r for r in res["runs"]}
    assert set(runs) == {(p, s) for p in (plain, blue) for s in vs.SIDES}
    for r in runs.values():
        assert "error" not in r, r.get("traceback")
        assert r["complete"] and all(0 <= r[k] <= 100 for k in vs.METRICS)
    rounds = 2
    for pair, layers in ((plain, [1, 2, 3]), (blue, [1, 3])):
        pub, ours = runs[(pair, "published")], runs[(pair, "blueedit")]
        assert pub["edited_layers"] == ours["edited_layers"] == layers
        assert pub["hparams"]["blue"] is vs.PAIRS[pair].blue and pub["hparams"]["layers"] == layers
        assert all(v > 0 for v in pub["update_norms"][0].values())  # the published code did edit
        assert len(pub["update_norms"]) == len(ours["update_norms"]) == rounds
        for ra, rb in zip(pub["update_norms"], ours["update_norms"]):
            assert ra.keys() == rb.keys()
            assert all(abs(ra[l] - rb[l]) <= 1e-3 * ra[l] for l in ra), (pair, ra, rb)
        agree = vs.update_agreement(pub, ours)
        assert agree["rounds"] == rounds and agree["norm"] < 1e-3 and agree["fingerprint"] < 1e-3, (pair, agree)
        _check_mapping(vs, pair, pub["hparams"], ours["hparams"])
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # restored


def _check_mapping(vs, pair: str, pub: dict, ours: dict) -> None:
    """The settings each side was given (module docstring, "The other pairs")."""
    method = vs.PAIRS[pair].method
    assert ours["method"] == method and pub["mom2_update_weight"] == ours["lam"]
    assert (pub["v_lr"], pub["v_num_grad_steps"], pub["v_loss_layer"]) == (
        ours["v_lr"], ours["v_num_grad_steps"], ours["loss_layer"])
    if method == "pmet":
        assert pub["rewrite_module_tmps"] == [pub["rewrite_module_tmp"]] == ["model.layers.{}.mlp.down_proj"]
        assert pub["mlp_module_tmp"] == "model.layers.{}.mlp.down_proj"
        assert pub["attn_module_tmp"] == "model.layers.{}.self_attn.o_proj" and pub["nll_loss_factor"] == 1.0
        assert (ours["top1_nll_factor"], ours["top1_kl_stop"], ours["use_history"]) == (0.1, 0.01, True)
    else:
        assert ours["use_history"] is False
    if method == "rect":
        assert ours["rect_keep"] == vs.published_rect_keep(32 * 64) > 0.4  # the tiny Llama's W_out
    if method == "prune":
        assert ours["prune_base"] == "current"
