"""Locate the critical layers ℛ of a model by causal tracing (docs/algorithms.md §12).

Causal tracing as in ROME (Meng et al. 2022, "Locating and Editing Factual Associations in GPT",
https://arxiv.org/abs/2202.05262, §2.1), for any architecture a :class:`ModelAdapter` knows.
For a fact prompt ``x`` whose subject covers tokens ``[b, e)`` and whose answer token is ``o``:

- clean run: ``p_clean = P(o | x)``; every block output ``h^l`` and MLP output ``m^l = W_out^l k^l``
  is recorded (at every position);
- corrupted run: the input embeddings of the subject tokens get Gaussian noise
  ``e_t ← e_t + ε_t``, ``ε_t ~ N(0, (ν σ)² I)``, ``σ`` the standard deviation of the subject-token
  embeddings (all their elements, over the facts traced) and ``ν = 3``; ``p_corrupt = P(o | x̃)``;
- corrupted-with-restoration run, for each layer ``l``: the corrupted run with the clean
  ``h^l`` (kind ``hidden``) or the clean ``m^l`` (kind ``mlp``) written back at the fact token
  ``e - 1`` (the last subject token): ``p_l``.

The indirect effect of layer ``l`` is ``IE_l = p_l − p_corrupt``; averaged over noise samples and
facts it is the average indirect effect (AIE) that ROME plots. The same noise samples are used for
the corrupted run and every restoration of a fact (paired differences, as ROME does).

From the MLP curve, :func:`choose_window` picks ℛ: the window of ``size`` consecutive layers with the
highest mean MLP effect, preferring the earliest window whose mean is within ``tolerance`` of the
best (MEMIT edits the early-middle layers where the MLP effect at the last subject token peaks).
:func:`lambda_for_width` scales λ (``mom2_update_weight``) to the MLP width ``d_k``.
"""

from __future__ import annotations

import inspect
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from blueedit.config import UserInputError
from blueedit.models.adapters import ModelAdapter
from blueedit.models.tokens import _token_at_char, encode_prompt

__all__ = [
    "KnownFact",
    "FactTrace",
    "CausalTracer",
    "LocateResult",
    "load_known_facts",
    "embedding_std",
    "subject_noise",
    "restore_window",
    "mean_effects",
    "choose_window",
    "lambda_for_width",
    "render_config",
]

#: Kinds of state restored, in the order they are reported.
KINDS = ("hidden", "mlp")


@dataclass(frozen=True)
class KnownFact:
    """A fact prompt: ``template`` holds ``{}`` where ``subject`` goes; ``answer`` is the known
    object (``None`` when unknown; the model's own top-1 token is traced either way)."""

    subject: str
    template: str
    answer: str | None = None
    fact_id: Any = None


