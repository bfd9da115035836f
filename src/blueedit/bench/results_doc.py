"""Build ``docs/results.md`` from the committed result files under ``benchmarks/results/``.

Every number in the page is read from a result file that the page links beside it (the test
``tests/test_results_doc.py`` checks both that the page is what this script makes from the files and
that each number in a section appears in a file the section links). The paired comparisons
(``python -m blueedit.bench.paired``) of every arm pair with per-record outcomes are computed here too and
written beside their sources, so that one command refreshes everything::

    python -m blueedit.bench.results_doc            # write docs/results.md and the paired files
    python -m blueedit.bench.results_doc --check    # exit 1, naming the stale files, when anything differs

A 2,000-edit CounterFact pair (``counterfact_memit_2000``, ``counterfact_alphaedit_2000``: runs of
``sequence.py`` whose ``runs/<method>_<strategy>.json`` hold per-record values) is picked up when
its run records are present.
"""

from __future__ import annotations

import contextlib
import csv
import json
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from blueedit.bench import harness as C
from blueedit.bench import paired

RESULTS = C.REPO / "benchmarks" / "results"
DOC = C.REPO / "docs" / "results.md"
README = C.REPO / "README.md"
README_START = "<!-- results: generated from benchmarks/results/, do not edit -->"
README_END = "<!-- /results -->"
#: The BLUE paper's claims and this project's verdicts: (short name, claim, verdict, anchor in results.md).
CLAIMS = [
    ("(a) editing quality", "BLUE edits better than the distributed residual in sequential batch editing (efficacy, "
     "generalization, specificity)", "partly", "claim-a-editing-quality-blue-against-the-distributed-residual"),
    ("(b) weight shift error", "The distributed residual causes a weight shift error that grows with the distance "
     "from the last critical layer, the batch size and the length of the sequence; BLUE removes it", "partly",
     "claim-b-the-weight-shift-error"),
    ("(c) general capability", "BLUE keeps more of the model's general capability and its hidden states drift less",
     "partly", "claim-c-general-capability-and-hidden-state-drift"),
]
LINK_ROOT = "../benchmarks/results/"
METRICS = ("efficacy", "generalization", "specificity")

#: Arm pairs whose result files keep per-record outcomes: ``paired.py`` command lines.
RECORD_PAIRS: list[list[str]] = [
    ["--arms", "benchmarks/results/gemma3_dtype/memit_50_float32.json:post",
     "benchmarks/results/gemma3_dtype/memit_50_bfloat16.json:post", "--names", "float32", "bfloat16",
     "--out", "benchmarks/results/gemma3_dtype"],
    ["--arms", "benchmarks/results/fit_memit_blue_smollm2.json:pre",
     "benchmarks/results/fit_memit_blue_smollm2.json:post", "--names", "unedited", "MEMIT + BLUE",
     "--out", "benchmarks/results", "--stem", "fit_memit_blue_smollm2_paired"],
]
#: The lifelong tables (T edits, one per round).
LIFELONG_T = (10, 100, 200)
#: Long CounterFact pairs with per-record values, used when their run records exist: (name, method).
LONG_PAIRS: list[tuple[str, str]] = [("counterfact_memit_2000", "memit"), ("counterfact_alphaedit_2000", "alphaedit")]
#: Sequence pairs first run without per-record outcomes; once rerun with them they are paired like the long pairs.
RERUN_PAIRS: list[tuple[str, str]] = [("zsre_memit_1000", "memit"), ("counterfact_gemma3_500", "memit")]
#: The records of a paired sequence run, where not CounterFact on SmolLM2.
PAIR_LABELS: dict[str, str] = {"zsre_memit_1000": "zsRE", "counterfact_gemma3_500": "Gemma 3 270M CounterFact"}
#: The 1,000-edit pairs (aggregates only): (name, method, dataset label, command).
SEQUENCE_1000: list[tuple[str, str, str, str]] = [
    ("counterfact_memit_1000", "memit", "CounterFact",
     "python -m blueedit.bench.sequence --name counterfact_memit_1000 --dataset counterfact-easyedit \\\n"
     "    --num-edits 1000 --edits-per-round 100 --eval-every 250 --general-every 500 --wse-every 0 \\\n"
     "    --runs memit:distribute memit:boundary --out benchmarks/results \\\n"
     "    --set model.editing.compute_dtype=bfloat16 model.editing.target.loss_layer=29"),
    ("counterfact_alphaedit_1000", "alphaedit", "CounterFact",
     "python -m blueedit.bench.sequence --name counterfact_alphaedit_1000 --dataset counterfact-easyedit \\\n"
     "    --num-edits 1000 --edits-per-round 100 --eval-every 250 --general-every 500 --wse-every 0 \\\n"
     "    --config configs/smollm2-135m/alphaedit.yaml --runs alphaedit:distribute alphaedit:boundary \\\n"
     "    --out benchmarks/results --set model.editing.compute_dtype=bfloat16 model.editing.target.loss_layer=29"),
    ("zsre_memit_1000", "memit", "zsRE",
     "python -m blueedit.bench.sequence --name zsre_memit_1000 --dataset zsre_eval+zsre_dev \\\n"
     "    --num-edits 1000 --edits-per-round 100 --eval-every 250 --general-every 500 --wse-every 0 \\\n"
     "    --runs memit:distribute memit:boundary --config configs/smollm2-135m/memit.yaml --out benchmarks/results \\\n"
     "    --set model.editing.compute_dtype=bfloat16 model.editing.target.loss_layer=29"),
]
GEMMA_500 = ("python -m blueedit.bench.sequence --name counterfact_gemma3_500 --dataset counterfact-easyedit \\\n"
             "    --num-edits 500 --edits-per-round 100 --eval-every 250 --general-every 500 --wse-every 0 \\\n"
             "    --config configs/gemma3-270m/memit.yaml --runs memit:distribute --out benchmarks/results \\\n"
             "    --set model.editing.compute_dtype=bfloat16\n"
             "# the same with --runs memit:boundary and model.editing.target.site=mlp added to --set")
VS_PUBLISHED = (
    "# each side in its own process, then one table; /path/to/BLUE is a checkout of github.com/xpq-tech/BLUE\n"
    "OMP_NUM_THREADS=1 python -m blueedit.bench.vs_published --published /path/to/BLUE --methods memit --sides published \\\n"
    "    --threads 1 --loss-layer 29 --eval-every-round --no-pre-edit --out pub_memit\n"
    "OMP_NUM_THREADS=1 python -m blueedit.bench.vs_published --published /path/to/BLUE --methods memit_blue --sides published \\\n"
    "    --threads 1 --loss-layer 29 --eval-every-round --no-pre-edit --out pub_memit_blue\n"
    "OMP_NUM_THREADS=1 python -m blueedit.bench.vs_published --methods memit,memit_blue --sides blueedit \\\n"
    "    --threads 1 --loss-layer 29 --eval-every-round --out be_memit\n"
    "python -m blueedit.bench.vs_published --merge pub_memit.json pub_memit_blue.json be_memit.json \\\n"
    "    --out benchmarks/results/vs_published")
#: The PMET comparison with the published code: each side, then the merge.
VS_PUBLISHED_PMET = (
    "python -m blueedit.bench.vs_published --published ../published-BLUE --methods pmet,pmet_blue --sides published \\\n"
    "    --num-edits 50 --edits-per-round 25 --threads 1 --loss-layer 29 --out pub_pmet\n"
    "python -m blueedit.bench.vs_published --methods pmet,pmet_blue --sides blueedit --num-edits 50 \\\n"
    "    --edits-per-round 25 --threads 1 --loss-layer 29 --out be_pmet\n"
    "python -m blueedit.bench.vs_published --merge pub_pmet.json be_pmet.json --out benchmarks/results/vs_published_pmet")
#: AlphaEdit, RECT and PRUNE against the published code: each side, then the merge.
VS_PUBLISHED_METHODS = (
    "python -m blueedit.bench.vs_published --published ../published-BLUE --methods alphaedit,alphaedit_blue --sides published \\\n"
    "    --num-edits 50 --edits-per-round 25 --threads 1 --loss-layer 29 --out pub_ar\n"
    "python -m blueedit.bench.vs_published --published ../published-BLUE --methods rect,rect_blue --sides published \\\n"
    "    --num-edits 50 --edits-per-round 25 --threads 1 --loss-layer 29 --out pub_rect\n"
    "python -m blueedit.bench.vs_published --published ../published-BLUE --methods prune,prune_blue --sides published \\\n"
    "    --num-edits 50 --edits-per-round 25 --threads 1 --loss-layer 29 --out pub_prune\n"
    "python -m blueedit.bench.vs_published --methods alphaedit,alphaedit_blue,rect,rect_blue,prune,prune_blue --sides blueedit \\\n"
    "    --num-edits 50 --edits-per-round 25 --threads 1 --loss-layer 29 --out be_arp\n"
    "python -m blueedit.bench.vs_published --merge pub_ar.json pub_rect.json pub_prune.json be_arp.json \\\n"
    "    --out benchmarks/results/vs_published_methods")
#: The comparisons with the published code, one result ``.md`` each, in the order of the summary table.
VS_PUBLISHED_FILES = ["vs_published.md", "vs_published_pmet.md", "vs_published_methods.md"]
#: The ten rows of the summary: the published code's method names (``ALG_DICT``), each without and with BLUE.
VS_PUBLISHED_ROWS = [name + blue for name in ("MEMIT_seq", "AlphaEdit", "PMET_seq", "MEMIT_rect", "MEMIT_prune")
                     for blue in ("", " + BLUE")]
