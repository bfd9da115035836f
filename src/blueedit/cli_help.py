"""The help texts of the ``blueedit`` command.

- ``blueedit --help``: :func:`description` names every method and every subcommand.
- ``blueedit fit --help`` / ``edit --help`` (and ``validate``, ``test``): one line per option
  (:class:`ShortHelpFormatter`): the editing, model, data and statistics options, and of the
  Trainer's options only :data:`EDITING_TRAINER_OPTIONS`.
- ``--help-all`` (:class:`HelpAllAction`): every option with its full text, as Lightning writes it.
"""

from __future__ import annotations

import argparse
import re
import shutil
import typing
from typing import Any

from jsonargparse import DefaultHelpFormatter

#: The Trainer options that matter for editing (where it runs, what it writes, when it stops early);
#: the others (epochs, validation loops, gradient clipping, ...) are behind ``--help-all``.
EDITING_TRAINER_OPTIONS = frozenset({
    "accelerator", "strategy", "devices", "num_nodes", "precision", "default_root_dir", "logger",
    "callbacks", "enable_checkpointing", "enable_progress_bar", "max_steps", "max_time",
})

#: The plain commands beside Lightning's subcommands, and what each does.
PLAIN_COMMANDS = {
    "revert": "`revert DIR --rounds K` undoes a saved model's last rounds",
    "generate": "`generate DIR` shows greedy generations before and after its edits",
    "locate": "`locate --model MODEL` finds a model's critical layers by causal tracing and writes a config",
    "bench": "`bench NAME` runs a benchmark of blueedit.bench (`blueedit bench` lists them)",
}

#: HSE is MEMIT (and PRUNE, RECT, PMET) with three options, not a ``method`` value.
HSE_NOTE = "HSE (MEMIT with target.forget_weight, target.fisher_weight and history_schedule)"

_ROLE = re.compile(r":(?:class|mod|func|data|meth|attr):`~?([^`]+)`")
_LITERAL = re.compile(r"``([^`]+)``")
_SENTENCE_END = re.compile(r"(?<!e\.g)(?<=[^.\s])\.\s")  # a period after a word (not "..", "e.g."), then a space


def method_names() -> tuple[str, ...]:
    """The values of ``editing.method``: every method of the registry (built-in and registered)."""
    from blueedit.methods.registry import method_names as registered

    return tuple(registered())


def description(subcommands: typing.Iterable[str]) -> str:
    """The top-level ``blueedit --help`` text: every method, every subcommand, where to start."""
    lightning = ", ".join(f"`{s}`" for s in subcommands)
    plain = "; ".join(PLAIN_COMMANDS.values())
    return (
        "blueedit: locate-then-edit knowledge editing of Hugging Face causal LMs. "
        f"Methods (--model.editing.method): {', '.join(method_names())}; and {HSE_NOTE}. "
        "BLUE is a strategy on every method that writes with a least-squares solve: "
        "--model.editing.strategy boundary (or --config configs/blue.yaml after a method config). "
        f"Subcommands: {lightning} (`fit` runs a sequential editing experiment evaluated before and after, "
        "`edit` applies your edits and saves the edited model, `validate` / `test` evaluate a saved model); "
        f"{plain} ({', '.join(PLAIN_COMMANDS)} --help). "
        "Start from a config: blueedit fit --config configs/quickstart.yaml. A config whose model.class_path "
        "names blueedit.vision edits vision transformers (RefineViT: configs/vit-digits/refinevit.yaml). "
        "`blueedit fit --help` lists the editing options, `--help-all` every option."
    )


def shown_in_short_help(action: argparse.Action) -> bool:
    """Whether ``action`` is listed by the short ``--help``: not the loaders of nested config
    files (``--model CONFIG``), and of the Trainer's options only :data:`EDITING_TRAINER_OPTIONS`."""
    dest = str(action.dest)
    if action.metavar == "CONFIG" and dest != "config":
        return False
    if dest == "trainer" or dest.startswith("trainer."):
        return dest.split(".")[1] in EDITING_TRAINER_OPTIONS and not dest.endswith(".help")
    return True