def load_known_facts(path: str | Path) -> list[KnownFact]:
    """Facts from a ROME ``known_1000.json``-style file (``subject``, ``prompt`` or ``template``,
    ``attribute``) or from edit records in any format :func:`blueedit.data.formats.load_requests`
    reads (the answer is ``target_true``). Raises ``ValueError`` naming the record at fault."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"--records {str(path)!r}: no such file")
    from blueedit.data.formats import read_records

    raw = read_records(path)
    if not raw:
        raise UserInputError(f"--records {str(path)!r} holds no records")
    if isinstance(raw[0], dict) and "attribute" in raw[0] and "subject" in raw[0]:
        facts = []
        for i, rec in enumerate(raw):
            if not isinstance(rec, dict) or not rec.get("subject") or not (rec.get("prompt") or rec.get("template")):
                raise UserInputError(f"{path}: known fact {i} needs 'subject' and 'prompt' (or 'template')")
            subject, prompt = rec["subject"], rec.get("prompt") or ""
            if subject in prompt:
                template = prompt.replace(subject, "{}", 1)
            else:
                template = rec.get("template") or ""
                if "{}" not in template:
                    raise UserInputError(f"{path}: known fact {i} ({subject!r}): the prompt does not contain the "
                                     "subject and the template has no '{}'")
            facts.append(KnownFact(subject, template, rec.get("attribute"), rec.get("known_id", i)))
        return facts
    from blueedit.data.formats import load_requests

    return [KnownFact(r.subject, r.prompt, r.target_true, r.case_id) for r in load_requests(str(path))]


# ------------------------------------------------------------------------------------------
# the tracing math: pure functions


def embedding_std(embeddings: Sequence[torch.Tensor]) -> float:
    """``σ``: the standard deviation of all elements of the subject-token embeddings.

    ``embeddings``: one ``[n_i, d]`` tensor per fact (its subject tokens). ROME's
    ``collect_embedding_std``: the population statistic over every element of every row.
    """
    flat = torch.cat([e.reshape(-1).double() for e in embeddings])
    if flat.numel() < 2:
        raise UserInputError("need at least two embedding elements to measure their standard deviation")
    return float(flat.std(unbiased=False))


def subject_noise(samples: int, n_tokens: int, d: int, std: float, scale: float,
                  generator: torch.Generator | None = None) -> torch.Tensor:
    """``ε``: ``[samples, n_tokens, d]`` Gaussian noise with standard deviation ``scale * std``."""
    return torch.randn(samples, n_tokens, d, generator=generator, dtype=torch.float32) * (scale * std)


def restore_window(layer: int, window: int, num_layers: int) -> list[int]:
    """The layers restored when tracing ``layer`` with a window of ``window`` layers: centred on
    ``layer`` (``window // 2`` before it), clipped to ``0 .. num_layers - 1``. ``window=1``: ``[layer]``."""
    if window < 1:
        raise UserInputError(f"--window must be >= 1, got {window}")
    first = max(0, layer - window // 2)
    last = min(num_layers, layer - (-window // 2))
    return list(range(first, last))


def mean_effects(traces: Sequence[FactTrace], kind: str) -> tuple[list[float], list[float]]:
    """Average indirect effect per layer and its standard error over facts:
    ``AIE_l = mean_i (p_{i,l} − p_{i,corrupt})`` for ``kind`` in :data:`KINDS`."""
    if not traces:
        raise UserInputError("no traced facts")
    ie = torch.stack([torch.tensor(getattr(t, kind), dtype=torch.float64) - t.p_corrupt for t in traces])
    mean = ie.mean(0)
    se = ie.std(0, unbiased=True) / math.sqrt(len(traces)) if len(traces) > 1 else torch.zeros_like(mean)
    return mean.tolist(), se.tolist()


def choose_window(effect: Sequence[float], size: int = 5, tolerance: float = 0.9,
                  max_start_fraction: float = 0.5) -> list[int]:
    """ℛ: ``size`` consecutive layers where the MLP effect peaks early.

    Every window ``[s, s + size)`` with ``s <= max_start_fraction * (L - size)`` (the early part of
    the network: late MLP effects come from the answer being formed, not recalled) is scored by
    its mean effect; the earliest window scoring at least ``tolerance`` × the best score wins.
    With ``size >= L`` every layer is returned.
    """
    L = len(effect)
    if L == 0:
        raise UserInputError("empty effect curve")
    if size < 1:
        raise UserInputError(f"window size must be >= 1, got {size}")
    if size >= L:
        return list(range(L))
    last_start = int(math.floor(max_start_fraction * (L - size)))
    scores = [sum(effect[s : s + size]) / size for s in range(last_start + 1)]
    best = max(scores)
    threshold = best * tolerance if best > 0 else best
    start = next(s for s, v in enumerate(scores) if v >= threshold)
    return list(range(start, start + size))


def lambda_for_width(d_k: int) -> float:
    """λ (``mom2_update_weight``) for an MLP of width ``d_k``: ``d_k`` rounded to two significant
    figures (SmolLM2 1536 → 1500; Gemma 3 270M 2048 → 2000; Llama-3-8B 14336 → 14000, published
    15000; GPT-J 16384 → 16000, published 15000).

    Why proportional: along a new key ``k`` the solve's ``K Kᵀ`` weighs about ``‖k‖² ≈ tr C_0`` and
    ``λ C_0`` about ``λ tr C_0 / d_k`` (its mean eigenvalue), so the balance depends on ``λ / d_k``
    (docs/algorithms.md §12; a rule of thumb, not a measured optimum).
    """
    if d_k < 1:
        raise UserInputError(f"MLP width must be positive, got {d_k}")
    digits = int(math.floor(math.log10(d_k))) - 1
    return float(round(d_k, -digits)) if digits > 0 else float(d_k)


# ------------------------------------------------------------------------------------------
# tracing a model


@dataclass
class FactTrace:
    """The traced probabilities of one fact: ``hidden[l]`` / ``mlp[l]`` are ``p_l`` averaged over
    the noise samples; ``answer_id`` the traced token (the clean run's top-1)."""

    fact_id: Any
    subject: str
    prompt: str
    answer_id: int
    answer: str
    known: bool
    p_clean: float
    p_corrupt: float
    hidden: list[float]
    mlp: list[float]
    subject_tokens: tuple[int, int]

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def _hidden(out):
    return out[0] if isinstance(out, tuple) else out


def _replace_hidden(out, hidden):
    return (hidden,) + tuple(out[1:]) if isinstance(out, tuple) else hidden


class CausalTracer:
    """Runs the clean, corrupted and restored passes of :mod:`blueedit.locate` on one model.

    Args:
        model, adapter, tokenizer: the causal LM, its :class:`ModelAdapter` and tokenizer.
        noise_std: ``σ`` (see :func:`embedding_std`; :meth:`measure_std` measures it).
        noise_scale: ``ν``, the multiple of ``σ`` (ROME: 3).
        samples: noise samples per fact (ROME: 10).
        window: layers restored around each traced layer (ROME: 10 for GPT-2 XL; 1 here by default).
        seed: the noise of fact ``i`` is drawn from a generator seeded with ``seed + i``.
        max_rows: sequences per forward pass (the restored runs of all layers are batched).
    """

    def __init__(self, model, adapter: ModelAdapter, tokenizer, *, noise_std: float | None = None,
                 noise_scale: float = 3.0, samples: int = 3, window: int = 1, seed: int = 0,
                 max_rows: int = 256) -> None:
        if samples < 1:
            raise UserInputError(f"--samples must be >= 1, got {samples}")
        if noise_scale < 0:
            raise UserInputError(f"--noise-scale must be >= 0, got {noise_scale}")
        restore_window(0, window, 1)  # validates the window
        self.model, self.adapter, self.tokenizer = model, adapter, tokenizer
        self.noise_std, self.noise_scale, self.samples = noise_std, noise_scale, samples
        self.window, self.seed, self.max_rows = window, seed, max(1, max_rows)
        self.embed = model.get_input_embeddings()
        self.device = next(model.parameters()).device
        self._keep = "logits_to_keep" in inspect.signature(model.forward).parameters

    @property
    def num_layers(self) -> int:
        return self.adapter.num_layers

    def encode(self, fact: KnownFact) -> tuple[list[int], int, int]:
        """Token ids of the filled prompt and the subject's token span ``[b, e)``; the fact token
        is ``e - 1``. Raises ``ValueError`` when the subject has no token of its own."""
        ids, last = encode_prompt(self.tokenizer, fact.template, fact.subject)
        start = fact.template.index("{}")
        text = fact.template[:start] + fact.subject + fact.template[start + 2:]
        _, first = _token_at_char(self.tokenizer, text, start)
        if last < 0 or first < 0 or first > last:
            raise UserInputError(f"fact {fact.fact_id!r}: cannot find the subject {fact.subject!r} in its tokens")
        return ids, first, last + 1

    @torch.no_grad()
    def subject_embeddings(self, fact: KnownFact) -> torch.Tensor:
        """The input-embedding module's output at the subject tokens: ``[n, d]``."""
        ids, b, e = self.encode(fact)
        emb = self.embed(torch.tensor([ids], device=self.device))
        return emb[0, b:e].float().cpu()

    def measure_std(self, facts: Sequence[KnownFact]) -> float:
        """Set and return ``σ`` over the subject tokens of ``facts``."""
        self.noise_std = embedding_std([self.subject_embeddings(f) for f in facts])
        return self.noise_std

    def _last_logits(self, ids: torch.Tensor) -> torch.Tensor:
        """Logits at the last position of each row: ``[R, V]`` float32."""
        if self._keep:
            out = self.model(input_ids=ids, use_cache=False, logits_to_keep=1).logits
        else:
            out = self.model(input_ids=ids, use_cache=False).logits
        return out[:, -1].float()

    @torch.no_grad()
    def clean_run(self, ids: list[int]) -> tuple[torch.Tensor, dict[int, torch.Tensor], dict[int, torch.Tensor]]:
        """Clean probabilities ``[V]`` and every block output and MLP output ``[T, d]``."""
        hidden: dict[int, torch.Tensor] = {}
        mlp: dict[int, torch.Tensor] = {}
        handles = []
        for l in range(self.num_layers):
            handles.append(self.adapter.block(l).register_forward_hook(
                lambda m, a, out, l=l: hidden.__setitem__(l, _hidden(out)[0].detach().clone())))
            handles.append(self.adapter.w_out_module(l).register_forward_hook(
                lambda m, a, out, l=l: mlp.__setitem__(l, out[0].detach().clone())))
        try:
            logits = self._last_logits(torch.tensor([ids], device=self.device))
        finally:
            for h in handles:
                h.remove()
        return logits[0].softmax(-1), hidden, mlp

    @torch.no_grad()
    def patched_probs(self, ids: list[int], span: tuple[int, int], noise: torch.Tensor, answer_id: int,
                      rows: Sequence[tuple[str | None, Sequence[int]]],
                      clean_hidden: dict[int, torch.Tensor], clean_mlp: dict[int, torch.Tensor]) -> torch.Tensor:
        """``P(answer)`` for every row: row ``r = (kind, layers)`` is the corrupted run with
        ``noise[r]`` (``[n_subject, d]``) added to the subject embeddings and the clean ``kind``
        state (``hidden``/``mlp``, ``None``: nothing) written back at the fact token at ``layers``."""
        b, e = span
        fact = e - 1
        out = torch.empty(len(rows))
        for start in range(0, len(rows), self.max_rows):
            chunk = rows[start:start + self.max_rows]
            eps = noise[start:start + len(chunk)].to(self.device)
            restore = {kind: {} for kind in KINDS}
            for r, (kind, layers) in enumerate(chunk):
                for l in layers if kind else ():
                    restore[kind].setdefault(l, []).append(r)
            handles = []

            def add_noise(module, args, output, eps=eps):
                x = output.clone()
                x[:, b:e] = x[:, b:e] + eps.to(x.dtype)
                return x

            def put_hidden(l, rws):
                def hook(module, args, output):
                    h = _hidden(output).clone()
                    h[rws, fact] = clean_hidden[l][fact].to(h.dtype)
                    return _replace_hidden(output, h)
                return hook

            def put_mlp(l, rws):
                def hook(module, args, output):
                    m = output.clone()
                    m[rws, fact] = clean_mlp[l][fact].to(m.dtype)
                    return m
                return hook

            handles.append(self.embed.register_forward_hook(add_noise))
            for l, rws in restore["hidden"].items():
                handles.append(self.adapter.block(l).register_forward_hook(put_hidden(l, rws)))
            for l, rws in restore["mlp"].items():
                handles.append(self.adapter.w_out_module(l).register_forward_hook(put_mlp(l, rws)))
            try:
                ids_t = torch.tensor([ids] * len(chunk), device=self.device)
                probs = self._last_logits(ids_t).softmax(-1)[:, answer_id]
            finally:
                for h in handles:
                    h.remove()
            out[start:start + len(chunk)] = probs.cpu()
        return out

    def trace(self, fact: KnownFact, index: int = 0) -> FactTrace:
        """Trace one fact: ``p_clean``, ``p_corrupt`` and ``p_l`` of each kind and layer."""
        if self.noise_std is None:
            raise UserInputError("the noise standard deviation is not set: call measure_std first")
        ids, b, e = self.encode(fact)
        probs, clean_hidden, clean_mlp = self.clean_run(ids)
        answer_id = int(probs.argmax())
        answer = self.tokenizer.decode([answer_id])
        known = bool(fact.answer) and self._first_token(fact.answer) == answer_id
        gen = torch.Generator().manual_seed(self.seed + index)
        d = self.embed.weight.shape[-1]
        S, L = self.samples, self.num_layers
        eps = subject_noise(S, e - b, d, self.noise_std, self.noise_scale, gen)
        rows: list[tuple[str | None, list[int]]] = [(None, [])] * S
        for kind in KINDS:
            for l in range(L):
                rows += [(kind, restore_window(l, self.window, L))] * S
        noise = eps.repeat(len(rows) // S, 1, 1)
        p = self.patched_probs(ids, (b, e), noise, answer_id, rows, clean_hidden, clean_mlp)
        p = p.view(-1, S).double().mean(1)  # [1 + 2L]
        return FactTrace(
            fact_id=fact.fact_id, subject=fact.subject, prompt=fact.template.replace("{}", fact.subject, 1),
            answer_id=answer_id, answer=answer, known=known, p_clean=float(probs[answer_id]),
            p_corrupt=float(p[0]), hidden=p[1:1 + L].tolist(), mlp=p[1 + L:].tolist(), subject_tokens=(b, e),
        )

    def _first_token(self, answer: str) -> int | None:
        from blueedit.models.tokens import tokenize_target

        try:
            return tokenize_target(self.tokenizer, answer)[0]
        except ValueError:
            return None


# ------------------------------------------------------------------------------------------
# the result and the recommended config


@dataclass
class LocateResult:
    """What ``blueedit locate`` found: the mean effects per layer, ℛ, the loss layer and λ."""

    model: str
    num_layers: int
    mlp_width: int
    traces: list[FactTrace]
    noise_std: float
    noise_scale: float
    samples: int
    window: int
    layers: list[int] = field(default_factory=list)
    loss_layer: int = -1
    mom2_update_weight: float = 0.0
    seconds: float = 0.0
    cpu_seconds: float = 0.0
    random_weights: bool = False

    def effects(self, kind: str) -> tuple[list[float], list[float]]:
        return mean_effects(self.traces, kind)

    def rows(self) -> list[dict[str, Any]]:
        """One row per layer: the AIE of each kind with its standard error."""
        h, hse = self.effects("hidden")
        m, mse = self.effects("mlp")
        return [{"layer": l, "aie_hidden": h[l], "se_hidden": hse[l], "aie_mlp": m[l], "se_mlp": mse[l]}
                for l in range(self.num_layers)]

    def summary(self) -> dict[str, Any]:
        n = len(self.traces)
        return {
            "model": self.model, "num_layers": self.num_layers, "mlp_width": self.mlp_width,
            "facts": n, "known_facts": sum(t.known for t in self.traces),
            "p_clean": sum(t.p_clean for t in self.traces) / n,
            "p_corrupt": sum(t.p_corrupt for t in self.traces) / n,
            "noise_std": self.noise_std, "noise_scale": self.noise_scale, "samples": self.samples,
            "window": self.window, "layers": self.layers, "loss_layer": self.loss_layer,
            "mom2_update_weight": self.mom2_update_weight, "seconds": round(self.seconds, 1),
            "cpu_seconds": round(self.cpu_seconds, 1), "random_weights": self.random_weights,
        }


def write_csv(result: LocateResult, path: Path) -> Path:
    import csv

    rows = result.rows()
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        for r in rows:
            w.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in r.items()})
    return path


def plot(result: LocateResult, path: Path) -> Path | None:
    """The AIE per layer of both kinds, ℛ shaded; ``None`` when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    layers = list(range(result.num_layers))
    fig, ax = plt.subplots(figsize=(7, 3.6))
    for kind, color in (("hidden", "tab:purple"), ("mlp", "tab:green")):
        mean, se = result.effects(kind)
        ax.plot(layers, mean, marker="o", ms=3, color=color, label=f"{kind} state restored")
        ax.fill_between(layers, [m - s for m, s in zip(mean, se)], [m + s for m, s in zip(mean, se)],
                        color=color, alpha=0.2)
    if result.layers:
        ax.axvspan(result.layers[0] - 0.5, result.layers[-1] + 0.5, color="tab:orange", alpha=0.15,
                   label=f"ℛ = {result.layers[0]}–{result.layers[-1]}")
    s = result.summary()
    tag = " (random weights)" if result.random_weights else ""
    ax.set_title(f"{result.model}{tag}: causal trace at the last subject token, {s['facts']} facts", fontsize=9)
    ax.set_xlabel("layer")
    ax.set_ylabel("average indirect effect on P(answer)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


#: the methods ``render_config`` writes configs for
CONFIG_METHODS = ("memit", "alphaedit")


def render_config(result: LocateResult, *, name_or_path: str, method: str = "memit", blue: bool = False,
                  dtype: str = "float32", header: Sequence[str] = (), paper: bool = False,
                  v_lr: float | None = None, chat_template: bool = False) -> str:
    """A complete ``blueedit fit`` config (YAML text) with ℛ, the loss layer and λ of ``result``.

    ``paper=False``: a quick run (20 CounterFact edits in rounds of 10, ``C_0`` from the packaged
    Wikipedia sample); ``paper=True``: the papers' setting (2,000 edits, 100 per round, ``C_0``
    from 100,000 Wikipedia samples from the hub), as the other large-model configs.
    """
    if method not in CONFIG_METHODS:
        raise UserInputError(f"--method {method!r}: locate writes configs for 'memit' or 'alphaedit'")
    strategy = "boundary" if blue else "distribute"
    tag = f"{method}_blue" if blue else method
    lr = v_lr if v_lr is not None else 0.5
    lines = [f"# {h}" for h in header]
    lines.append("# Run: blueedit fit --config <this file>")
    lines += [
        "trainer:", "  accelerator: auto", "  devices: 1",
        f"  default_root_dir: runs/{Path(name_or_path).name or 'model'}/{tag}",
        "model:", "  model:", f"    name_or_path: {name_or_path}", f"    dtype: {dtype}",
        f"    chat_template: {'true' if chat_template else 'false'}  # true: prompts in the model's chat template",
        "  editing:", f"    method: {method}", f"    strategy: {strategy}",
        f"    layers: [{', '.join(str(l) for l in result.layers)}]",
        f"    mom2_update_weight: {result.mom2_update_weight:g}  # λ = d_k ({result.mlp_width}) to 2 significant figures",
    ]
    from blueedit.editing.editor import EditingConfig
    from blueedit.methods.registry import get_method

    defaults = EditingConfig(method=method, strategy=strategy, layers=list(result.layers))
    lines += [f"    {k}: {v:g}" for k, v in get_method(method).config_settings(defaults).items()]
    lines += [
        "    target:", "      v_num_grad_steps: 25", f"      v_lr: {lr:g}", "      v_weight_decay: 0.5",
        "      kl_factor: 0.0625", "      clamp_norm_factor: 0.75", f"      loss_layer: {result.loss_layer}",
        "  stats:",
    ]
    if paper:
        lines += ["    corpus: hub:wikipedia", "    num_samples: 100000"]
    else:
        lines += ["    corpus: wikipedia-sample", "    num_samples: 300"]
    lines += ["    max_length: 256", "    batch_size: 8", "    dtype: float32", "  evaluate: true",
              "  eval_batch_size: 32", "data:", "  dataset: counterfact"]
    lines += ["  num_edits: 2000", "  edits_per_round: 100"] if paper else ["  num_edits: 20", "  edits_per_round: 10"]
    return "\n".join(lines) + "\n"


def save_result(result: LocateResult, out_dir: Path) -> dict[str, Path]:
    """Write ``trace.csv``, ``trace.png`` (when matplotlib is installed), ``facts.jsonl`` and
    ``summary.json`` under ``out_dir``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"csv": write_csv(result, out_dir / "trace.csv")}
    png = plot(result, out_dir / "trace.png")
    if png is not None:
        paths["png"] = png
    with open(out_dir / "facts.jsonl", "w") as f:
        for t in result.traces:
            f.write(json.dumps(t.to_dict(), default=str) + "\n")
    paths["facts"] = out_dir / "facts.jsonl"
    (out_dir / "summary.json").write_text(json.dumps(result.summary(), indent=1) + "\n")
    paths["summary"] = out_dir / "summary.json"
    return paths


# ------------------------------------------------------------------------------------------
# the command


def locate(model, adapter: ModelAdapter, tokenizer, facts: Sequence[KnownFact], *, name: str, num_facts: int = 100,
           known_only: bool = True, samples: int = 3, noise_scale: float = 3.0, window: int = 1,
           window_size: int = 5, seed: int = 0, max_rows: int = 256, random_weights: bool = False,
           progress=None) -> LocateResult:
    """Trace up to ``num_facts`` of ``facts`` (with ``known_only``, only those whose clean top-1
    token is the first token of their answer) and recommend ℛ, the loss layer and λ."""
    import time

    t0, c0 = time.perf_counter(), time.process_time()
    if num_facts < 1:
        raise UserInputError(f"--num-facts must be >= 1, got {num_facts}")
    if window_size < 1 or window_size > adapter.num_layers:
        raise UserInputError(f"--window-size {window_size}: the model has {adapter.num_layers} layers")
    tracer = CausalTracer(model, adapter, tokenizer, noise_scale=noise_scale, samples=samples, window=window,
                          seed=seed, max_rows=max_rows)
    usable = []
    for f in facts:
        try:
            tracer.encode(f)
        except ValueError:
            continue
        usable.append(f)
    if not usable:
        raise UserInputError("no fact has a subject that can be found in its tokens")
    tracer.measure_std(usable[:1000])
    traces: list[FactTrace] = []
    for i, f in enumerate(usable):
        if len(traces) >= num_facts:
            break
        if known_only:
            ids, _, _ = tracer.encode(f)
            with torch.no_grad():
                top = int(tracer._last_logits(torch.tensor([ids], device=tracer.device))[0].argmax())
            if not f.answer or tracer._first_token(f.answer) != top:
                continue
        traces.append(tracer.trace(f, index=i))
        if progress is not None:
            progress(len(traces), traces[-1])
    if not traces:
        raise UserInputError("none of the facts is known to the model (its top-1 token is not the answer's first "
                         "token); pass --all-facts to trace the model's own predictions")
    L = adapter.num_layers
    result = LocateResult(model=name, num_layers=L, mlp_width=adapter.key_size(0), traces=traces,
                          noise_std=float(tracer.noise_std), noise_scale=noise_scale, samples=samples,
                          window=window, random_weights=random_weights)
    result.layers = choose_window(result.effects("mlp")[0], size=window_size)
    result.loss_layer = L - 1
    result.mom2_update_weight = lambda_for_width(result.mlp_width)
    result.seconds, result.cpu_seconds = time.perf_counter() - t0, time.process_time() - c0
    return result


def format_table(result: LocateResult) -> str:
    """The per-layer AIE as a plain-text table, ℛ marked."""
    lines = ["layer  AIE(hidden)  AIE(mlp)", "-----  -----------  --------"]
    for r in result.rows():
        mark = "  <- ℛ" if r["layer"] in result.layers else ""
        lines.append(f"{r['layer']:5d}  {r['aie_hidden']:11.4f}  {r['aie_mlp']:8.4f}{mark}")
    return "\n".join(lines)


def build_parser():
    import argparse

    p = argparse.ArgumentParser(
        prog="blueedit locate",
        description="Find a model's critical MLP layers by causal tracing (ROME) and write a ready config.")
    p.add_argument("--model", default="smollm2-135m", help="hub id, local directory, .gguf or packaged alias")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--records", default=None,
                   help="facts to trace: a known_1000.json-style file or edit records "
                        "(default: <data dir>/rome_eval/known_1000.json)")
    p.add_argument("--num-facts", type=int, default=100)
    p.add_argument("--all-facts", action="store_true",
                   help="trace every fact, not only those the model knows (its top-1 token is traced)")
    p.add_argument("--samples", type=int, default=3, help="noise samples per fact (ROME: 10)")
    p.add_argument("--noise-scale", type=float, default=3.0, help="noise std as a multiple of the embeddings' std")
    p.add_argument("--window", type=int, default=1, help="layers restored around each traced layer (ROME: 10)")
    p.add_argument("--window-size", type=int, default=5, help="|ℛ|: consecutive layers recommended")
    p.add_argument("--chat-template", action="store_true",
                   help="trace the prompts in the tokenizer's chat template (and write model.chat_template: true)")
    p.add_argument("--method", default="memit", choices=list(CONFIG_METHODS), help="method of the written config")
    p.add_argument("--blue", action="store_true", help="write the config with BLUE (strategy: boundary)")
    p.add_argument("--out", default="locate", help="directory for trace.csv, trace.png, summary.json and the config")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-rows", type=int, default=256, help="sequences per forward pass")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--cache-dir", default=None)
    p.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    return p