#: Why a summary row's metrics differ between the two sides, by the published method name.
VS_PUBLISHED_WHY = {
    "MEMIT_seq + BLUE": "the two sides' updates agree to float rounding in the first round and drift apart at "
                        "l_m from the second on (the per-round ‖ΔW_l‖ of each side are in the JSON file); the cause "
                        "was not isolated further; AlphaEdit + BLUE, PMET + BLUE and PRUNE + BLUE, which share the "
                        "two-layer path, give equal metrics",
    "MEMIT_rect + BLUE": "RECT keeps the entries of each update with the largest relative change, a fixed share of "
                         "them; entries whose scores differ only by rounding near that cutoff are kept on one side and "
                         "dropped on the other, which is why both RECT rows have the largest ⟨ΔW_l, R_l⟩ differences "
                         "(a few entries exchanged rather than a rescaled update); here that moved about two "
                         "neighbourhood prompts",
}
#: Runs of the wild protocol: (name, dataset label). Each pair MEMIT / MEMIT + BLUE that exists is
#: compared record by record; a ``<name>_stop_period`` run beside it is compared with it, arm by arm.
WILD_RUNS: list[tuple[str, str]] = [("wild_counterfact_200x50", "CounterFact"), ("wild_zsre_200x50", "zsRE"),
                                    ("wild_counterfact_20x5", "CounterFact")]
WILD_METRICS = ["efficacy", "generalization", "specificity", "efficacy_wild", "efficacy_wild_exact",
                "generalization_wild", "specificity_wild", "locality_wild"]
GATED = "counterfact_gemma3_500_gated"
WSE = ("python -m blueedit.bench.weight_shift --name wse_counterfact --batch-sizes 10 50 100 --sequence-batch-size 10 \\\n"
       "    --sequence-edits 200 --sequence-wse-every 50 --dataset counterfact-easyedit --runs memit:distribute \\\n"
       "    --set model.editing.compute_dtype=bfloat16 model.editing.target.loss_layer=29")


# -- reading result files ---------------------------------------------------------------------------
def read_json(rel: str) -> Any:
    return json.loads((RESULTS / rel).read_text())


def sequence_values(name: str) -> dict[tuple[str, str, int, str], float]:
    """``(method, strategy, edits, metric) -> value`` of ``<name>/sequence.csv``."""
    out = {}
    with open(RESULTS / name / "sequence.csv", newline="") as f:
        for r in csv.DictReader(f):
            if r["value"] not in ("", "nan"):
                out[(r["method"], r["strategy"], int(r["edits"]), r["metric"])] = float(r["value"])
    return out


def md_tables(rel: str) -> list[list[str]]:
    """The markdown tables of a result ``.md`` file, each as its lines."""
    return [table for _, table in md_task_tables(rel)]


def _current_script(match: re.Match) -> str:
    """``python benchmarks/<name>.py`` in the form the checkout runs it: the package module
    ``python -m blueedit.bench.<name>`` where the benchmark lives there."""
    name = match.group(1)
    module = C.REPO / "src" / "blueedit" / "bench" / f"{name}.py"
    return f"python -m blueedit.bench.{name}" if module.is_file() else match.group(0)


def _current_options(command: str) -> str:
    """Options a benchmark renamed: ``--edits N`` became ``--num-edits N`` where the module takes only
    the latter; a removed ``<method>_blue.yaml`` is its method config with the overlay ``configs/blue.yaml``."""
    module = re.match(r"(?:\S+=\S+ )*python -m blueedit\.bench\.(\w+)", command)
    if module:
        source = (C.REPO / "src" / "blueedit" / "bench" / f"{module.group(1)}.py").read_text()
        if '"--edits"' not in source and '"--num-edits"' in source:
            command = re.sub(r"(?<=\s)--edits(?=[\s=])", "--num-edits", command)
    if (C.REPO / "configs" / "blue.yaml").is_file():
        def overlay(m: re.Match) -> str:
            base = f"{m.group(2)}{m.group(3)}.yaml"
            if (C.REPO / m.group(2) / f"{m.group(3)}_blue.yaml").is_file():
                return m.group(0)
            return (f"{m.group(1)}{base} --config configs/blue.yaml" if m.group(1) == "--config "
                    else f"{m.group(1)}{base},configs/blue.yaml")
        command = re.sub(r"(--config |=)(configs/[\w.-]+/)(\w+)_blue\.yaml", overlay, command)
    return command


def sanitize(command: str) -> str:
    """A recorded command as a user types it today: data and work directories outside the repository
    shown as ``$BLUEEDIT_DATA_DIR`` and relative directories, the benchmark in its current form."""
    command = re.sub(r"(?:/work/shared|\.\./shared)/data", "$BLUEEDIT_DATA_DIR", command)
    command = re.sub(r"/work/(?:wt-[\w-]+|main)/", "", command)  # a checkout of this repository
    command = re.sub(r" --workdir /work/\S+", "", command)  # checkpoints: the default place
    command = re.sub(r" --cme-dir \S+", "", command)  # built compositions (derived data): the default place
    command = re.sub(r" --published \S+", " --published ../published-BLUE", command)  # the user's checkout
    command = re.sub(r"/work/(\w+)", r"\1", command)
    command = re.sub(r"python benchmarks/(\w+)\.py", _current_script, command)
    return "\n".join(_current_options(line) for line in command.split("\n"))


def recorded_commands(name: str, fallback: str) -> list[str]:
    """The commands a result directory's run record (``run.json``) names, else ``fallback``."""
    path = RESULTS / name / "run.json"
    if path.is_file():
        record = json.loads(path.read_text())
        commands = record.get("commands") or ([record["command"]] if record.get("command") else [])
        if commands:
            return [sanitize(c) for c in commands]
    return [sanitize(fallback)]


def versions_of(data: Any) -> list[tuple[str, ...]]:
    """Every ``versions`` dict inside a run record, as sorted ``name version`` tuples."""
    found = []
    if isinstance(data, dict):
        v = data.get("versions")
        if isinstance(v, dict) and all(isinstance(x, str) for x in v.values()):
            found.append(tuple(f"{k} {v[k]}" for k in sorted(v)))
        for key, val in data.items():
            if key != "versions":
                found += versions_of(val)
    elif isinstance(data, list):
        for val in data:
            found += versions_of(val)
    return found


def recorded_versions() -> str:
    """The distinct ``versions`` of every JSON result file, as text."""
    combos: list[tuple[str, ...]] = []
    for path in sorted(RESULTS.rglob("*.json")):
        combos += [v for v in versions_of(json.loads(path.read_text())) if v not in combos]
    return "; ".join(", ".join(v) for v in combos)


# -- writing ----------------------------------------------------------------------------------------
def f1(v: float) -> str:
    return f"{v:.1f}"


def f2(v: float) -> str:
    return f"{v:.2f}"


class Page:
    """The page being written: lines, and the result files each link names."""

    def __init__(self, pending: set[Path] = frozenset()) -> None:
        self.lines: list[str] = []
        self.cited: list[str] = []
        self.pending = pending  # files about to be written (the paired comparisons)

    def link(self, rel: str, text: str | None = None) -> str:
        if not (RESULTS / rel).exists() and (RESULTS / rel).resolve() not in self.pending:
            raise FileNotFoundError(f"results_doc: cited result file missing: benchmarks/results/{rel}")
        self.cited.append(rel)
        return f"[`{text or rel}`]({LINK_ROOT}{rel})"

    def add(self, *lines: str) -> None:
        self.lines.extend(lines)

    def code(self, *commands: str) -> None:
        """A bash block of commands, each as a user types it today (:func:`sanitize`)."""
        self.add("```bash", *[sanitize(c) for c in commands], "```", "")

    def table(self, header: list[str], rows: list[list[str]], left: int = 1) -> None:
        """A markdown table; the first ``left`` columns left-aligned, the others right-aligned."""
        align = ["---"] * left + ["---:"] * (len(header) - left)
        self.add("| " + " | ".join(header) + " |", "|" + "|".join(align) + "|",
                 *["| " + " | ".join(r) + " |" for r in rows], "")

    def text(self) -> str:
        return "\n".join(self.lines).rstrip("\n") + "\n"


def long_pair_payloads() -> dict[str, tuple[list[str], dict[str, Any]]]:
    """``name -> (paired.py argv, payload)`` for every long pair whose two run records exist and hold
    per-record values."""
    out = {}
    for name, method in LONG_PAIRS + RERUN_PAIRS:
        runs = RESULTS / name / "runs"
        a, b = f"{method}_distribute", f"{method}_boundary"
        if not ((runs / f"{a}.json").is_file() and (runs / f"{b}.json").is_file()):
            continue
        argv = ["--results", os.path.relpath(RESULTS / name, C.REPO), "--runs", a, b,
                "--names", method.replace("alphaedit", "AlphaEdit").replace("memit", "MEMIT"),
                method.replace("alphaedit", "AlphaEdit").replace("memit", "MEMIT") + " + BLUE"]
        try:
            payload, _, _ = paired.build(argv)
        except SystemExit:
            continue  # run records without per-record values yet
        out[name] = (argv, payload)
    return out


def _names(run: str) -> str:
    method, strategy = run.split("_", 1)
    label = method.replace("alphaedit", "AlphaEdit").replace("memit", "MEMIT")
    return label + (" + BLUE" if strategy == "boundary" else "")


