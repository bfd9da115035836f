"""Read edit requests from the benchmark formats and from the project's own JSON / JSONL format.

Formats (``detect_format`` tells them apart from the first record):

``counterfact``
    ROME / MEMIT CounterFact and MultiCounterFact: ``case_id``, ``requested_rewrite`` (``prompt``
    with ``{}``, ``subject``, ``target_new.str``, ``target_true.str``), ``paraphrase_prompts``,
    ``neighborhood_prompts`` (their answer is ``target_true``), ``generation_prompts``.
``counterfact-easyedit``
    EasyEdit's flattening: ``prompt`` is already filled with the subject, one ``rephrase_prompt``
    and one ``locality_prompt`` with its ``locality_ground_truth``.
``zsre``
    MEND / ROME zsRE: ``subject``, ``src`` (a question holding the subject), ``answers``, ``alt``,
    ``rephrase``, ``loc`` and ``loc_ans``. Like the MEMIT / AlphaEdit / BLUE code, the new target is
    ``answers[0]`` by default; ``zsre_target="alt"`` edits towards ``alt`` instead. The neighborhood
    (locality) prompt is ``loc + "?"``, as the published loader writes it.
``user``
    The project's format, one object per edit: ``prompt`` (with ``{}``), ``subject``,
    ``target_new``, and optionally ``target_true``, ``paraphrases``, ``neighborhood``,
    ``neighborhood_targets``, ``generation_prompts`` and ``case_id`` (default: the row index).

Sources accepted by :func:`load_requests`: a local ``.json`` / ``.jsonl`` file (optionally
``.gz``), a known benchmark name resolved inside the data directory (see :data:`KNOWN_DATASETS`),
``examples`` (the small example set shipped with the package) and ``hub:<id>[:<config>][@<split>]``
for the Hugging Face Hub.

Local files are read with the standard library (``json`` / ``gzip``) rather than through
``datasets``: Arrow must infer one schema for the whole file and fails, with a message that names no
record, on exactly the malformed user files that validation is meant to explain (a ``target_new``
that is a number in one row and a string in the next). Reading plain Python objects lets every error
name the record index, its ``case_id`` and the field at fault. ``datasets`` is only used for Hub
sources, where it brings caching and authentication.

Every record kept (all of them, or the first ``num_edits``) is converted and validated before
anything is returned: one bad record fails the whole load, with its index in the file.
"""

from __future__ import annotations

import codecs
import gzip
import json
import os
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from importlib import resources
from pathlib import Path
from typing import Any

from blueedit.config import UserInputError
from blueedit.data.records import (
    EditRecordError,
    EditRequest,
    check_unique_case_ids,
    drop_duplicate_records,
    validate_request,
)

__all__ = [
    "DATA_DIR_ENV",
    "FORMATS",
    "KNOWN_DATASETS",
    "default_data_dir",
    "convert_records",
    "detect_format",
    "from_counterfact",
    "from_easyedit",
    "from_user",
    "from_zsre",
    "load_examples",
    "load_requests",
    "read_records",
]

#: Environment variable naming the benchmark data directory.
DATA_DIR_ENV = "BLUEEDIT_DATA_DIR"

#: The record formats understood by :func:`load_requests`.
FORMATS: tuple[str, ...] = ("counterfact", "counterfact-easyedit", "zsre", "user")

#: Benchmark names and their paths inside the data directory.
KNOWN_DATASETS: dict[str, str] = {
    "counterfact": "counterfact/counterfact_eval.json",
    "counterfact_dev": "counterfact/counterfact_dev.json",
    "counterfact_eval": "counterfact/counterfact_eval.json",
    "counterfact-easyedit": "counterfact/easyedit/counterfact-edit.json.gz",
    "zsre": "zsre/zsre_eval.json",
    "zsre_dev": "zsre/zsre_dev.json",
    "zsre_eval": "zsre/zsre_eval.json",
}

_ZSRE_TARGETS = ("answers", "alt")

_USER_KEYS = frozenset(
    {
        "case_id",
        "prompt",
        "subject",
        "target_new",
        "target_true",
        "paraphrases",
        "neighborhood",
        "neighborhood_targets",
        "generation_prompts",
    }
)
_USER_REQUIRED = ("prompt", "subject", "target_new")


# --------------------------------------------------------------------------------------------
# helpers


def _where(index: int, case_id: Any) -> str:
    """``edit record 3 (case_id=70)``: how error messages name a record."""
    return f"edit record {index}" if case_id is None else f"edit record {index} (case_id={case_id!r})"