def main(argv: Sequence[str] | None = None) -> LocateResult:
    """``blueedit locate``: trace, print, plot, recommend, write the config."""
    import os

    args = build_parser().parse_args(argv)
    for name in ("num_facts", "samples", "window", "window_size", "max_rows"):
        if getattr(args, name) < 1:
            raise UserInputError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.records:
        records = Path(args.records)
    else:
        data_dir = args.data_dir or os.environ.get("BLUEEDIT_DATA_DIR")
        if not data_dir:
            raise FileNotFoundError("no facts to trace: pass --records FILE, or --data-dir (or BLUEEDIT_DATA_DIR) "
                                    "holding rome_eval/known_1000.json")
        records = Path(data_dir) / "rome_eval" / "known_1000.json"
    facts = load_known_facts(records)
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise UserInputError(f"--out {args.out!r} is a file")

    from blueedit.models.loading import ModelConfig, default_cache_dir, load_model_and_tokenizer

    spec = ModelConfig(name_or_path=args.model, dtype=args.dtype)
    model, tokenizer = load_model_and_tokenizer(spec, Path(args.cache_dir).expanduser() if args.cache_dir
                                                else default_cache_dir())
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    model.to(device).eval()
    adapter = ModelAdapter(model)
    if args.chat_template:
        from dataclasses import replace

        from blueedit.models.chat import chat_wrap

        facts = [replace(f, template=chat_wrap(tokenizer, f.template)) for f in facts]
    if args.window_size > adapter.num_layers:
        raise UserInputError(f"--window-size {args.window_size}: the model has {adapter.num_layers} layers")
    print(f"tracing up to {args.num_facts} {'' if args.all_facts else 'known '}facts of {records} "
          f"on {args.model} ({adapter.num_layers} layers, {args.samples} noise samples each)", flush=True)

    def progress(n, trace):
        if n == 1 or n % 10 == 0:
            print(f"  {n} facts traced (last: {trace.prompt!r} -> {trace.answer!r}, "
                  f"p_clean {trace.p_clean:.3f}, p_corrupt {trace.p_corrupt:.3f})", flush=True)

    result = locate(model, adapter, tokenizer, facts, name=args.model, num_facts=args.num_facts,
                    known_only=not args.all_facts, samples=args.samples, noise_scale=args.noise_scale,
                    window=args.window, window_size=args.window_size, seed=args.seed, max_rows=args.max_rows,
                    progress=progress)
    paths = save_result(result, out)
    s = result.summary()
    tag = f"{args.method}_blue" if args.blue else args.method
    config = out / f"{tag}.yaml"
    config.write_text(render_config(
        result, name_or_path=args.model, method=args.method, blue=args.blue, dtype=args.dtype,
        chat_template=args.chat_template,
        header=[f"{args.model}, {tag}: written by blueedit locate ({s['facts']} facts, {args.samples} noise "
                f"samples, noise {args.noise_scale:g}σ, window {args.window})",
                f"layers: the {args.window_size} consecutive layers where the MLP indirect effect peaks early; "
                f"loss layer: the last block"]))
    print(format_table(result))
    print(f"facts traced: {s['facts']} (known: {s['known_facts']}); mean p_clean {s['p_clean']:.3f}, "
          f"p_corrupt {s['p_corrupt']:.3f}; σ = {s['noise_std']:.4g}")
    print(f"recommended: editing.layers {result.layers}, target.loss_layer {result.loss_layer}, "
          f"mom2_update_weight {result.mom2_update_weight:g} (λ = d_k {result.mlp_width} to 2 significant figures)")
    print(f"took {s['seconds']} s wall, {s['cpu_seconds']} s CPU")
    if "png" not in paths:
        print("matplotlib is not installed: no plot; the curve is in trace.csv")
    print("wrote " + ", ".join(str(p) for p in [*paths.values(), config]))
    return result