def lifelong_pairs() -> list[list[str]]:
    """``paired.py`` command lines of the lifelong tables whose MEMIT and MEMIT + BLUE rows kept their
    per-record outcomes (``lifelong_T<T>/<row>.json``)."""
    argvs = []
    for t in LIFELONG_T:
        rows = RESULTS / f"lifelong_T{t}"
        if (rows / "MEMIT.json").is_file() and (rows / "MEMIT_plus_BLUE.json").is_file():
            rel = os.path.relpath(rows, C.REPO)
            argvs.append(["--arms", f"{rel}/MEMIT.json:post", f"{rel}/MEMIT_plus_BLUE.json:post",
                          "--names", "MEMIT", "MEMIT + BLUE", "--out", rel, "--stem", "paired"])
    return argvs


def results_rel(path: str | Path) -> str:
    """A path given relative to the repository (as ``paired.py`` takes it), relative to the results directory."""
    return os.path.relpath(os.path.abspath(C.REPO / path), os.path.abspath(RESULTS)).replace(os.sep, "/")


def lifelong_payloads(page: Page) -> list[tuple[dict[str, Any], str]]:
    """``(paired payload, link to its JSON)`` of every lifelong pair that kept per-record outcomes."""
    out = []
    for argv in lifelong_pairs():
        payload, where, stem = paired.build(argv)
        out.append((payload, page.link(os.path.normpath(results_rel(where) + f"/{stem}.json"))))
    return out


def interval_text(row: dict[str, Any]) -> str:
    """A paired row's difference with its interval: ``+d.dd [+l.ll, +h.hh]``."""
    return f"{row['difference']:+.2f} [{row['low']:+.2f}, {row['high']:+.2f}]"


def lifelong_paired_clause(pairs: list[tuple[dict[str, Any], str]]) -> str:
    """``; paired over records, specificity at T = ...: d [low, high] (verdict)`` for the lifelong pairs
    that kept per-record outcomes; empty when none did."""
    words = {"B": "BLUE leads", "A": "BLUE trails", "tie": "a tie"}
    parts = []
    for payload, link in pairs:
        row = next(r for r in payload["rows"] if r["metric"] == "specificity")
        parts.append(f"T = {row['edits']} {interval_text(row)}, "
                     f"{words[row['verdict']]} ({link})")
    return "; paired over records, specificity at " + "; ".join(parts) if parts else ""


def lifelong_lead_clause(pairs: list[tuple[dict[str, Any], str]]) -> str:
    """`` Paired, lifelong zsRE, T = ..., BLUE leads: metric d [low, high]; ...`` for the lifelong pairs
    with a metric where MEMIT + BLUE leads; empty when none does."""
    parts = []
    for payload, link in pairs:
        leads = [f"{r['metric']} {interval_text(r)}"
                 for r in payload["rows"] if r["verdict"] == "B"]
        if leads:
            parts.append(f" Paired, lifelong zsRE, T = {payload['rows'][0]['edits']} ({link}), BLUE leads: "
                         + "; ".join(leads) + ".")
    return "".join(parts)


def wild_pairs() -> list[list[str]]:
    """``paired.py`` command lines of the wild runs: MEMIT against MEMIT + BLUE inside each run
    directory, and each arm without against with ``stop_after: period``."""
    argvs = []
    for name, _ in WILD_RUNS:
        runs = RESULTS / name / "runs"
        metrics = ["--metrics", *WILD_METRICS]
        done = sorted(p.stem for p in runs.glob("*.json")) if runs.is_dir() else []
        stop = RESULTS / f"{name}_stop_period" / "runs"
        for variant in (name, f"{name}_stop_period"):
            if (RESULTS / variant / "runs" / "memit_distribute.json").is_file() and \
                    (RESULTS / variant / "runs" / "memit_boundary.json").is_file():
                tag = "" if variant == name else ", stop_after: period"
                argvs.append(["--results", os.path.relpath(RESULTS / variant, C.REPO), "--runs", "memit_distribute",
                              "memit_boundary", "--names", f"MEMIT{tag}", f"MEMIT + BLUE{tag}", *metrics])
        for run in done:
            if (stop / f"{run}.json").is_file():
                argvs.append(["--arms", os.path.relpath(runs / f"{run}.json", C.REPO),
                              os.path.relpath(stop / f"{run}.json", C.REPO), "--names", _names(run),
                              f"{_names(run)}, stop_after: period", *metrics,
                              "--out", os.path.relpath(stop.parent, C.REPO), "--stem", f"paired_stop_{run}"])
    return argvs


def paired_outputs() -> dict[Path, str]:
    """Every paired file this script writes: path -> text."""
    files: dict[Path, str] = {}
    argvs = (list(RECORD_PAIRS) + lifelong_pairs() + [argv for argv, _ in long_pair_payloads().values()]
             + wild_pairs())
    for argv in argvs:
        payload, out, stem = paired.build(argv)
        for ext, text in paired.outputs(payload).items():
            files[(C.REPO / out / f"{stem}.{ext}").resolve()] = text
    return files


# -- the page ---------------------------------------------------------------------------------------
def header(page: Page) -> None:
    cited = ["lifelong_T200.json", "vs_published.json", "counterfact_gemma3_500/runs/memit_boundary.json",
             "speed_100x100.json", "methods_smollm2/memit_distribute.json"]
    combos = recorded_versions()
    page.add("# Results", "",
             "What blueedit measures on its own models (SmolLM2-135M-Instruct, and Gemma 3 270M where named: "
             + page.link("counterfact_gemma3_500/table.md") + "), "
             "claim by claim, with the command that produced each number and the result file it is read from. "
             "This page is generated from the files under `benchmarks/results/` by "
             "`python -m blueedit.bench.results_doc`; do not edit it by hand.", "",
             "## Provenance", "",
             "Library versions recorded in the run records (the `versions` of every JSON result file, for example "
             + ", ".join(page.link(r) for r in cited) + "; the 1,000-edit sequence runs kept only their CSV and "
             "table, which record none): " + combos + ".", "")
    page.add("Machine: the CPU named in each record (`device`), no GPU. Long runs and the 100-edit method table ran "
             "the forward and backward passes on a bfloat16 copy of the model (`editing.compute_dtype: bfloat16`, "
             "as their commands show); the solves and the written updates stay float32/float64.", "")
    page.add("## How two arms are compared", "",
             "Two arms evaluated on the same records are compared record by record "
             "(`blueedit.evaluation.paired`, `python -m blueedit.bench.paired`; for example "
             + page.link("gemma3_dtype/paired.json") + "): the paired difference B − A of "
             "each metric with its 95 % percentile-bootstrap interval over records (seeded), and McNemar's "
             "exact test on per-record success (a record succeeds when its value is above 50: CounterFact "
             "efficacy is one comparison per record; generalization and specificity succeed when more than "
             "half of the record's prompts do; zsRE when more than half of the answer tokens are right). A "
             "lead whose interval contains 0 is a tie. Runs that stored only aggregate metrics cannot be "
             "compared this way; their tables below give both arms' values and say so.", "")


def claim_cell(i: int) -> str:
    name, claim, _, _ = CLAIMS[i]
    return f"{name.split()[0]} {claim}"


def verdict_cell(i: int) -> str:
    return f"**{CLAIMS[i][2]}**"


def readme_results(readme: str) -> str:
    """``readme`` with its Results block (between the markers) made from :data:`CLAIMS` and the run
    records' versions."""
    if README_START not in readme or README_END not in readme:
        raise SystemExit(f"README.md lacks the markers {README_START!r} and {README_END!r} of its Results block")
    combos = recorded_versions()
    lines = [README_START, "",
             "The BLUE paper makes three claims; the table gives this project's verdict on its models "
             "(SmolLM2-135M-Instruct, Gemma 3 270M): holds, partly or not seen. The numbers for and against each, "
             "the paired intervals, and the command and result file behind every number are in "
             "[`docs/results.md`](docs/results.md).", "",
             "| claim | verdict | details |", "|---|---|---|"]
    lines += [f"| {claim} | **{verdict}** | [{name}](docs/results.md#{anchor}) |" for name, claim, verdict, anchor in CLAIMS]
    lines += ["", "Versions recorded in the run records: " + combos + ".", "",
              README_END]
    head, rest = readme.split(README_START, 1)
    return head + "\n".join(lines) + rest.split(README_END, 1)[1]


def untested_1000(long: dict[str, tuple[list[str], dict[str, Any]]]) -> str:
    """The caveat on the aggregate-only 1,000-edit CounterFact pairs, naming the long pairs whose
    per-record comparison at 1,000 edits exists (their clauses give it)."""
    tested = [payload["names"][0] for name, (_, payload) in long.items()
              if name in dict(LONG_PAIRS) and any(r["edits"] == 1000 for r in payload["rows"])]
    if not tested:
        return ("The CounterFact leads of the 1,000-edit runs are about one point, from one order of records, with no "
                "per-record outcomes kept, so untested. ")
    return ("The CounterFact leads of the 1,000-edit runs are about one point and kept no per-record outcomes; the "
            f"2,000-edit runs compare the same records at 1,000 edits record by record for {', '.join(tested)} "
            "(their paired clauses give the last evaluation point). ")


