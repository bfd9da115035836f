"""Compositional editing records (CME), their JSON format, the MAC / MQC builder, and a data module.

A composition is one query that needs ``k`` edits at once (docs/algorithms.md, "A³E"):

.. code-block:: json

    {"id": "mac2-17", "task": "mac",
     "query": "France shares border with Spain, Italy.\\n...\\nTurkey shares border with",
     "edits": [{"prompt": "{} shares border with", "subject": "Turkey", "target_new": "Syria"},
               {"prompt": "{} shares border with", "subject": "Turkey", "target_new": "Iraq"}],
     "answers": ["Syria", "Iraq"], "ordered": false,
     "rephrased_queries": ["...Turkey is adjacent to"], "unrelated_prompts": ["Vasif Talibov is a citizen of"]}

``edits`` take every field of an edit record (:class:`~blueedit.data.records.EditRequest`);
``answers[i]`` is what edit ``i`` makes true; ``ordered``: the answers must come in this order.

Tasks built from PEAK (Ma et al., arXiv 2401.17623) by :func:`build_mac` / :func:`build_mqc`:

- **MAC** (multiple answers for one question): ``k`` true answers from ``postive_list`` that the
  unedited model does not produce, one edit each on the same question; the query is a 3-shot list
  prompt ending with the question.
- **MQC** (two questions answered together): two edits on different subjects (``target_new``); the
  query ``The answers of the questions "q1", "q2" are``, after three demonstrations ending
  ``… are A, B respectively.``; order matters.

Each PEAK record belongs to one split (``dev`` or ``report``), decided by a hash of its
``case_id``, so tuning never sees a reported record.
"""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning as L

from blueedit.data.records import EditRecordError, EditRequest, validate_request

#: The PEAK files in the data directory (``peak/``).
PEAK_FILES = {"counter": "PEAK_counter.json", "time": "PEAK_time.json"}
SPLITS = ("dev", "report")


class CompositionRecordError(ValueError):
    """A bad composition record; the message names the record (index and ``id``) and the field."""


@dataclass(frozen=True)
class Composition:
    """One compositional query, the ``k`` edits it needs and their answers (module docstring)."""

    id: str
    task: str
    query: str
    edits: tuple[EditRequest, ...]
    answers: tuple[str, ...]
    ordered: bool = False
    rephrased_queries: tuple[str, ...] = field(default_factory=tuple)
    unrelated_prompts: tuple[str, ...] = field(default_factory=tuple)

    @property
    def k(self) -> int:
        return len(self.edits)

    def to_dict(self) -> dict[str, Any]:
        edits = []
        for e in self.edits:
            d = {k: v for k, v in e.to_dict().items() if v not in (None, [], "user")}
            d.pop("case_id", None)
            edits.append({"case_id": e.case_id, **d})
        return {"id": self.id, "task": self.task, "query": self.query, "edits": edits, "answers": list(self.answers),
                "ordered": self.ordered, "rephrased_queries": list(self.rephrased_queries),
                "unrelated_prompts": list(self.unrelated_prompts)}


def _strings(value: Any, where: str, name: str) -> tuple[str, ...]:
    if value is None:
        return ()
    if not isinstance(value, list) or not all(isinstance(v, str) and v.strip() for v in value):
        raise CompositionRecordError(f"{where}: '{name}' must be a list of non-empty strings")
    return tuple(value)


def composition_from_dict(d: Any, index: int) -> Composition:
    """Validate one JSON record and build its :class:`Composition`; a bad record raises
    :class:`CompositionRecordError` naming it and the field at fault."""
    where = f"composition record {index}"
    if not isinstance(d, dict):
        raise CompositionRecordError(f"{where}: expected an object, got {type(d).__name__}")
    if "id" in d:
        where += f" (id={d['id']!r})"
    for name in ("id", "task", "query"):
        if not isinstance(d.get(name), str) or not d[name].strip():
            raise CompositionRecordError(f"{where}: '{name}' must be a non-empty string")
    edits, answers = d.get("edits"), d.get("answers")
    if not isinstance(edits, list) or not edits:
        raise CompositionRecordError(f"{where}: 'edits' must be a non-empty list of edit records")
    answers = _strings(answers, where, "answers")
    if len(answers) != len(edits):
        raise CompositionRecordError(f"{where}: 'answers' has {len(answers)} entries for {len(edits)} edits")
    ordered = d.get("ordered", False)
    if not isinstance(ordered, bool):
        raise CompositionRecordError(f"{where}: 'ordered' must be true or false, got {ordered!r}")
    unknown = set(d) - {"id", "task", "query", "edits", "answers", "ordered", "rephrased_queries", "unrelated_prompts"}
    if unknown:
        raise CompositionRecordError(f"{where}: unknown field(s) {sorted(unknown)}")
    requests = []
    for j, e in enumerate(edits):
        if not isinstance(e, dict):
            raise CompositionRecordError(f"{where}: 'edits[{j}]' must be an object")
        try:
            req = EditRequest.from_dict({"case_id": f"{d['id']}:{j}", **e})
            validate_request(req, j)
        except (TypeError, EditRecordError) as err:
            raise CompositionRecordError(f"{where}: 'edits[{j}]': {err}") from None
        requests.append(req)
    return Composition(d["id"], d["task"], d["query"], tuple(requests), answers, ordered,
                       _strings(d.get("rephrased_queries"), where, "rephrased_queries"),
                       _strings(d.get("unrelated_prompts"), where, "unrelated_prompts"))


