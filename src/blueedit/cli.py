"""The ``blueedit`` command: LightningCLI with ``fit``, ``edit``, ``validate`` and ``test``.

- ``blueedit fit --config CONFIG``: a sequential editing experiment, evaluated before and after.
- ``blueedit edit --config CONFIG --edits FILE --output DIR``: apply the edits in FILE and save
  the edited model as a Hugging Face directory with ``edits.json``.
"""

from __future__ import annotations

import json
from pathlib import Path

from lightning.pytorch import Trainer
from lightning.pytorch.cli import LightningCLI

from blueedit.data.datamodule import EditDataModule
from blueedit.module import EditingModule


class EditTrainer(Trainer):
    """A Trainer with an ``edit`` entry point (its signature defines ``blueedit edit``'s options)."""

    def edit(
        self,
        model: EditingModule,
        edits: str,
        output: str,
        datamodule: EditDataModule | None = None,
        ckpt_path: str | None = None,
    ) -> Path:
        """Apply the edits in ``edits`` (JSON/JSONL, the user format) and save to ``output``.

        Args:
            model: the editing module.
            edits: path of the edit records.
            output: directory for the edited model (``save_pretrained`` of model and tokenizer)
                and ``edits.json``.
            datamodule: its ``dataset`` is replaced by ``edits``; ``edits_per_round`` is kept.
            ckpt_path: resume an interrupted edit from this checkpoint.
        """
        if not Path(edits).is_file():
            raise FileNotFoundError(f"--edits {edits!r}: no such file")
        dm = datamodule or EditDataModule()
        dm.dataset, dm.format, dm.num_edits, dm._requests = edits, "auto", None, None
        dm.setup("fit")  # validates every record before anything is loaded onto the model
        self.fit(model, datamodule=dm, ckpt_path=ckpt_path)
        if self.is_global_zero:  # every rank holds the same weights; one writes them
            save_edited_model(model, dm, output)
        self.strategy.barrier("blueedit-edit-saved")
        return Path(output)


def save_edited_model(module: EditingModule, datamodule: EditDataModule, output: str | Path) -> Path:
    """``save_pretrained`` of the edited model and tokenizer, plus ``edits.json``."""
    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    module.lm.save_pretrained(out)
    module.tokenizer.save_pretrained(out)
    record = {
        "base_model": module.model_spec.name_or_path,
        "method": module.hp.method,
        "strategy": module.hp.strategy,
        "layers": module.hp.edited_layers,
        "critical_layers": list(module.hp.layers),
        "rounds": [
            {"index": r.index, "case_ids": r.case_ids, "seconds": r.seconds,
             "update_norms": {str(k): v for k, v in r.update_norms.items()}}
            for r in module.reports
        ],
        "requests": [r.to_dict() for r in datamodule.requests],
    }
    (out / "edits.json").write_text(json.dumps(record, indent=1, default=str))
    return out


class BlueEditCLI(LightningCLI):
    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        commands = LightningCLI.subcommands()
        commands["edit"] = {"model", "datamodule"}
        return commands

    def add_arguments_to_parser(self, parser) -> None:
        parser.link_arguments("data.data_dir", "model.data_dir")


TRAINER_DEFAULTS = {
    "max_epochs": 1,
    "num_sanity_val_steps": 0,
    "enable_model_summary": False,
    "use_distributed_sampler": False,
    "log_every_n_steps": 1,
}


def run_cli(args: list[str] | None = None) -> BlueEditCLI:
    """Parse ``args`` (default: the command line), run the subcommand, return the CLI object
    (its ``model``, ``datamodule`` and ``trainer``)."""
    return BlueEditCLI(
        EditingModule,
        EditDataModule,
        trainer_class=EditTrainer,
        trainer_defaults=TRAINER_DEFAULTS,
        seed_everything_default=0,
        save_config_kwargs={"overwrite": True},
        args=args,
    )


def main(args: list[str] | None = None) -> None:
    """The ``blueedit`` console script (exit status 0 on success)."""
    run_cli(args)


if __name__ == "__main__":
    main()