def verdicts(page: Page, long: dict[str, tuple[list[str], dict[str, Any]]]) -> None:
    cm = sequence_values("counterfact_memit_1000")
    ca = sequence_values("counterfact_alphaedit_1000")
    zs = sequence_values("zsre_memit_1000")
    gm = sequence_values("counterfact_gemma3_500")
    methods = {(r["method"], r["strategy"]): r for r in read_json("methods_smollm2/table.json")["runs"]}
    life = {t: {r["name"]: r["metrics"] for r in read_json(f"lifelong_T{t}.json")["runs"]} for t in (10, 100, 200)}
    site = {r["strategy"]: r for r in read_json("gemma3_target_site/block.json")["runs"]}
    wse = list(csv.DictReader(open(RESULTS / "wse_counterfact/weight_shift.csv")))

    def wse_y(figure: str, strategy: str, per_round: int, x: int) -> str:
        return f1(next(float(r["y"]) for r in wse if r["figure"] == figure and r["strategy"] == strategy
                       and int(r["edits_per_round"]) == per_round and int(r["x"]) == x))

    def vs(values: dict, method: str, edits: int, metric: str, fmt: Callable[[float], str] = f2) -> str:
        return f"{fmt(values[(method, 'boundary', edits, metric)])} vs {fmt(values[(method, 'distribute', edits, metric)])}"

    life_pairs = lifelong_payloads(page)  # the bootstraps, once for both clauses
    l_cm, l_ca, l_zs, l_gm = (page.link(f"{n}/sequence.csv") for n in
                              ("counterfact_memit_1000", "counterfact_alphaedit_1000", "zsre_memit_1000",
                               "counterfact_gemma3_500"))
    long_for, long_against = "", ""
    for name, (_, payload) in long.items():
        last = max(r["edits"] for r in payload["rows"])
        link = page.link(f"{name}/paired.json")
        for verdict, lead in (("B", "BLUE leads"), ("A", "BLUE trails"), ("tie", "a tie")):
            parts = [f"{r['metric']} {interval_text(r)}"
                     for r in payload["rows"] if r["edits"] == last and r["verdict"] == verdict]
            text = (f" Paired, {payload['names'][0]} at {last:,} {PAIR_LABELS.get(name, 'CounterFact')} edits ({link}), {lead}: "
                    + "; ".join(parts) + ".") if parts else ""
            if verdict == "B":
                long_for += text
            else:
                long_against += text
    page.add("## Verdicts", "",
             "The BLUE paper (Li et al., *Rethinking Residual Distribution in Locate-then-Edit Model Editing*) "
             "makes three claims. Each row gives this project's verdict on its models: **holds**, **partly** or **not seen**; \"X vs Y\" is BLUE against the distributed "
             "residual (BLUE first).", "")
    ms = lambda m, s, k: f2(methods[(m, s)][k])  # noqa: E731
    rows = [
        [claim_cell(0), verdict_cell(0),
         f"zsRE, MEMIT, 1,000 edits: efficacy {vs(zs, 'memit', 1000, 'efficacy')}, generalization "
         f"{vs(zs, 'memit', 1000, 'generalization')} ({l_zs}); Gemma 3 270M, 500 edits, targets at the MLP output: "
         f"efficacy {vs(gm, 'memit', 500, 'efficacy')} ({l_gm}); CounterFact, 1,000 edits, MEMIT: "
         f"{vs(cm, 'memit', 1000, 'efficacy')} efficacy, {vs(cm, 'memit', 1000, 'specificity')} specificity "
         f"({l_cm}); AlphaEdit: {vs(ca, 'alphaedit', 1000, 'generalization')} generalization ({l_ca})."
         + long_for + lifelong_lead_clause(life_pairs),
         untested_1000(long) + "PMET + BLUE edits worse than PMET: efficacy "
         f"{ms('pmet', 'boundary', 'efficacy')} vs {ms('pmet', 'distribute', 'efficacy')} at 100 edits "
         f"({page.link('methods_smollm2/table.json')})" + published_pmet_drop(page) + ". "
         f"zsRE specificity {vs(zs, 'memit', 1000, 'specificity')}. "
         f"Lifelong zsRE, MEMIT + BLUE against MEMIT, specificity at T = 10 / 100 / 200: "
         + " / ".join(f"{f1(life[t]['MEMIT + BLUE']['specificity']['post'])} vs {f1(life[t]['MEMIT']['specificity']['post'])}"
                      for t in (10, 100, 200))
         + f" ({', '.join(page.link(f'lifelong_T{t}.json') for t in (10, 100, 200))})" + lifelong_paired_clause(life_pairs)
         + ". On Gemma, at the "
         f"published target site (the block output) BLUE's specificity is {f2(site['boundary']['specificity'])} "
         f"vs {f2(site['distribute']['specificity'])} ({page.link('gemma3_target_site/block.json')})."
         + long_against],
        [claim_cell(1), verdict_cell(1),
         f"At 100 edits per round the error is {wse_y('distance', 'distribute', 100, 0)} at the last critical "
         f"layer and {wse_y('distance', 'distribute', 100, 4)} four layers below; the mean over layers is "
         f"{wse_y('batch_size', 'distribute', 10, 10)} / {wse_y('batch_size', 'distribute', 50, 50)} / "
         f"{wse_y('batch_size', 'distribute', 100, 100)} at 10 / 50 / 100 edits per round; "
         f"{wse_y('batch_size', 'boundary', 10, 10)} under BLUE ({page.link('wse_counterfact/weight_shift.csv')}).",
         "Not seen over the sequence: before edits 0 / 50 / 100 / 150 (rounds of 10) the mean error is "
         + " / ".join(wse_y("sequence", "distribute", 10, x) for x in (0, 50, 100, 150)) + "."],
        [claim_cell(2), verdict_cell(2),
         f"CounterFact, 1,000 edits, MEMIT: relative drift {vs(cm, 'memit', 1000, 'drift/relative')}, perplexity "
         f"{vs(cm, 'memit', 1000, 'general/perplexity')}; AlphaEdit: general capability "
         f"{vs(ca, 'alphaedit', 1000, 'general/mean')}, perplexity {vs(ca, 'alphaedit', 1000, 'general/perplexity')}; "
         f"Gemma, 500 edits: perplexity {vs(gm, 'memit', 500, 'general/perplexity')}.",
         f"zsRE, 1,000 edits: general capability {vs(zs, 'memit', 1000, 'general/mean')}, relative drift "
         f"{vs(zs, 'memit', 1000, 'drift/relative', lambda v: f'{v:.3f}')}; CounterFact, MEMIT: probe facts "
         f"kept {vs(cm, 'memit', 1000, 'drift/probe_accuracy', lambda v: f'{v:.0f}')} %."],
    ]
    page.table(["claim", "verdict", "for", "against"], rows, left=4)
    page.add("General capability is the mean score of six GLUE-style tasks on 50 examples each, so differences "
             "of a few hundredths are within its noise.", "")


def paired_sequences(page: Page, long: dict[str, tuple[list[str], dict[str, Any]]]) -> None:
    """One subsection per sequence pair with per-record values: its commands and paired table."""
    for name, (argv, payload) in long.items():
        edits = max(r["edits"] for r in payload["rows"])
        runs = [read_json(f"{name}/runs/{r}.json") for r in argv[argv.index("--runs") + 1:][:2]]
        planned = max(r.get("planned_edits") or r.get("num_edits") or 0 for r in runs)
        partial = any(r.get("partial") for r in runs)
        page.add(f"### {payload['names'][1]} against {payload['names'][0]}, {PAIR_LABELS.get(name, 'CounterFact')}, "
                 f"{edits:,} edits, paired"
                 + (f" (of {planned:,}: the runs continue)" if partial else ""), "",
                 f"Per-record values at every evaluation point: {page.link(f'{name}/runs')}; paired table: "
                 f"{page.link(f'{name}/paired.md')} ({page.link(f'{name}/paired.json')}).", "")
        page.code(*dict.fromkeys(sanitize(r["command"]) for r in runs if r.get("command")),
                  sanitize(payload["command"]))
        page.add(*[line for line in paired.markdown(payload).splitlines() if line.startswith("|")], "")