def _require_mapping(record: Any, index: int) -> Mapping[str, Any]:
    if not isinstance(record, Mapping):
        raise EditRecordError(
            f"edit record {index}: expected a JSON object (dict), got {type(record).__name__}"
        )
    return record


def _field(record: Mapping[str, Any], key: str, where: str, fmt: str) -> Any:
    """``record[key]`` or an :class:`EditRecordError` saying the field is missing."""
    if key not in record:
        raise EditRecordError(f"{where}: missing field '{key}' (required by the {fmt} format)")
    return record[key]


def _target_str(value: Any, where: str, name: str) -> Any:
    """Unwrap CounterFact-style ``{"str": x}`` targets; anything else is returned unchanged."""
    if isinstance(value, Mapping):
        if "str" not in value:
            raise EditRecordError(
                f"{where}: '{name}' is an object without a 'str' key; give a string or {{\"str\": ...}}"
            )
        return value["str"]
    return value


def _string_list(value: Any) -> Any:
    """Lists become tuples, ``None`` becomes ``()``; anything else is left for validation to name."""
    if value is None:
        return ()
    if isinstance(value, (list, tuple)):
        return tuple(value)
    return value


def _fill_first(text: Any, subject: Any, where: str, text_field: str) -> str:
    """Turn a filled prompt into a template: the first occurrence of ``subject`` becomes ``{}``."""
    if not isinstance(text, str):
        raise EditRecordError(f"{where}: '{text_field}' must be a string, got {type(text).__name__}")
    if not isinstance(subject, str) or not subject.strip():
        raise EditRecordError(f"{where}: 'subject' must be a non-empty string, got {subject!r}")
    if subject not in text:
        raise EditRecordError(f"{where}: subject {subject!r} does not occur in '{text_field}' {text!r}")
    return text.replace(subject, "{}", 1)


# --------------------------------------------------------------------------------------------
# converters


def from_counterfact(record: Any, index: int) -> EditRequest:
    """Convert one ROME / MEMIT CounterFact record (``source="counterfact"``)."""
    rec = _require_mapping(record, index)
    case_id = rec.get("case_id", index)
    where = _where(index, case_id)
    rewrite = _field(rec, "requested_rewrite", where, "counterfact")
    if not isinstance(rewrite, Mapping):
        raise EditRecordError(
            f"{where}: 'requested_rewrite' must be an object, got {type(rewrite).__name__}"
        )
    target_true = _target_str(rewrite.get("target_true"), where, "requested_rewrite.target_true")
    new = rewrite.get("target_new")
    new_id = new.get("id") if isinstance(new, Mapping) else None
    relation_id = rewrite.get("relation_id")
    req = EditRequest(
        case_id=case_id,
        prompt=_field(rewrite, "prompt", where, "counterfact"),
        subject=_field(rewrite, "subject", where, "counterfact"),
        target_new=_target_str(
            _field(rewrite, "target_new", where, "counterfact"), where, "requested_rewrite.target_new"
        ),
        target_true=target_true,
        paraphrases=_string_list(rec.get("paraphrase_prompts")),
        neighborhood=_string_list(rec.get("neighborhood_prompts")),
        generation_prompts=_string_list(rec.get("generation_prompts")),
        source="counterfact",
        relation_id=None if relation_id is None else str(relation_id),
        target_new_id=None if new_id is None else str(new_id),
    )
    return validate_request(req, index)


def from_easyedit(record: Any, index: int) -> EditRequest:
    """Convert one EasyEdit CounterFact record (``source="counterfact-easyedit"``).

    The filled ``prompt`` becomes a template by replacing the first occurrence of the subject with
    ``{}``; a subject that does not occur in the prompt is an error.
    """
    rec = _require_mapping(record, index)
    case_id = rec.get("case_id", index)
    where = _where(index, case_id)
    subject = _field(rec, "subject", where, "counterfact-easyedit")
    prompt = _fill_first(_field(rec, "prompt", where, "counterfact-easyedit"), subject, where, "prompt")
    paraphrases: Any = ()
    if rec.get("rephrase_prompt") is not None:
        paraphrases = (rec["rephrase_prompt"],)
    neighborhood: Any = ()
    neighborhood_targets: Any = ()
    if rec.get("locality_prompt") is not None:
        neighborhood = (rec["locality_prompt"],)
        neighborhood_targets = (_field(rec, "locality_ground_truth", where, "counterfact-easyedit"),)
    req = EditRequest(
        case_id=case_id,
        prompt=prompt,
        subject=subject,
        target_new=_target_str(_field(rec, "target_new", where, "counterfact-easyedit"), where, "target_new"),
        target_true=_target_str(rec.get("ground_truth"), where, "ground_truth"),
        paraphrases=paraphrases,
        neighborhood=neighborhood,
        neighborhood_targets=neighborhood_targets,
        source="counterfact-easyedit",
    )
    return validate_request(req, index)