def plain_text(text: str) -> str:
    """``text`` on one line, without reStructuredText markup (``x`` and :class:`~a.B` become x and B)."""
    return _LITERAL.sub(r"\1", _ROLE.sub(lambda m: m.group(1).rsplit(".", 1)[-1], " ".join(text.split())))


def summary(text: str | None) -> str:
    """The first sentence of an option's help, as plain text."""
    if not text or text == argparse.SUPPRESS:
        return ""
    first = _SENTENCE_END.split(plain_text(text), maxsplit=1)[0]
    return first if first.endswith(".") else first + "."


def _default_text(action: argparse.Action) -> str:
    default = action.default
    if default is None or default == argparse.SUPPRESS or action.required:
        return ""
    if isinstance(default, (list, tuple)):
        return "[" + ",".join(str(v) for v in default) + "]"
    if isinstance(default, (str, int, float, bool)):
        return str(default).lower() if isinstance(default, bool) else str(default)
    return ""


class ShortHelpFormatter(DefaultHelpFormatter):
    """Each option as ``--name=DEFAULT  first sentence of its help`` (the sentence on a second line
    when it does not fit beside the name, cut at the terminal's width), a usage line that names only
    the required options, and no reStructuredText markup; options :func:`shown_in_short_help`
    rejects are left out."""

    def __init__(self, prog: str, **kwargs: Any) -> None:
        kwargs.setdefault("width", min(max(shutil.get_terminal_size().columns, 80), 140) - 2)
        super().__init__(prog, **kwargs)
        self.line_width = kwargs["width"]

    def add_usage(self, usage, actions, groups, prefix=None) -> None:
        actions = list(actions)
        if usage is None and any("--help-all" in a.option_strings for a in actions):
            required = " ".join(f"{a.option_strings[-1]} {a.dest.upper()}" for a in actions
                                if a.required and a.option_strings)
            usage = f"%(prog)s [-h] [--help-all] [-c CONFIG] {required} [--OPTION VALUE ...]".replace("  ", " ")
        super().add_usage(usage, actions, groups, prefix)

    def add_argument(self, action: argparse.Action) -> None:
        if shown_in_short_help(action):
            super().add_argument(action)

    def start_section(self, heading: str | None) -> None:
        super().start_section(plain_text(heading) if heading else heading)

    def add_text(self, text: str | None) -> None:
        super().add_text(plain_text(text) if text and text != argparse.SUPPRESS else text)

    def _format_action(self, action: argparse.Action) -> str:
        if not action.option_strings:  # the subcommand list and positionals keep argparse's layout
            return super()._format_action(action)
        left = "  " + ", ".join(o for o in action.option_strings if not o.endswith("+"))
        default = _default_text(action)
        if default:
            left += f"={default}"
        if isinstance(action.metavar, str) and action.metavar.startswith("{") and action.metavar != "{true,false}":
            left += f" {action.metavar}"
        text = summary(action.help)
        if not text:
            return left + "\n"
        if len(left) + 2 + len(text) <= self.line_width:
            return f"{left}  {text}\n"
        return f"{left}\n{self._cut('      ' + text)}\n"  # the summary on its own line, under the option

    def _cut(self, line: str) -> str:
        return line if len(line) <= self.line_width else line[: self.line_width - 1].rstrip() + "…"


class HelpAllAction(argparse.Action):
    """``--help-all``: the full help of every option (Lightning's and jsonargparse's layout)."""

    def __init__(self, option_strings, dest=argparse.SUPPRESS, default=argparse.SUPPRESS, help=None):
        super().__init__(option_strings, dest=dest, default=default, nargs=0,
                         help=help or "show every option, with its full help, and exit")

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        short = parser.formatter_class
        parser.formatter_class = DefaultHelpFormatter
        try:
            parser.print_help()
        finally:
            parser.formatter_class = short
        parser.exit()


def add_help_options(parser) -> None:
    """Give a subcommand's parser ``--help-all`` (its ``--help`` is short when the command's
    parsers use :class:`ShortHelpFormatter`: jsonargparse gives subcommands their parent's)."""
    parser.add_argument("--help-all", action=HelpAllAction)