def claim_a(page: Page, long: dict[str, tuple[list[str], dict[str, Any]]]) -> None:
    page.add("## Claim (a): editing quality, BLUE against the distributed residual", "")
    paired_sequences(page, long)
    page.add("### 1,000 sequential edits, SmolLM2-135M (aggregates only)", "",
             "The first 1,000 records, 100 per round, bfloat16 forward/backward passes, loss layer 29; the metrics "
             "of all records edited so far. These runs stored no per-record outcomes and their checkpoints are "
             "gone, so no paired interval exists for them: at 1,000 CounterFact edits one point is 10 records, "
             "and a one-point lead is not separated from noise here.", "")
    rows = []
    for name, method, label, _ in SEQUENCE_1000:
        if name in long:
            continue  # paired above
        v = sequence_values(name)
        src = page.link(f"{name}/sequence.csv", name)
        for edits in sorted({k[2] for k in v if k[3] == "efficacy"}):
            rows.append([f"{label}, {method} ({src})", f"{edits:,}"]
                        + [f"{f2(v[(method, 'boundary', edits, m)])} vs {f2(v[(method, 'distribute', edits, m)])}"
                           for m in METRICS])
    page.table(["run", "edits", "efficacy (BLUE vs not)", "generalization", "specificity"], rows)
    page.add("Edits 0 is the unedited model on all 1,000 records. Commands:", "")
    page.code(*[c for name, *_, fallback in SEQUENCE_1000 if name not in long for c in recorded_commands(name, fallback)])

    gm = sequence_values("counterfact_gemma3_500")
    page.add("### 500 sequential edits, Gemma 3 270M", "",
             f"MEMIT against MEMIT + BLUE with `editing.target.site: mlp` (targets at the output of `W_out`, "
             f"not the published block output; `docs/algorithms.md` §6), rounds of 100 "
             f"({page.link('counterfact_gemma3_500/sequence.csv')}, {page.link('counterfact_gemma3_500/table.md')}). "
             + (f"Paired over records above ({page.link('counterfact_gemma3_500/paired.md')})."
                if "counterfact_gemma3_500" in long else "Per-record values were not stored for this pair."), "")
    page.table(["edits", "efficacy (BLUE vs not)", "generalization", "specificity"],
               [[f"{e:,}"] + [f"{f2(gm[('memit', 'boundary', e, m)])} vs {f2(gm[('memit', 'distribute', e, m)])}"
                              for m in METRICS] for e in sorted({k[2] for k in gm if k[3] == "efficacy"})])
    page.code(*recorded_commands("counterfact_gemma3_500", GEMMA_500))
    page.add("On the same model with 20 edits, BLUE at the published site (the block output) against the MLP "
             f"output ({page.link('gemma3_target_site/block.md')}, {page.link('gemma3_target_site/mlp.md')}):", "")
    page.add(*md_tables("gemma3_target_site/block.md")[0],
             *[line.replace("| memit | boundary |", "| memit | boundary, `site: mlp` |")
               for line in md_tables("gemma3_target_site/mlp.md")[0][2:]], "")
    page.code(sanitize(read_json("gemma3_target_site/block.json")["command"]),
              sanitize(read_json("gemma3_target_site/mlp.json")["command"]))

    table = read_json("methods_smollm2/table.json")
    page.add("### 100 edits: MEMIT, PMET and HSE with and without BLUE", "",
             f"The first 100 `counterfact_eval` records in rounds of 25 ({page.link('methods_smollm2/table.md')}, "
             f"{page.link('methods_smollm2/table.json')}; `seconds` is wall time on a shared machine). PMET + BLUE "
             "is the one pair where BLUE edits worse (the published code too, below). PMET's and HSE's hyperparameters are SmolLM2's MEMIT values "
             "(PMET) and HSE's preset, not tuned for this model.", "")
    page.add(*md_tables("methods_smollm2/table.md")[0], "")
    page.code(*[sanitize(c) for c in table["commands"]], sanitize(table["command"]))

    quality = read_json("quality.json")
    page.add("### 20 edits: every closed-form method with and without BLUE", "",
             f"The first 20 `counterfact_eval` records in rounds of 10, float32 ({page.link('quality.md')}, "
             f"{page.link('quality.json')}). At 20 edits every method already edits almost every record, so "
             "this run cannot separate the strategies.", "")
    page.add(*md_tables("quality.md")[0], "")
    page.code(*[sanitize(c) for c in quality["commands"]], sanitize(quality["command"]))

    page.add("### Lifelong editing on zsRE (one edit per round)", "",
             "Reliability, generalization, locality (agreement with the unedited model) and specificity after "
             "the last edit, pre-edit values in brackets; WISE beside the locate-then-edit rows. The rows of one "
             "table ran in separate processes, several side by side on two cores (each JSON file's `note` and "
             "commands say which), so compare CPU seconds, not wall seconds. The WISE rows other than the "
             "SmolLM2 config show the settings it was chosen from.", "")
    for t in (10, 100, 200):
        data = read_json(f"lifelong_T{t}.json")
        page.add(f"T = {t} ({page.link(f'lifelong_T{t}.md')}, {page.link(f'lifelong_T{t}.json')}):", "")
        page.add(*[line.replace(" (config before)", "") for line in md_tables(f"lifelong_T{t}.md")[0]], "")
        page.code(*[sanitize(c) for c in (data.get("commands") or [data["command"]])])


def claim_b(page: Page) -> None:
    wse = list(csv.DictReader(open(RESULTS / "wse_counterfact/weight_shift.csv")))
    page.add("## Claim (b): the weight shift error", "",
             "`e^l = ‖Δ^{l*} − Δ^l‖_F` of each written layer in the first round, MEMIT on SmolLM2-135M, CounterFact "
             f"(`docs/algorithms.md` §9; {page.link('wse_counterfact/weight_shift.csv')}). By distance from the "
             "last critical layer, 100 edits per round:", "")
    dist = [r for r in wse if r["figure"] == "distance"]
    page.table(["L − l"] + [r["x"] for r in dist], [["error"] + [f1(float(r["y"])) for r in dist]])
    page.add("Mean over layers by batch size and, in rounds of 10, before each diagnosed round of the sequence:", "")
    rows = [[f"{r['strategy']}, {r['edits_per_round']} per round", r["x"], f1(float(r["y"]))]
            for r in wse if r["figure"] in ("batch_size", "sequence") and not (r["figure"] == "sequence" and
                                                                               r["edits_per_round"] != "10")]
    page.table(["run", "edits per round / edits before", "mean error"], rows)
    page.add("The error grows with distance and batch size as the paper states, and is zero under BLUE; over 150 "
             "edits it does not grow with the sequence.", "")
    page.code(*recorded_commands("wse_counterfact", WSE))


def claim_c(page: Page) -> None:
    page.add("## Claim (c): general capability and hidden-state drift", "",
             "After the last edit of each long pair: the mean of the GLUE-style tasks (50 examples each), the "
             "perplexity of 20 WikiText-2 chunks, the relative drift of the last critical layer's hidden states "
             "on 50 probe facts, and how many of those facts the model still answers (%). Commands as under "
             "claim (a).", "")
    rows = []
    pairs = [(n, m) for n, m, *_ in SEQUENCE_1000] + [("counterfact_gemma3_500", "memit")]
    pairs += [p for p in LONG_PAIRS if (RESULTS / p[0] / "sequence.csv").is_file()]
    for name, method in pairs:
        v = sequence_values(name)
        last = min(max(k[2] for k in v if k[3] == "general/mean" and k[:2] == (method, strategy))
                   for strategy in ("distribute", "boundary"))
        if last == 0:
            continue  # no general-capability point after editing yet
        src = page.link(f"{name}/sequence.csv", name)
        for strategy in ("distribute", "boundary"):
            rows.append([src, f"{method}, {strategy}", f"{last:,}", f2(v[(method, strategy, 0, 'general/mean')]) + " → "
                         + f2(v[(method, strategy, last, 'general/mean')]),
                         f2(v[(method, strategy, 0, 'general/perplexity')]) + " → "
                         + f2(v[(method, strategy, last, 'general/perplexity')]),
                         f"{v[(method, strategy, last, 'drift/relative')]:.3f}",
                         f"{v[(method, strategy, 0, 'drift/probe_accuracy')]:.0f} → "
                         f"{v[(method, strategy, last, 'drift/probe_accuracy')]:.0f}"])
    page.table(["run", "arm", "edits", "general", "perplexity", "relative drift", "probe facts %"], rows, left=2)


def record_pairs(page: Page) -> None:
    page.add("## Other paired comparisons", "",
             "Result files that keep per-record outcomes of two arms on the same records, compared record by "
             "record.", "")
    lifelong = lifelong_pairs()
    for argv in RECORD_PAIRS + lifelong:
        payload, out, stem = paired.build(argv)
        rel = os.path.normpath(f"{results_rel(out)}/{stem}.md")
        sources = sorted({results_rel(s.rsplit(":", 1)[0]) for s in payload["sources"]})
        title = f"{payload['names'][1]} against {payload['names'][0]}"
        if argv in lifelong:
            title += f", lifelong, T = {payload['rows'][0]['edits']}"
        page.add(f"### {title}", "",
                 f"{page.link(rel)} ({page.link(rel[:-3] + '.json')}), from "
                 + ", ".join(page.link(s) for s in sources) + ":", "")
        page.add(*[line for line in paired.markdown(payload).splitlines() if line.startswith("|")], "")
        page.code(sanitize(payload["command"]))
        if str(out).endswith("gemma3_dtype"):
            page.add("Gemma's bfloat16 and float32 runs reach the same efficacy and generalization with different "
                     "records succeeding; the specificity difference is a tie.", "")
        if argv in lifelong:
            page.add(f"Lifelong zsRE editing, one edit per round; both rows of {page.link(results_rel(out) + '.md')} "
                     "were run by the command of that table, which keeps their per-record outcomes.", "")
    page.add("### Result files without per-record outcomes", "",
             "These compare arms on the same records but kept only aggregates, so the tables above give both "
             "arms' values without an interval: the 1,000-edit sequence runs (`sequence.csv`), the Gemma 500-edit "
             "pair, " + ("" if len(lifelong) == len(LIFELONG_T) else "the lifelong tables without `lifelong_T<T>/`, ")
             + "the 100-edit method table, the 20-edit quality table, the "
             "published-code comparison and the WISE sweeps. Runs of the sequence benchmark store per-record values at "
             "every evaluation point and the lifelong benchmark each row's evaluation record; "
             "`python -m blueedit.bench.paired` compares them.", "")


def _paired_last_point(page: Page, argv: list[str]) -> None:
    """The paired rows of the last evaluation point of ``argv``'s comparison, with its files and command."""
    payload, out, stem = paired.build(argv)
    last = max(r["edits"] for r in payload["rows"])
    rel = f"{out}/{stem}.md".removeprefix("benchmarks/results/")
    lines = paired.markdown(payload).splitlines()
    head = [line for line in lines if line.startswith("|")][:2]
    rows = [line for line in lines if line.startswith(f"| {last} |")]
    page.add(f"{payload['names'][1]} against {payload['names'][0]} after {last} edits, record by record "
             f"({page.link(rel)}, every evaluation point; {page.link(rel[:-3] + '.json')}):", "", *head, *rows, "")
    page.code(sanitize(payload["command"]))