def from_zsre(record: Any, index: int, *, target: str = "answers") -> EditRequest:
    """Convert one MEND zsRE record (``source="zsre"``).

    Args:
        record: the raw record.
        index: its position in the file (for error messages and the default ``case_id``).
        target: ``"answers"`` edits towards ``answers[0]`` and keeps ``alt`` as the old target
            (what the MEMIT / AlphaEdit / BLUE code does); ``"alt"`` swaps the two.
    """
    if target not in _ZSRE_TARGETS:
        raise UserInputError(f"zsre_target must be one of {_ZSRE_TARGETS}, got {target!r}")
    rec = _require_mapping(record, index)
    case_id = rec.get("case_id", index)
    where = _where(index, case_id)
    subject = _field(rec, "subject", where, "zsre")
    prompt = _fill_first(_field(rec, "src", where, "zsre"), subject, where, "src")
    answers = _field(rec, "answers", where, "zsre")
    if not isinstance(answers, (list, tuple)) or not answers:
        raise EditRecordError(f"{where}: 'answers' must be a non-empty list, got {answers!r}")
    answer, alt = answers[0], rec.get("alt")
    new, old = (answer, alt) if target == "answers" else (alt, answer)
    if target == "alt" and alt is None:
        raise EditRecordError(f"{where}: missing field 'alt' (needed with zsre_target='alt')")
    if isinstance(old, str) and not old.strip():
        old = None
    paraphrases: Any = () if rec.get("rephrase") is None else (rec["rephrase"],)
    neighborhood: Any = ()
    neighborhood_targets: Any = ()
    if rec.get("loc") is not None:
        # the locality prompt as the published zsRE loader writes it: the NQ question plus "?"
        # (docs/algorithms.md §8); its answer is scored token by token after it
        neighborhood = (str(rec["loc"]) + "?",)
        neighborhood_targets = (_field(rec, "loc_ans", where, "zsre"),)
    req = EditRequest(
        case_id=case_id,
        prompt=prompt,
        subject=subject,
        target_new=new,
        target_true=old,
        paraphrases=paraphrases,
        neighborhood=neighborhood,
        neighborhood_targets=neighborhood_targets,
        source="zsre",
    )
    return validate_request(req, index)


def from_user(record: Any, index: int) -> EditRequest:
    """Convert one record of the project's own format (``source="user"``).

    ``target_new`` / ``target_true`` may also be given CounterFact-style as ``{"str": ...}``.
    Unknown keys are errors, so a misspelt ``paraphrase`` is not silently ignored.
    """
    rec = _require_mapping(record, index)
    case_id = rec.get("case_id", index)
    where = _where(index, case_id)
    unknown = sorted(str(k) for k in rec if k not in _USER_KEYS)
    if unknown:
        raise EditRecordError(
            f"{where}: unknown key(s) {', '.join(repr(k) for k in unknown)}; "
            f"allowed keys are {', '.join(sorted(_USER_KEYS))}"
        )
    for key in _USER_REQUIRED:
        _field(rec, key, where, "user")
    req = EditRequest(
        case_id=case_id,
        prompt=rec["prompt"],
        subject=rec["subject"],
        target_new=_target_str(rec["target_new"], where, "target_new"),
        target_true=_target_str(rec.get("target_true"), where, "target_true"),
        paraphrases=_string_list(rec.get("paraphrases")),
        neighborhood=_string_list(rec.get("neighborhood")),
        neighborhood_targets=_string_list(rec.get("neighborhood_targets")),
        generation_prompts=_string_list(rec.get("generation_prompts")),
        source="user",
    )
    return validate_request(req, index)


def detect_format(first_record: dict[str, Any]) -> str:
    """Guess the format of a file from its first record: one of :data:`FORMATS`."""
    rec = _require_mapping(first_record, 0)
    if "requested_rewrite" in rec:
        return "counterfact"
    if "src" in rec and ("answers" in rec or "alt" in rec):
        return "zsre"
    if "ground_truth" in rec or "rephrase_prompt" in rec or "locality_prompt" in rec:
        return "counterfact-easyedit"
    return "user"