def load_compositions(path: str | Path) -> list[Composition]:
    """Read and validate a JSON list of composition records (every record before any is used;
    ``id`` values must be unique)."""
    path = Path(path)
    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise CompositionRecordError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(raw, list):
        raise CompositionRecordError(f"{path}: expected a JSON list of composition records")
    out = [composition_from_dict(d, i) for i, d in enumerate(raw)]
    seen: dict[str, int] = {}
    for i, c in enumerate(out):
        if c.id in seen:
            raise CompositionRecordError(f"{path}: composition records {seen[c.id]} and {i} share id={c.id!r}")
        seen[c.id] = i
    return out


def save_compositions(compositions: list[Composition], path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps([c.to_dict() for c in compositions], indent=1, ensure_ascii=False))
    tmp.replace(path)
    return path


# -- building MAC and MQC from PEAK ---------------------------------------------------------------
def load_peak(data_dir: str | Path, part: str = "counter") -> list[dict]:
    """The PEAK records of ``part`` (``counter`` or ``time``) from ``<data_dir>/peak/``."""
    if part not in PEAK_FILES:
        raise ValueError(f"PEAK part {part!r} is not one of {sorted(PEAK_FILES)}")
    path = Path(data_dir) / "peak" / PEAK_FILES[part]
    if not path.is_file():
        raise FileNotFoundError(f"{path}: PEAK is not in the data directory (see the README's data section)")
    return json.loads(path.read_text())


def split_of(case_id: Any, dev_fraction: float = 0.4) -> str:
    """``dev`` or ``report`` for a PEAK record, from a SHA-256 of its ``case_id`` (stable across
    runs and machines)."""
    h = int(hashlib.sha256(str(case_id).encode()).hexdigest()[:8], 16) / 0xFFFFFFFF
    return "dev" if h < dev_fraction else "report"


def _question(rec: dict) -> tuple[str, str, str]:
    rw = rec["requested_rewrite"]
    return rw["prompt"], rw["subject"], rw["prompt"].replace("{}", rw["subject"], 1)


def _unrelated(rec: dict, n: int) -> tuple[str, ...]:
    return tuple(p[0] if isinstance(p, list) else p for p in rec.get("neighborhood_prompts", [])[:n])


def _usable(rec: dict) -> bool:
    rw = rec.get("requested_rewrite", {})
    return bool(rw.get("prompt", "").count("{}") == 1 and rw.get("subject") and rec.get("postive_list"))


def _records(peak: list[dict], split: str, seed: int) -> list[dict]:
    if split not in SPLITS:
        raise ValueError(f"split {split!r} is not one of {SPLITS}")
    recs = [r for r in peak if _usable(r) and split_of(r["case_id"]) == split]
    recs.sort(key=lambda r: str(r["case_id"]))
    random.Random(seed).shuffle(recs)
    return recs


def build_mac(peak: list[dict], k: int, n: int, split: str, seed: int = 0,
              missed: Callable[[str, str], bool] | None = None, n_unrelated: int = 3) -> list[Composition]:
    """``n`` MAC compositions of ``k`` answers from the records of ``split``.

    Answers are taken in ``postive_list`` order, skipping duplicates after normalization and, when
    ``missed`` is given, answers for which ``missed(question, answer)`` is false (the base model
    already produces them). A record with fewer than ``k`` usable answers is skipped. The three
    demonstrations are the next records of the same split with their first ``k`` answers."""
    from blueedit.evaluation.compositional import normalize

    recs = _records(peak, split, seed)
    out: list[Composition] = []
    for i, rec in enumerate(recs):
        if len(out) == n:
            break
        prompt, subject, question = _question(rec)
        answers: list[str] = []
        for a in rec["postive_list"]:
            if len(answers) == k:
                break
            if normalize(a) and normalize(a) not in {normalize(x) for x in answers} and (missed is None or missed(question, a)):
                answers.append(a)
        if len(answers) < k:
            continue
        demos = [d for d in recs[i + 1:] + recs[:i] if len(d["postive_list"]) >= k][:3]
        shots = "".join(f"{_question(d)[2]} {', '.join(d['postive_list'][:k])}.\n" for d in demos)
        edits = tuple(EditRequest(f"{rec['case_id']}:{j}", prompt, subject, a, source="peak")
                      for j, a in enumerate(answers))
        rephrased = tuple(shots + p for p in rec.get("para_add_prompts", [])[:2])
        out.append(Composition(f"mac{k}-{rec['case_id']}", "mac", shots + question, edits, tuple(answers), False,
                               rephrased, _unrelated(rec, n_unrelated)))
    return out