def wild(page: Page) -> None:
    page.add("## In the wild: teacher forcing against generated answers", "",
             "Each table gives both protocols for the same edited models (`docs/wild.md`): teacher-forced "
             "(`TF`) and the model's own greedy answer, stopped at a newline, a sentence's period, EOS or the token cap "
             "(`wild`), on the rewrite prompt, the paraphrases and the first neighborhood prompts of each record "
             "(`--wild-neighborhood`). "
             "`Eff. wild`: the answer contains the new object; `efficacy_wild_exact`: the answer is the new object; "
             "`Loc. wild`: the neighborhood answer is unchanged from the unedited model's.", "")
    for name, label in WILD_RUNS:
        if not (RESULTS / name / "table.md").is_file():
            continue
        runs = [read_json(f"{name}/runs/{p.name}") for p in sorted((RESULTS / name / "runs").glob("*.json"))]
        title = (f"{label}, {max(r['num_edits'] for r in runs)} edits in rounds of "
                 f"{runs[0]['edits_per_round']}")
        page.add(f"### {title}, SmolLM2-135M", "")
        for variant in (name, f"{name}_stop_period"):
            if not (RESULTS / variant / "table.md").is_file():
                continue
            page.add(f"{'With' if variant != name else 'Without'} `editing.target.stop_after: period` "
                     f"({page.link(f'{variant}/table.md')}, {page.link(f'{variant}/sequence.csv')}):", "")
            page.add(*md_tables(f"{variant}/table.md")[0], "")
            page.code(*recorded_commands(variant, ""))
            maps = sorted(p.name for p in (RESULTS / variant).glob("retention_*.png"))
            if maps:
                page.add("Retention heat maps and forgetting curves (rows: evaluation after round t; columns: "
                         "round of origin): " + ", ".join(page.link(f"{variant}/{m}", m) for m in maps) + ".", "")
        own = (f"benchmarks/results/{name}", f"benchmarks/results/{name}_stop_period")
        for argv in wild_pairs():
            if any(a in own or a.startswith(tuple(f"{d}/" for d in own)) for a in argv):
                _paired_last_point(page, argv)
    if (RESULTS / GATED / "table.md").is_file():
        ungated = sequence_values("counterfact_gemma3_500")
        before, after = (ungated[("memit", "distribute", e, "general/perplexity")] for e in (0, 500))
        page.add("### Health-gated rounds, Gemma 3 270M", "",
                 f"MEMIT (distribute) on 500 CounterFact records in rounds of 100 with `HealthGate` on perplexity "
                 f"({page.link(f'{GATED}/table.md')}, {page.link(f'{GATED}/runs')}); without the gate the same "
                 f"edits take the perplexity from {before:,.1f} to {after:,.1f} "
                 f"({page.link('counterfact_gemma3_500/sequence.csv')}):", "")
        page.add(*md_tables(f"{GATED}/table.md")[0], "")
        text = (RESULTS / GATED / "table.md").read_text().splitlines()
        page.add(*[f"- {line}" for line in text if "health gate" in line], "")
        page.code(*recorded_commands(GATED, ""))


#: The compositional benchmark's result files under ``a3e_cme/``: (stem, title, intro). Missing ones are left out.
CME_TABLES: list[tuple[str, str, str]] = [
    ("cme_table1", "A³E against the locate-then-edit methods and WISE",
     "The same compositions edited by every method: A³E with its edits routed by the benchmark (`oracle`) and by "
     "its own key store (`retrieve`); MEMIT, AlphaEdit (each with and without BLUE) and WISE with each "
     "composition's edits as one round on the unedited model"),
    ("cme_table2", "The A³E ladder and the mask rules",
     "From adapters alone (a) through the answer-token mask (b), the two regularizers (c) and the sign-aware "
     "merge (d), and the full method with the other two mask rules, on the same `mac_k2` compositions; row (d) is "
     "the A³E row of the table above"),
    ("cme_table3", "A³E and WISE on the ordinary metrics",
     "Edits one at a time on `counterfact_eval` and `zsre_eval`, scored by the teacher-forced evaluator. This run had "
     "the lowest CPU priority beside two other benchmarks, so its seconds per edit (wall time) measure the machine's "
     "load, not the methods: the first table's are comparable"),
]


def md_task_tables(rel: str) -> list[tuple[str, list[str]]]:
    """``(heading, table lines)`` of a result ``.md`` file: each table with the ``###`` heading above it."""
    out, heading, current = [], "", []
    for line in (RESULTS / rel).read_text().splitlines():
        if line.startswith("|"):
            current.append(line)
            continue
        if current:
            out.append((heading, current))
            current = []
        if line.startswith("### "):
            heading = line[4:].strip()
    return out + ([(heading, current)] if current else [])


def compositional(page: Page) -> None:
    """The compositional benchmark (``blueedit.bench.cme``): one subsection per result file."""
    present = [t for t in CME_TABLES if (RESULTS / "a3e_cme" / f"{t[0]}.md").is_file()]
    if not present:
        return
    page.add("## Compositional editing: A³E", "",
             "SmolLM2-135M on compositions built from PEAK-CF (`docs/algorithms.md`, A³E): greedy answers "
             "scored by SR-S (every answer present; MQC: in order), SR-1 (at least one), GSR (SR-S on rephrased "
             "queries) and LSR (Rouge-L of unrelated prompts against the unedited model's answers), in %, with "
             "bootstrap intervals over compositions in brackets; the failure counters are totals over compositions.", "")
    for stem, title, intro in present:
        rel = f"a3e_cme/{stem}.md"
        page.add(f"### {title}", "", f"{intro} ({page.link(rel)}, every generation in "
                 f"{page.link(f'a3e_cme/{stem}.json')}):", "")
        if stem == "cme_table1":
            cme_summary(page, read_json(f"a3e_cme/{stem}.json")["summary"])
        for heading, table in md_task_tables(rel):
            if all(row.startswith("| unedited ") for row in table[2:]):
                continue  # a task run only for its unedited answers
            page.add(f"`{heading}`:" if " " not in heading else f"{heading}:", "", *table, "")
        page.code(*md_command(rel))


def cme_summary(page: Page, summary: dict[str, dict[str, dict]]) -> None:
    """What the first compositional table shows, read from its summary: the best SR-S and SR-1 of any
    edited row, and A³E's locality under each routing."""
    from blueedit.bench.cme import LABELS

    rows = lambda metric: [(s[metric]["mean"], name, task) for name, per_task in summary.items()  # noqa: E731
                           if name != "unedited" for task, s in per_task.items()]
    label = lambda name: LABELS.get(name.split("/")[0], name) + (  # noqa: E731
        f", {name.split('/')[1]}" if not name.endswith("/-") else "")
    best_s, best_1 = max(rows("sr_s")), max(rows("sr_1"))
    lsr = {name.split("/")[1]: [per[t]["lsr"]["mean"] for t in per] for name, per in summary.items()
           if name.startswith("d/")}
    page.add(f"The highest SR-S of any edited row is {best_s[0]:.1f} ({label(best_s[1])}, `{best_s[2]}`), the highest "
             f"SR-1 {best_1[0]:.1f} ({label(best_1[1])}, `{best_1[2]}`). A³E's LSR over the tasks: "
             + "; ".join(f"`{r}` routing {', '.join(f'{v:.1f}' for v in vs)}" for r, vs in lsr.items())
             + " (with `oracle` the composition's adapters also act on its unrelated prompts).", "")


def published_rows(rel: str) -> dict[str, dict[str, Any]]:
    """method -> {"published": cells, "blueedit": cells, "update": largest relative ‖ΔW_l‖ difference,
    "speed": the CPU speed-up cell} from a ``vs_published`` result ``.md`` (rows of finished runs only)."""
    out: dict[str, dict[str, Any]] = {}
    for line in (line for _, table in md_task_tables(rel) for line in table):
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) != 8 or not cells[2].isdigit() or cells[3] == "not evaluated":
            continue
        row = out.setdefault(cells[0], {"edits": cells[2]})
        side = cells[1].split(":")[0]
        if side in ("published", "blueedit"):
            row[side] = cells[3:6]
        elif side.startswith("difference"):
            row["speed"] = cells[7]
    for line in (RESULTS / rel).read_text().splitlines():
        m = re.match(r"- (.+?): per-round weight updates .*?: ([\d.e+-]+) in ‖ΔW_l‖", line)
        if m and m.group(1) in out:
            out[m.group(1)]["update"] = m.group(2)
    return out


