"""``python -m blueedit.bench NAME [OPTIONS]`` or ``blueedit bench NAME [OPTIONS]``: run benchmark
NAME (without NAME: list them)."""

from __future__ import annotations

import importlib
import sys

from blueedit.bench import BENCHMARKS


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: blueedit bench NAME [OPTIONS], or python -m blueedit.bench.NAME [OPTIONS]"
              "   (NAME --help for its options)\n\nbenchmarks:")
        for name, what in BENCHMARKS.items():
            print(f"  {name:15s} {what}")
        return
    name, rest = argv[0], argv[1:]
    if name not in BENCHMARKS:
        raise SystemExit(f"unknown benchmark {name!r}; one of: {', '.join(BENCHMARKS)}")
    importlib.import_module(f"blueedit.bench.{name}").main(rest)


if __name__ == "__main__":
    main()
