"""A³E's learning rate on SmolLM2-135M: a few settings on the first dev-split MAC compositions.

For each ``--settings`` entry (``key=value,...`` over ``editing.a3e``; the rest from ``--config``)
a fresh store is trained with the edits of ``--num-compositions`` MAC (k = 2) compositions of the ``dev`` split
(built without the base-model filter, so no answer is checked against the unedited model); then
each edit's prompt is asked alone with its adapter (oracle routing, 10 tokens) and each composed
query with both (20 tokens). Prints one line per setting: edits produced alone, compositions with
both answers, the final ``L_e`` of each edit, the wall time.

Example (the check behind ``configs/smollm2-135m/a3e.yaml``'s learning rate)::

    python -m blueedit.bench.a3e_lr_check lr=0.1 lr=0.5 lr=0.5,beta=0 lr=0.5,mask=none
"""

from __future__ import annotations

import os
import time
from dataclasses import replace
from pathlib import Path

from blueedit.bench import harness as C


def main(argv: list[str] | None = None) -> None:
    record = C.RunRecord("a3e_lr_check", argv)
    p = C.plain_parser(__doc__.split("\n")[0])
    p.add_argument("settings", nargs="+", help="key=value,... over editing.a3e")
    p.add_argument("--config", default=str(C.REPO / "configs" / "smollm2-135m" / "a3e.yaml"))
    p.add_argument("--num-compositions", type=int, default=3)
    p.add_argument("--out", default=None, help="also write lr_check.md and run.json here (default: print only)")
    args = p.parse_args(argv)

    import torch
    import yaml

    from blueedit.data.compositions import build_mac, load_peak
    from blueedit.evaluation.compositional import all_present, answer_position
    from blueedit.memory.a3e import A3EConfig, A3EEditor
    from blueedit.models.loading import ModelConfig, load_model_and_tokenizer

    torch.set_num_threads(1)
    cfg = yaml.safe_load(Path(args.config).read_text())["model"]
    base, layer = A3EConfig(**cfg["editing"]["a3e"]), int(cfg["editing"]["layers"][0])
    types = {k: type(v) for k, v in base.__dict__.items()}
    settings = []
    for spec in args.settings:  # every setting checked before the model is loaded
        pairs = [x.partition("=") for x in spec.split(",")]
        bad = [k for k, eq, _ in pairs if not eq or k not in types]
        if bad:
            raise SystemExit(f"setting {spec!r}: {bad} are not key=value over editing.a3e ({', '.join(types)})")
        kw = {k: types[k](v) for k, _, v in pairs}
        replace(base, **kw)
        settings.append(kw)
    lm, tok = load_model_and_tokenizer(ModelConfig(**cfg["model"]), os.environ.get("BLUEEDIT_CACHE"))
    comps = build_mac(load_peak(C.default_data_dir()), 2, args.num_compositions, "dev", seed=0)
    lines: list[str] = []
    for spec, kw in zip(args.settings, settings):
        ed = A3EEditor(lm, tok, replace(base, **kw), layer=layer)
        alone = composed = 0
        t0 = time.perf_counter()
        for c in comps:
            ids = ed.edit(list(c.edits))
            alone += sum(answer_position(ed.generate(e.filled_prompt, 10, edits=[i]), a) >= 0
                         for e, i, a in zip(c.edits, ids, c.answers))
            composed += all_present(ed.generate(c.query, 20, edits=ids), c.answers)
        lines.append(f"{spec}: alone {alone} / {2 * len(comps)}, composed {composed} / {len(comps)}, L_e "
                     f"{[round(t.loss_e, 2) for t in ed.traces]}, {time.perf_counter() - t0:.0f} s")
        print(lines[-1], flush=True)
        ed.remove()
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "lr_check.md").write_text("\n".join(lines) + f"\n\nCommand: `{record.command}`\n")
        record.write(out)


if __name__ == "__main__":
    main()