def published_summary(page: Page) -> None:
    """The ten rows (five published methods, each without and with BLUE) from every comparison file."""
    found = {}
    for rel in VS_PUBLISHED_FILES:
        if (RESULTS / rel).is_file():
            found.update({method: dict(row, source=page.link(rel)) for method, row in published_rows(rel).items()})
    rows = []
    for method in VS_PUBLISHED_ROWS:
        row = found.get(method, {})
        both = "published" in row and "blueedit" in row
        cells = [" / ".join(row[side]) if side in row else "not run" for side in ("published", "blueedit")]
        rows.append([method, row.get("edits", "-"), *cells,
                     ("equal" if both and row["published"] == row["blueedit"] else "differ" if both else "-"),
                     row.get("update", "-"), row.get("speed", "-"), row.get("source", "-")])
    page.add("### Every published method", "",
             "The published code's five sequential-editing methods, each without and with BLUE, against blueedit's, on "
             "SmolLM2 (efficacy / generalization / specificity; the largest per-round difference in ‖ΔW_l‖ relative to "
             "the round's largest; CPU time of the editing rounds, published / blueedit). Details and commands below.", "")
    page.table(["method (published name)", "edits", "published", "blueedit", "metrics", "ΔW difference",
                "CPU speed", "source"], rows, left=8)
    differ = [(m, found[m]) for m in VS_PUBLISHED_ROWS if m in found and "published" in found[m]
              and "blueedit" in found[m] and found[m]["published"] != found[m]["blueedit"]]
    if differ:
        page.add("Where the metrics differ:", "", *[
            f"- {m}, " + ", ".join(f"{name} {b} vs {a} (blueedit vs published)" for name, a, b in
                                   zip(METRICS, row["published"], row["blueedit"]) if a != b)
            + (f": {VS_PUBLISHED_WHY[m]}." if m in VS_PUBLISHED_WHY else ": not explained.")
            for m, row in differ], "")


def published(page: Page) -> None:
    page.add("## Side by side with the published code", "",
             "Each method of the published BLUE code ([xpq-tech/BLUE](https://github.com/xpq-tech/BLUE)) and blueedit's "
             "counterpart on the same model, records, rounds, `C_0` tensor, hyperparameters and context templates, both "
             "scored by blueedit's evaluator (`python -m blueedit.bench.vs_published`).", "")
    published_summary(page)
    page.add("### MEMIT and MEMIT + BLUE against the published code", "",
             f"blueedit against the published BLUE code ({page.link('vs_published.md')}, "
             f"{page.link('vs_published.json')}), both scored by blueedit's evaluator on the first 100 "
             "`counterfact_eval` records in rounds of 25, the same `C_0` tensor on both sides. `seconds / edit`: "
             "editing rounds only; the two sides ran in separate processes on a shared 2-core machine, at different times "
             "and loads, so compare the CPU "
             "column. A reduced 4-edit AlphaEdit comparison: "
             f"{page.link('vs_published_alphaedit.md')}.", "")
    page.add(*md_tables("vs_published.md")[0], "")
    page.add("Efficacy and generalization are equal; MEMIT + BLUE's specificity differs by one neighbourhood "
             "prompt.", "")
    page.code(VS_PUBLISHED)
    published_pmet(page)
    published_methods(page)


def pmet_runs() -> dict[tuple[str, str], dict[str, Any]]:
    """The finished runs of ``vs_published_pmet.json`` by (pair, side); empty when the file is absent."""
    if not (RESULTS / "vs_published_pmet.json").is_file():
        return {}
    return {(r["pair"], r["side"]): r for r in read_json("vs_published_pmet.json")["runs"] if r.get("efficacy") is not None}


def published_pmet_drop(page: Page) -> str:
    """The clause saying whether the published PMET + BLUE edits worse than the published PMET too."""
    runs = pmet_runs()
    if ("pmet", "published") not in runs or ("pmet_blue", "published") not in runs:
        return ""
    plain, blue = runs[("pmet", "published")], runs[("pmet_blue", "published")]
    worse = [m for m in ("efficacy", "generalization") if blue[m] < plain[m]]
    if not worse:
        return (f"; the published code does not show this drop ({page.link('vs_published_pmet.json')}: efficacy "
                f"{blue['efficacy']:.2f} vs {plain['efficacy']:.2f})")
    return (f"; the published code shows the same drop on SmolLM2 ({page.link('vs_published_pmet.json')}, 50 edits: "
            + ", ".join(f"{m} {blue[m]:.2f} vs {plain[m]:.2f}" for m in worse)
            + "), so it is the method's on this model, not blueedit's")


def published_pmet(page: Page) -> None:
    """PMET and PMET + BLUE, the published code against blueedit (``vs_published_pmet.*``, when present)."""
    rel = "vs_published_pmet.md"
    if not (RESULTS / rel).is_file():
        return
    runs = pmet_runs()
    page.add("### PMET and PMET + BLUE against the published code", "",
             "The published `PMET_seq`, with and without BLUE, and blueedit's `pmet` on the same records, each side in "
             f"its own process, merged ({page.link(rel)}, {page.link('vs_published_pmet.json')}):", "")
    text = (RESULTS / rel).read_text().splitlines()
    page.add(text[0], "", *md_tables(rel)[0], "", *[line for line in text if line.startswith("- ")], "")
    cell = lambda r: " / ".join(f"{r[m]:.2f}" for m in ("efficacy", "generalization", "specificity"))  # noqa: E731
    sides = [side for side in ("published", "blueedit") if ("pmet", side) in runs and ("pmet_blue", side) in runs]
    if sides:
        page.add("Efficacy / generalization / specificity, PMET then PMET + BLUE: " + "; ".join(
            f"{side}: {cell(runs[('pmet', side)])}, then {cell(runs[('pmet_blue', side)])}" for side in sides) + ".", "")
    drop = published_pmet_drop(page)
    if drop:
        page.add("PMET + BLUE against PMET" + drop.replace(";", ":", 1) + ".", "")
    page.code(VS_PUBLISHED_PMET)


def published_methods(page: Page) -> None:
    """AlphaEdit, RECT and PRUNE, each with and without BLUE, the published code against blueedit
    (``vs_published_methods.*``, when present)."""
    rel = "vs_published_methods.md"
    if not (RESULTS / rel).is_file():
        return
    page.add("### AlphaEdit, RECT and PRUNE against the published code", "",
             "The published `AlphaEdit`, `MEMIT_rect` and `MEMIT_prune`, with and without BLUE, and blueedit's "
             "`alphaedit`, `rect` and `prune` on the same records, each side in its own process, merged "
             f"({page.link(rel)}, {page.link('vs_published_methods.json')}):", "")
    text = (RESULTS / rel).read_text().splitlines()
    page.add(text[0], "", *md_tables(rel)[0], "", *[line for line in text if line.startswith("- ")], "")
    page.code(VS_PUBLISHED_METHODS)


def measurements(page: Page) -> None:
    page.add("## Speed, memory and the quickstart", "",
             f"bfloat16 against float32 at 100 edits in one round of 100, MEMIT + BLUE ({page.link('speed_100x100.md')}):", "")
    # speed.py divides bytes by 2**20: the tables' "(MB)" columns are MiB
    page.add(*[line.replace("(MB)", "(MiB)") for line in md_tables("speed_100x100.md")[0]], "")
    speed = (RESULTS / "speed_100x100.md").read_text()
    diff = re.search(r"metrics max \|difference\|: ([\d.]+) points", speed).group(1)
    page.add(f"The two dtypes' metrics differ by at most {diff} points. Memory is the process's RSS.", "")
    page.code("python -m blueedit.bench.speed --edits 100 --edits-per-round 100 --modes optimized-bf16,optimized \\\n"
              "    --strategy boundary --loss-layer 29 --threads 1 --max-batch-tokens 1024 "
              "--out benchmarks/results/speed_100x100.json")
    round_profile(page)
    speed_ab(page)
    wild_speed(page)
    mem = read_json("memory_llama3_8b.json")
    st = mem["settings"]
    page.add(f"Estimated peak memory of one editing round on Llama-3-8B's shape ({page.link('memory_llama3_8b.json')}): "
             f"{st['edits_per_round']} edits per round, layers {st['layers'][0]}-{st['layers'][-1]}, loss layer "
             f"{st['loss_layer']}, {st['weight_dtype']} weights, `editing.max_batch_tokens` {st['max_batch_tokens']}; "
             f"the activations saved per token and block ({mem['saved_kib_per_token_block']:.1f} KiB) are measured "
             "on one randomly initialized block of that shape:", "")
    page.table(["part", "GiB"], [[k.replace("_", " "), f2(v)] for k, v in mem["gib"].items() if k != "total"]
               + [["**estimated peak**", f"**{f2(mem['gib']['total'])}**"]])
    page.code(sanitize(mem.get("command") or mem["run"]["command"]))
    quick = (RESULTS / "quickstart.md").read_text()
    wall = re.search(r"time: ([\d.]+) s wall", quick).group(1)
    editing = re.search(r"([\d.]+) s editing", quick).group(1)
    page.add(f"The quickstart from an empty cache (the GGUF de-quantization, sampling the `C_0` texts and "
             f"collecting `C_0` included) took {wall} s wall, {editing} s of it editing "
             f"({page.link('quickstart.md')}):", "")
    page.add(*md_tables("quickstart.md")[0], "")
    page.code("bash benchmarks/quickstart_time.sh")
    smoke = (RESULTS / "docker_smoke.txt").read_text()
    size = re.search(r"image\s+\S+, ([\d.]+ GB)", smoke).group(1)
    total = re.search(r"total\s+(\d+) s", smoke).group(1)
    page.add(f"The CPU Docker image end to end (`docker/smoke.sh`: build, quickstart, edit, reload; "
             f"{page.link('docker_smoke.txt')}): image {size}, {total} s in all on a loaded machine. The "
             "quickstart inside the container printed:", "")
    page.add(*[line for line in smoke.splitlines() if line.startswith("|")], "")
    page.add("That run used an earlier blueedit (its table has no locality row) and differs from the host run above "
             "in specificity and the margins; the cause was not traced.", "")


