"""Lightning data module: edit requests split into sequential editing rounds.

One "batch" of the training loop is one :class:`EditRound`: the ``edits_per_round`` requests that
are edited together (MEMIT / AlphaEdit batch editing); successive rounds are sequential editing.
Rounds must come in order and every rank must see every round (all ranks hold the same model and
apply the same update), so the loader uses :class:`RoundSampler`, which Lightning never replaces.
The loader is a :class:`RoundLoader`: it has ``state_dict`` / ``load_state_dict``, so a run resumed
from a mid-epoch checkpoint continues at the next round (Lightning's resumable-loader protocol).
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Literal

import lightning as L
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from blueedit.config import UserInputError, check_choice
from blueedit.data.formats import default_data_dir, load_requests
from blueedit.data.records import EditRequest

__all__ = ["EditDataModule", "EditRound", "ResumeMismatchError", "RoundDataset", "RoundLoader", "RoundSampler",
           "describe_differences"]


class ResumeMismatchError(UserInputError):
    """A checkpoint was written by a run with another data stream or other settings."""


def describe_differences(saved: dict[str, Any], now: dict[str, Any], prefix: str = "") -> list[str]:
    """``"<key>: <saved> in the checkpoint, <now> now"`` for every (nested) entry that differs."""
    out: list[str] = []
    for key in sorted(set(saved) | set(now), key=str):
        a, b = saved.get(key, "<absent>"), now.get(key, "<absent>")
        name = f"{prefix}{key}"
        if isinstance(a, dict) and isinstance(b, dict):
            out.extend(describe_differences(a, b, name + "."))
        elif a != b:
            out.append(f"{name}: {a!r} in the checkpoint, {b!r} now")
    return out


@dataclass
class EditRound:
    """The requests edited together in one round (``index`` counts rounds from 0)."""

    index: int
    requests: list[EditRequest] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.requests)

    def to(self, *args: Any, **kwargs: Any) -> EditRound:
        """Device transfer is a no-op (a round holds only strings).

        Having ``to`` makes Lightning's ``batch_to_device`` treat the round as one transferable
        object instead of walking into its frozen :class:`EditRequest` dataclasses, which it refuses.
        """
        return self


class RoundDataset(Dataset[EditRound]):
    """Item ``i`` is round ``i``: requests ``[i * k, (i + 1) * k)`` for ``k = edits_per_round``."""

    def __init__(self, requests: list[EditRequest], edits_per_round: int) -> None:
        if edits_per_round < 1:
            raise UserInputError(f"edits_per_round must be >= 1, got {edits_per_round}")
        self.requests = list(requests)
        self.edits_per_round = edits_per_round

    def __len__(self) -> int:
        return math.ceil(len(self.requests) / self.edits_per_round)

    def __getitem__(self, index: int) -> EditRound:
        if not 0 <= index < len(self):
            raise IndexError(f"round {index} out of range (0..{len(self) - 1})")
        k = self.edits_per_round
        return EditRound(index, self.requests[index * k : (index + 1) * k])


class RoundSampler(DistributedSampler):
    """Yields ``start .. n-1`` in order, on every rank (``start`` is 0 unless a resume set it).

    It subclasses :class:`~torch.utils.data.DistributedSampler` only so that Lightning, which wraps
    any other sampler in a ``DistributedSamplerWrapper`` under DDP (splitting the rounds between
    ranks), leaves it as it is. It behaves as a single-replica sequential sampler. Its length is
    always ``n``, the rounds of the whole epoch, which is what Lightning counts steps against.
    """

    def __init__(self, dataset: Dataset[Any]) -> None:
        super().__init__(dataset, num_replicas=1, rank=0, shuffle=False, drop_last=False)
        self._length = len(dataset)  # type: ignore[arg-type]
        self.start = 0

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.start, self._length))

    def __len__(self) -> int:
        return self._length


def _identity(item: EditRound) -> EditRound:
    """Collate function that passes an :class:`EditRound` through unchanged (picklable)."""
    return item


class RoundLoader(DataLoader):
    """The rounds of a :class:`RoundDataset`, one per batch, in order, resumable mid-epoch.

    ``state_dict()`` is ``{"next_round": i}``: the rounds handed to the consumer so far in this
    epoch (counted on the consumer's side, so worker prefetching does not count). Lightning saves
    it in every checkpoint and, when resuming, calls ``load_state_dict`` before iterating: the
    next iteration then starts at round ``i`` instead of round 0, so ``batch_idx``, the round
    and every callback agree. Iterations after that one start at 0 again.
    """

    def __init__(self, dataset: RoundDataset, num_workers: int = 0) -> None:
        super().__init__(dataset, batch_size=None, sampler=RoundSampler(dataset), collate_fn=_identity,
                         num_workers=num_workers)
        self._next_round = 0
        self._resume_at = 0

    def __iter__(self) -> Iterator[EditRound]:
        start, self._resume_at = self._resume_at, 0
        self.sampler.start = start
        self._next_round = start
        try:
            for item in super().__iter__():
                self._next_round += 1
                yield item
        finally:
            self.sampler.start = 0

    def state_dict(self) -> dict[str, int]:
        return {"next_round": self._next_round}

    def load_state_dict(self, state_dict: dict[str, int]) -> None:
        start = int(state_dict.get("next_round", 0))
        if not 0 <= start <= len(self.sampler):
            raise UserInputError(f"round loader state: next_round {start} outside 0..{len(self.sampler)}")
        self._resume_at = start


#: ``data.format``: ``auto`` detects it from the first record (see :data:`blueedit.data.formats.FORMATS`).
RecordFormat = Literal["auto", "counterfact", "counterfact-easyedit", "zsre", "user"]
ZsreTarget = Literal["answers", "alt"]


class EditDataModule(L.LightningDataModule):
    """Edit requests for a sequential / batch editing run.

    Args:
        dataset: where the requests come from (see :func:`blueedit.data.formats.load_requests`):
            ``examples``, a benchmark name (``counterfact``, ``zsre``, ...), a file path or
            ``hub:<id>[:<config>][@<split>]``.
        format: ``auto`` or one of ``counterfact``, ``counterfact-easyedit``, ``zsre``, ``user``.
        data_dir: benchmark data directory (default: ``$BLUEEDIT_DATA_DIR``).
        num_edits: edit only the first ``num_edits`` requests (default: all).
        edits_per_round: requests edited together in one round (one training step).
        zsre_target: ``answers`` or ``alt``: the zsRE field used as the new target.
        eval_dataset: records to evaluate after editing (default: the edited records).
        num_workers: DataLoader workers (0 is right: a round is a handful of strings).
        max_edits: refuse more records than this before loading the model (``None``: no limit).
    """

    def __init__(
        self,
        dataset: str = "examples",
        format: RecordFormat = "auto",
        data_dir: str | None = None,
        num_edits: int | None = None,
        edits_per_round: int = 10,
        zsre_target: ZsreTarget = "answers",
        eval_dataset: str | None = None,
        num_workers: int = 0,
        max_edits: int | None = None,
    ) -> None:
        super().__init__()
        if isinstance(edits_per_round, bool) or not isinstance(edits_per_round, int) or edits_per_round < 1:
            raise UserInputError(f"edits_per_round must be an integer >= 1, got {edits_per_round!r}")
        for name, value in (("num_edits", num_edits), ("data.max_edits", max_edits)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise UserInputError(f"{name} must be an integer >= 1 or None, got {value!r}")
        check_choice("data.format", format, RecordFormat)
        check_choice("data.zsre_target", zsre_target, ZsreTarget)
        if num_workers < 0:
            raise UserInputError(f"num_workers must be >= 0, got {num_workers!r}")
        self.save_hyperparameters()
        self.dataset = dataset
        self.format = format
        self.data_dir = data_dir
        self.num_edits = num_edits
        self.edits_per_round = edits_per_round
        self.max_edits = max_edits
        self.zsre_target = zsre_target
        self.eval_dataset = eval_dataset
        self.num_workers = num_workers
        self._requests: list[EditRequest] | None = None
        self._eval_requests: list[EditRequest] | None = None

    @property
    def resolved_data_dir(self) -> str | None:
        """``data_dir`` or, when unset, ``$BLUEEDIT_DATA_DIR``."""
        if self.data_dir is not None:
            return self.data_dir
        default = default_data_dir()
        return None if default is None else str(default)

    def setup(self, stage: str | None = None) -> None:
        """Load and validate the edit requests (on every rank; idempotent)."""
        if self._requests is None:
            self._requests = load_requests(
                self.dataset,
                format=self.format,
                data_dir=self.resolved_data_dir,
                num_edits=self.num_edits,
                zsre_target=self.zsre_target,
            )
        n = len(self._requests)
        if self.max_edits is not None and n > self.max_edits:
            self._requests = None
            raise UserInputError(f"data.dataset {self.dataset!r} holds {n} edit records ({math.ceil(n / self.edits_per_round)} "
                             f"rounds), more than data.max_edits={self.max_edits}; raise data.max_edits, or edit "
                             "fewer with data.num_edits")

    # -- resume safety: the checkpoint records the stream it was cut from ------------------------
    def stream_fingerprint(self) -> dict[str, Any]:
        """What decides which records go into which round: the source and its options, the number
        of records, ``edits_per_round``, and the SHA-256 of the records in order (so the same file
        name with other content, or another order, is told apart)."""
        digest = hashlib.sha256()
        for r in self.requests:
            digest.update(json.dumps(r.to_dict(), sort_keys=True, default=str).encode())
        return {
            "dataset": self.dataset, "format": self.format, "zsre_target": self.zsre_target,
            "num_edits": self.num_edits, "edits_per_round": self.edits_per_round,
            "num_records": len(self.requests), "records_sha256": digest.hexdigest(),
        }

    def state_dict(self) -> dict[str, Any]:
        """Saved in every checkpoint: the :meth:`stream_fingerprint`."""
        return {"stream": self.stream_fingerprint()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Refuse to resume a checkpoint cut from another data stream (it would skip records of
        this one and mix edits of both); the error names what differs."""
        saved = state_dict.get("stream")
        if saved is None:
            return
        now = self.stream_fingerprint()
        differences = describe_differences({k: v for k, v in saved.items() if k != "records_sha256"},
                                           {k: v for k, v in now.items() if k != "records_sha256"}, "data.")
        if not differences and saved.get("records_sha256") != now["records_sha256"]:
            differences = [f"the edit records of data.dataset {self.dataset!r} differ in content or order"]
        if differences:
            raise ResumeMismatchError("the checkpoint comes from another data stream; refusing to resume: "
                                      + "; ".join(differences))

    @property
    def requests(self) -> list[EditRequest]:
        """All edit requests, in editing order (loaded on first use)."""
        self.setup()
        assert self._requests is not None
        return self._requests

    @property
    def num_rounds(self) -> int:
        """Number of editing rounds: ``ceil(len(requests) / edits_per_round)``."""
        return math.ceil(len(self.requests) / self.edits_per_round)

    def eval_requests(self) -> list[EditRequest]:
        """The records to evaluate: ``eval_dataset`` when given, else the edited requests."""
        if self.eval_dataset is None:
            return self.requests
        if self._eval_requests is None:
            self._eval_requests = load_requests(
                self.eval_dataset,
                format="auto",
                data_dir=self.resolved_data_dir,
                zsre_target=self.zsre_target,
            )
        return self._eval_requests

    def _rounds_loader(self, requests: list[EditRequest], per_batch: int) -> RoundLoader:
        """``requests`` as :class:`EditRound` batches of ``per_batch``, in order, on every rank."""
        return RoundLoader(RoundDataset(requests, per_batch), num_workers=self.num_workers)

    def train_dataloader(self) -> RoundLoader:
        """One :class:`EditRound` per step, in order, unbatched, on every rank."""
        return self._rounds_loader(self.requests, self.edits_per_round)

    # -- validate / test: evaluate a (saved, edited) model on the evaluation records ------------
    #: Records per evaluation batch of ``blueedit validate`` / ``blueedit test``.
    eval_chunk_size: int = 32

    def _eval_dataloader(self) -> DataLoader[EditRound] | list:
        """The evaluation records in order, ``eval_chunk_size`` per batch (an :class:`EditRound`
        whose ``index`` counts chunks); empty while fitting, so that ``fit`` runs no validation
        loop (editing runs evaluate themselves before and after editing; the CLI also sets
        ``trainer.limit_val_batches: 0`` for ``fit`` and ``edit``, so the loop is not even built)."""
        trainer = getattr(self, "trainer", None)
        if trainer is not None and trainer.state.fn == "fit":
            return []
        return self._rounds_loader(self.eval_requests(), self.eval_chunk_size)

    def val_dataloader(self) -> DataLoader[EditRound] | list:
        """See :meth:`_eval_dataloader` (``blueedit validate``)."""
        return self._eval_dataloader()

    def test_dataloader(self) -> DataLoader[EditRound] | list:
        """See :meth:`_eval_dataloader` (``blueedit test``)."""
        return self._eval_dataloader()