def convert_records(
    records: Sequence[Any], format: str = "auto", *, zsre_target: str = "answers"
) -> list[EditRequest]:
    """Convert and validate raw records; ``format="auto"`` detects it from the first record."""
    if not records:
        return []
    fmt = detect_format(records[0]) if format == "auto" else format
    converters: dict[str, Callable[[Any, int], EditRequest]] = {
        "counterfact": from_counterfact,
        "counterfact-easyedit": from_easyedit,
        "zsre": lambda r, i: from_zsre(r, i, target=zsre_target),
        "user": from_user,
    }
    if fmt not in converters:
        raise UserInputError(f"format must be 'auto' or one of {FORMATS}, got {format!r}")
    if zsre_target not in _ZSRE_TARGETS:
        raise UserInputError(f"zsre_target must be one of {_ZSRE_TARGETS}, got {zsre_target!r}")
    convert = converters[fmt]
    return [convert(record, i) for i, record in enumerate(records)]


# --------------------------------------------------------------------------------------------
# reading


def default_data_dir() -> Path | None:
    """The benchmark data directory from ``$BLUEEDIT_DATA_DIR``, or ``None`` when unset."""
    value = os.environ.get(DATA_DIR_ENV)
    return Path(value).expanduser() if value else None


def _read_text(path: Path) -> str:
    """The text of a (gzipped) UTF-8 file (a UTF-8 byte order mark is dropped). Raises
    :class:`~blueedit.config.UserInputError` naming the file for one in another encoding, saying which one when it starts
    with a UTF-16 or UTF-32 byte order mark."""
    raw = gzip.decompress(path.read_bytes()) if path.name.endswith(".gz") else path.read_bytes()
    boms = ((codecs.BOM_UTF32_LE, "UTF-32"), (codecs.BOM_UTF32_BE, "UTF-32"), (codecs.BOM_UTF16_LE, "UTF-16"),
            (codecs.BOM_UTF16_BE, "UTF-16"))
    for bom, name in boms:
        if raw.startswith(bom):
            raise UserInputError(f"{path} is {name} text; edit files must be UTF-8: save it as UTF-8")
    if b"\x00" in raw:
        raise UserInputError(f"{path} holds NUL bytes: it is UTF-16 or UTF-32 text without a byte order mark, or not "
                         "text; edit files must be UTF-8: save it as UTF-8")
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise UserInputError(f"{path} is not UTF-8 text (byte 0x{raw[e.start]:02x} at offset {e.start} is not valid "
                         "UTF-8); edit files must be UTF-8: save it as UTF-8") from None


def _parse_jsonl(lines: Iterable[str], path: Path) -> list[Any]:
    records = []
    for lineno, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as err:
            raise UserInputError(f"{path}: line {lineno} is not valid JSON: {err}") from err
    return records