def round_profile(page: Page) -> None:
    """Where a 100-edit MEMIT + BLUE round spends its CPU time (``speed --profile``)."""
    if not (RESULTS / "profile_100x100.json").is_file():
        return
    data = read_json("profile_100x100.json")
    mode = data["modes"]["optimized-bf16"]
    prof = mode["profile"]
    steps = mode.get("mean_target_steps_per_layer", {})
    load = data.get("load_average_1min_before_after")
    page.add(f"Where a round's time goes ({page.link('profile_100x100.json')}, {page.link('profile_100x100.md')}): "
             f"MEMIT + BLUE, 100 edits in one round, bfloat16, one thread, "
             f"{f2(mode['cpu_seconds_per_edit'])} CPU seconds per edit at a load average of "
             f"{'-'.join(f'{x:.1f}' for x in load) if load else 'unknown'} on the 2 cores; mean target steps "
             + ", ".join(f"{f2(v)} at layer {k}" for k, v in steps.items()) + ". CPU seconds of each phase "
             f"(nested phases excluded), its linear-layer FLOPs and their rate against the measured bf16 matmul "
             f"rates of this CPU ({f2(prof['bf16_peak_gflops_per_s'])} GFLOP/s for 2048³, "
             f"{f2(prof['bf16_shaped_gflops_per_s'])} GFLOP/s for the model's MLP shape at the batch size of the "
             f"target optimization).", "")
    page.add(*md_tables("profile_100x100.md")[0], "")
    page.code(re.sub(r"--out \S*profile_100x100\.json", "--out benchmarks/results/profile_100x100.json",
                     sanitize(data["command"])))


def speed_ab(page: Page) -> None:
    """The same round on an earlier revision and on the current code, alternating in one run
    (``blueedit.bench.speed_ab``)."""
    if not (RESULTS / "speed_ab.json").is_file():
        return
    data = read_json("speed_ab.json")
    base = data["baseline"]
    page.add(f"The current code against revision `{base.get('revision')}` ({str(base.get('commit'))[:10]}): the speed "
             "benchmark's command below, each side in its own process, the sides alternating on the same machine "
             f"({page.link('speed_ab.json')}, {page.link('speed_ab.md')}):", "")
    for table in md_tables("speed_ab.md"):
        page.add(*table, "")
    page.code(sanitize(data["command"]))


def wild_speed(page: Page) -> None:
    """The time of the wild protocol per 1,000 records."""
    data = read_json("wild_speed/speed.json")
    page.add(f"The wild protocol ({page.link('wild_speed/speed.json')}): {data['records']} `{data['dataset']}` records, "
             f"{data['prompts']} prompts (every paraphrase and neighborhood prompt), {data['model']} in "
             f"{data['dtype']}, {data['threads']} thread, batches of {data['batch_size']}, at most "
             f"{data['max_new_tokens']} new tokens: {data['wild_cpu_seconds_per_1000_records']:,.0f} CPU seconds per "
             f"1,000 records (answers of {data['mean_answer_words']:.1f} words on average), at a load average of "
             f"{data['load_average_1min_before_after'][0]:.1f}-{data['load_average_1min_before_after'][1]:.1f} on "
             f"{data['cpus']} cores ({data['wild_seconds_per_1000_records']:,.0f} s of wall time; teacher forcing "
             f"of the same records {data['teacher_forcing_seconds_per_1000_records']:,.0f} s of wall time).", "")
    command = data.get("command") or data["run"]["command"]
    page.code(re.sub(r"--out \S*speed\.json", "--out benchmarks/results/wild_speed/speed.json", sanitize(command)))


def md_command(rel: str) -> list[str]:
    """The command(s) a result ``.md`` file records: ``Command: `...` `` lines or a fenced block after
    ``Command:``."""
    text = (RESULTS / rel).read_text()
    inline = re.findall(r"Command: `([^`]+)`", text)
    fenced = re.findall(r"Command:\s*```bash\n(.*?)```", text, flags=re.S)
    return [sanitize(c.strip()) for c in inline + fenced]


def embed(page: Page, rel: str, title: str, intro: str, keep: Callable[[str], str] = lambda line: line) -> None:
    """A section made of a result ``.md`` file's tables and command, with ``intro`` before them."""
    page.add(f"### {title}", "", f"{intro} ({page.link(rel)}):", "")
    for table in md_tables(rel):
        page.add(*[keep(line) for line in table], "")
    commands = md_command(rel)
    if commands:
        page.code(*commands)


def other(page: Page) -> None:
    page.add("## Other measurements", "")
    embed(page, "gemma3_layer_sweep.md", "Gemma 3 270M: which layers",
          "MEMIT on 20 `counterfact_dev` edits in rounds of 10 for three five-layer windows; the configs use the "
          "window with the best mean of the three metrics")
    embed(page, "gemma3_post_norm.md", "Gemma 3 270M: the post-MLP norm",
          "Gemma normalizes the MLP output before adding it to the residual stream; a small change `r` of the MLP "
          "output `m` moves the normalized output by a large gain, which is why `editing.target.site: mlp` exists")
    locate = read_json("locate/smollm2-135m/summary.json")
    page.add("### SmolLM2-135M: the layers `blueedit locate` recommends", "",
             f"Causal tracing on {locate['facts']} known facts with {locate['samples']} noise samples each recommends "
             f"layers {', '.join(str(x) for x in locate['layers'])} (loss layer {locate['loss_layer']}, λ "
             f"{locate['mom2_update_weight']:.0f}; {locate['cpu_seconds']} CPU seconds; "
             f"{page.link('locate/smollm2-135m/summary.json')}, curve {page.link('locate/smollm2-135m/trace.csv')}). "
             f"Editing 50 `counterfact_dev` records with that window and with the configs' layers 4-8 "
             f"({page.link('locate/smollm2_located_vs_4_8.md')}):", "")
    page.add(*md_tables("locate/smollm2_located_vs_4_8.md")[0], "")
    page.code("blueedit locate --model smollm2-135m --num-facts 50 --samples 2 --out benchmarks/results/locate/smollm2-135m",
              *md_command("locate/smollm2_located_vs_4_8.md"))
    embed(page, "locate/chat_vs_plain.md", "Chat template or plain prompts",
          "MEMIT on SmolLM2-135M-Instruct over the same 20 CounterFact records, edited and evaluated with plain "
          "prompts and with `model.chat_template: true`, then each model scored in the other format")
    for rel, title, intro in [
        ("wise_sweep.md", "WISE: layer and margins", "5 `zsre_dev` edits, one per round"),
        ("wise_sweep_act_ratio.md", "WISE: act_ratio", "10 `zsre_dev` edits"),
        ("wise_sweep_forgetting_merge.md", "WISE: forgetting inside the side memory",
         "20 `zsre_dev` edits: each edit holds right after it is made (`just edited`) and is partly forgotten by "
         "the end (`reliability`)"),
        ("wise_sweep_levers.md", "WISE: steps, mask ratio and learning rate", "20 `zsre_dev` edits"),
        ("wise_sweep_mask_ratio.md", "WISE: larger masks", "20 `zsre_dev` edits"),
        ("wise_sweep_forgetting.md", "WISE-Retrieve", "20 `zsre_dev` edits, shards of 10"),
        ("wise_sweep_act_ratio_mask1.md", "WISE: act_ratio with the full mask",
         "50 `zsre_dev` edits; the SmolLM2 config takes mask_ratio 1.0 and act_ratio 0.85 from here"),
    ]:
        embed(page, rel, title, intro)
    if (RESULTS / "vit_digits/vit_digits.md").is_file():
        embed(page, "vit_digits/vit_digits.md", "Vision transformers on the digits bed",
              "RefineViT and its baselines on the offline digits ViT")
    page.add("### Continuing and undoing edits", "",
             f"`bash benchmarks/carry_smollm2.sh`: six example edits, 2 per round, MEMIT + BLUE on SmolLM2-135M, "
             f"edited in one run and in two sittings, then the last round reverted "
             f"({page.link('carry_smollm2/log.txt')}, generations {page.link('carry_smollm2/generations.md')}). "
             "From its log:", "")
    log = (RESULTS / "carry_smollm2/log.txt").read_text().splitlines()
    page.add(*[f"- {line}" for line in log if line.startswith(("editor state", "second vs", "one-reverted vs"))], "")


def build_page(pending: set[Path] = frozenset()) -> str:
    long = long_pair_payloads()
    page = Page(pending)
    header(page)
    verdicts(page, long)
    claim_a(page, long)
    claim_b(page)
    claim_c(page)
    record_pairs(page)
    wild(page)
    compositional(page)
    published(page)
    measurements(page)
    other(page)
    return page.text()


def main(argv: list[str] | None = None) -> int:
    p = C.plain_parser(__doc__)
    p.add_argument("--check", action="store_true", help="write nothing; exit 1 when a generated file is stale")
    p.add_argument("--out", type=Path, default=DOC, help="the page to write (default docs/results.md)")
    args = p.parse_args(argv)
    with contextlib.chdir(C.REPO):
        files = paired_outputs()
        files[args.out.resolve()] = build_page(set(files))
        files[README] = readme_results(README.read_text())
    stale = [path for path, text in files.items() if not path.is_file() or path.read_text() != text]
    if args.check:
        for path in stale:
            print(f"stale: {path.relative_to(C.REPO)} (run python -m blueedit.bench.results_doc)")
        if stale:
            raise SystemExit(1)
        return 0
    for path in stale:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(files[path])
        print(f"wrote {path.relative_to(C.REPO)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