def mqc_query(q1: str, q2: str) -> str:
    return f'The answers of the questions "{q1}", "{q2}" are'


def build_mqc(peak: list[dict], n: int, split: str, seed: int = 0, n_unrelated: int = 2) -> list[Composition]:
    """``n`` MQC compositions: consecutive records of ``split`` paired (different subjects), each
    edited to its ``target_new``; three demonstrations from other pairs with their true answers."""
    recs = [r for r in _records(peak, split, seed) if r["requested_rewrite"].get("target_new", {}).get("str")]
    out: list[Composition] = []
    pairs = [(recs[i], recs[i + 1]) for i in range(0, len(recs) - 1, 2)
             if recs[i]["requested_rewrite"]["subject"] != recs[i + 1]["requested_rewrite"]["subject"]]
    for i, (r1, r2) in enumerate(pairs[:n]):
        demos = [pairs[(i + j) % len(pairs)] for j in range(1, 4)]
        shots = "".join(f"{mqc_query(_question(a)[2], _question(b)[2])} {a['postive_list'][0]}, "
                        f"{b['postive_list'][0]} respectively.\n" for a, b in demos)
        edits, answers = [], []
        for j, r in enumerate((r1, r2)):
            prompt, subject, _ = _question(r)
            rw = r["requested_rewrite"]
            answers.append(rw["target_new"]["str"])
            edits.append(EditRequest(f"{r['case_id']}:{j}", prompt, subject, answers[-1],
                                     rw.get("target_true", {}).get("str"), source="peak"))
        q1, q2 = _question(r1)[2], _question(r2)[2]
        rephrased = []
        p1, p2 = r1.get("para_add_prompts", []), r2.get("para_add_prompts", [])
        if p1 and p2:
            rephrased.append(shots + mqc_query(p1[0], p2[0]))
        out.append(Composition(f"mqc-{r1['case_id']}-{r2['case_id']}", "mqc", shots + mqc_query(q1, q2),
                               tuple(edits), tuple(answers), True, tuple(rephrased),
                               _unrelated(r1, n_unrelated) + _unrelated(r2, n_unrelated)))
    return out


CME_TASKS = ("mac_k2", "mac_k3", "mqc")


def build_cme(data_dir: str | Path, out_dir: str | Path, n: dict[str, int], seed: int = 0,
              missed: Callable[[str, str], bool] | None = None,
              tasks: tuple[str, ...] = CME_TASKS) -> dict[str, Path]:
    """Write ``{task}_{split}.json`` for ``tasks`` (of ``mac_k2``, ``mac_k3``, ``mqc``) and the
    splits in ``n`` (split → compositions per task) from PEAK-CF. Returns the written paths."""
    unknown = set(tasks) - set(CME_TASKS)
    if unknown:
        raise ValueError(f"CME tasks {sorted(unknown)} are not among {CME_TASKS}")
    peak = load_peak(data_dir, "counter")
    builders = {"mac_k2": lambda s: build_mac(peak, 2, n[s], s, seed, missed),
                "mac_k3": lambda s: build_mac(peak, 3, n[s], s, seed, missed),
                "mqc": lambda s: build_mqc(peak, n[s], s, seed)}
    written = {}
    for split in SPLITS:
        for task in tasks if n.get(split) else ():
            written[f"{task}_{split}"] = save_compositions(builders[task](split),
                                                           Path(out_dir) / f"{task}_{split}.json")
    return written


# -- data module ----------------------------------------------------------------------------------
class CompositionDataModule(L.LightningDataModule):
    """Compositions as editing rounds: round ``i`` is the ``k`` edits of composition ``i``
    (``path``: a JSON file in the format of the module docstring, validated in ``setup``)."""

    def __init__(self, path: str | Path):
        super().__init__()
        self.path = Path(path)
        self.compositions: list[Composition] = []

    def setup(self, stage: str | None = None) -> None:
        if not self.compositions:
            self.compositions = load_compositions(self.path)

    @property
    def requests(self) -> list[EditRequest]:
        return [e for c in self.compositions for e in c.edits]

    @property
    def num_rounds(self) -> int:
        return len(self.compositions)

    def train_dataloader(self) -> list[list[EditRequest]]:
        return [list(c.edits) for c in self.compositions]