def read_records(path: str | Path) -> list[Any]:
    """Read the raw records of a ``.json`` (a list) or ``.jsonl`` file, optionally gzipped.

    A ``.json`` file holding one object per line is read as JSONL too.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"edit data file {path} not found")
    stem = path.name[:-3] if path.name.endswith(".gz") else path.name
    text = _read_text(path)
    if not text.strip():
        raise EditRecordError(f"{path} is empty: it holds no edit records")
    if stem.endswith(".jsonl"):
        return _parse_jsonl(text.splitlines(), path)
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        if err.msg == "Extra data":  # several top-level values: JSON Lines under a .json name
            return _parse_jsonl(text.splitlines(), path)
        raise UserInputError(f"{path} is not valid JSON: {err}") from err
    if isinstance(data, Mapping):
        raise UserInputError(f"{path}: expected a JSON list of edit records, got an object")
    if not isinstance(data, list):
        raise UserInputError(f"{path}: expected a JSON list of edit records, got {type(data).__name__}")
    return data


def _read_hub(spec: str, num_edits: int | None) -> list[Any]:
    """Records of ``hub:<dataset_id>[:<config>][@<split>]`` via :func:`datasets.load_dataset`."""
    body = spec[len("hub:") :]
    split = "train"
    if "@" in body:
        body, split = body.rsplit("@", 1)
    dataset_id, _, config = body.partition(":")
    if not dataset_id:
        raise UserInputError(f"bad hub source {spec!r}; expected hub:<dataset_id>[:<config>][@<split>]")
    if num_edits is not None and "[" not in split:
        split = f"{split}[:{num_edits}]"
    import datasets  # heavy import, only needed for Hub sources

    ds = datasets.load_dataset(dataset_id, config or None, split=split)
    return [dict(row) for row in ds]


def resolve_data_dir(data_dir: str | Path | None) -> Path | None:
    """``data_dir`` if given, else ``$BLUEEDIT_DATA_DIR``, else ``None``."""
    return Path(data_dir).expanduser() if data_dir is not None else default_data_dir()


def data_file(data_dir: str | Path | None, rel: str, what: str) -> Path:
    """The file ``<data_dir>/<rel>`` for ``what`` (e.g. ``dataset 'zsre'``).

    Raises ``FileNotFoundError`` saying which path was expected and how to set the directory.
    """
    root = resolve_data_dir(data_dir)
    if root is None:
        raise FileNotFoundError(
            f"{what} is read from <data_dir>/{rel}, but no data directory is set: "
            f"pass data_dir=... (or set the {DATA_DIR_ENV} environment variable)"
        )
    path = root / rel
    if not path.is_file():
        raise FileNotFoundError(f"{what}: expected file {path} not found (data_dir={root})")
    return path


def _example_records() -> list[Any]:
    ref = resources.files("blueedit.data").joinpath("examples", "example_edits.json")
    return json.loads(ref.read_text(encoding="utf-8"))


def load_examples() -> list[EditRequest]:
    """The small example edit set shipped with the package (16 counterfactual edits)."""
    return convert_records(_example_records(), "user")


def load_requests(
    source: str,
    *,
    format: str = "auto",
    data_dir: str | Path | None = None,
    num_edits: int | None = None,
    zsre_target: str = "answers",
) -> list[EditRequest]:
    """Load and validate edit requests.

    Args:
        source: a ``.json`` / ``.jsonl`` path (optionally ``.gz``); a benchmark name from
            :data:`KNOWN_DATASETS` (read inside ``data_dir``); ``examples``; or
            ``hub:<dataset_id>[:<config>][@<split>]``.
        format: ``auto`` (detect from the first record) or one of :data:`FORMATS`.
        data_dir: the benchmark data directory; defaults to ``$BLUEEDIT_DATA_DIR``.
        num_edits: keep only the first ``num_edits`` records; only those are converted and
            validated (and, for Hub sources, downloaded).
        zsre_target: ``answers`` or ``alt``, the zsRE field used as the new target.

    Records that repeat an earlier one in everything but ``case_id`` are dropped with a
    :class:`~blueedit.data.records.DuplicateRecordsWarning` giving their count
    (:func:`~blueedit.data.records.drop_duplicate_records`).

    Raises:
        EditRecordError: a record is malformed (the message names its index, ``case_id`` and field),
            two records share a ``case_id``, or the source holds no records (or the file is empty).
        FileNotFoundError: the file, or the data directory for a benchmark name, is missing.
        ValueError: a bad option, or a file that is not UTF-8 text.
    """
    if format != "auto" and format not in FORMATS:
        raise UserInputError(f"format must be 'auto' or one of {FORMATS}, got {format!r}")
    if zsre_target not in _ZSRE_TARGETS:
        raise UserInputError(f"zsre_target must be one of {_ZSRE_TARGETS}, got {zsre_target!r}")
    if num_edits is not None and (
        isinstance(num_edits, bool) or not isinstance(num_edits, int) or num_edits < 1
    ):
        raise UserInputError(f"num_edits must be a positive integer or None, got {num_edits!r}")

    if source == "examples":
        if format not in ("auto", "user"):
            raise UserInputError(f"the 'examples' set is in the user format, not {format!r}")
        records = _example_records()
        format = "user"
    elif source.startswith("hub:"):
        records = _read_hub(source, num_edits)
    elif source in KNOWN_DATASETS:
        records = read_records(data_file(data_dir, KNOWN_DATASETS[source], f"dataset {source!r}"))
    else:
        path = Path(source).expanduser()
        if not path.is_file():
            raise FileNotFoundError(
                f"edit data source {source!r} is neither a file nor a known name; known names: "
                f"examples, {', '.join(KNOWN_DATASETS)}, or hub:<dataset_id>[:<config>][@<split>]"
            )
        records = read_records(path)

    if num_edits is not None:
        if num_edits > len(records):
            warnings.warn(
                f"num_edits={num_edits} but {source!r} holds only {len(records)} records; using all",
                stacklevel=2,
            )
        records = records[:num_edits]
    if not records:
        raise EditRecordError(f"edit data source {source!r} holds no edit records")
    requests = drop_duplicate_records(convert_records(records, format, zsre_target=zsre_target), repr(source))
    return check_unique_case_ids(requests, repr(source))
