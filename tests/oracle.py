"""An independent oracle for one editing round, written from the equations of ``docs/algorithms.md``.

It shares nothing with ``blueedit.editing`` or ``blueedit.evaluation``: only the Hugging Face model
and its tokenizer. It is deliberately plain and slow: every prompt is run alone (no padding, no
caches, no batching), every step on the whole prompt, with forward hooks to read and write hidden
states. Linear algebra runs in float64 with straightforward dense formulas.

One round (``Oracle.edit_round``), for one method (``memit``, ``alphaedit``, ``prune``, ``rect``)
and one strategy (``distribute`` or BLUE's ``boundary``):

* fact token: the token of the filled prompt that holds the subject's last character;
* targets ``z^l = h_init + δ``: δ added to block ``l``'s output at the fact token of every rewriting
  prompt (each context template applied to the prompt, followed by the target tokens but the last)
  and of the KL prompt; loss = mean over rewriting prompts of the mean-token NLL of the target
  (log-probs read at ``loss_layer`` through the final norm and ``lm_head``)
  + ``kl_factor`` · KL(P_δ ‖ P_init) at the KL prompt's fact token (next-token distribution of the
  model, i.e. its final logits) + ``v_weight_decay`` · ‖δ‖ / ‖h_init‖²; Adam; iteration ``it`` of
  ``v_num_grad_steps`` computes the loss and stops when it is below ``early_stop_loss`` or when
  ``it`` is the last one, else takes one Adam step and clamps ‖δ‖ ≤ ``clamp_norm_factor``·‖h_init‖;
* keys ``k = ½·k("{}") + ½·mean(k(other templates))`` (input of ``W_out`` at the fact token);
* ``distribute``: ``z`` at ``l_m`` once; for the i-th layer: ``R = (z − h^{l_m}) / (m − i)``, solve,
  write; ``boundary``: for ``l`` in (``l_1``, ``l_m``): ``z^l`` on the current model, ``R = z^l − h^l``;
* MEMIT ``ΔW = R Kᵀ (λ C_0 + H + K Kᵀ)^{-1}``; AlphaEdit ``ΔWᵀ = (P (H + K Kᵀ) + α I)^{-1} P K Rᵀ``;
  RECT: full updates of every layer written in order, then the round is restored and each layer
  gets only the top ``rect_keep`` entries of its ΔW ranked by ``|ΔW| / (|W| + 1e-8)``;
  PRUNE (after the rounds): singular values ``s > σ_max(W_0)`` of ``W − W_0`` become
  ``log s − log σ + σ``, added to ``W_0``;
* afterwards ``H += K Kᵀ`` with keys read on the edited model.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

#: Where the parts of the two architectures the tests use live (``transposed``: ``Conv1D`` stores
#: ``W_out`` as ``[d_k, d]``).
LAYOUTS = {
    "gpt2": dict(blocks="transformer.h", w_out="mlp.c_proj", norm="transformer.ln_f", head="lm_head",
                 transposed=True),
    "llama": dict(blocks="model.layers", w_out="mlp.down_proj", norm="model.norm", head="lm_head",
                  transposed=False),
}


@dataclass
class OracleHParams:
    method: str = "memit"
    strategy: str = "distribute"
    layers: list = field(default_factory=lambda: [1, 2, 3])
    lam: float = 1.0  # mom2_update_weight
    nullspace_threshold: float = 2e-2
    alpha: float = 10.0  # AlphaEdit's L2
    rect_keep: float = 0.4
    v_num_grad_steps: int = 5
    v_lr: float = 0.5
    v_weight_decay: float = 0.5
    kl_factor: float = 0.0625
    clamp_norm_factor: float = 0.75
    early_stop_loss: float = 0.05
    loss_layer: int | None = None
    kl_prompt: str = "{} is a"
    use_history: bool = True  # False: MEMIT/PRUNE/RECT solve with λ C_0 + K Kᵀ only (published plain MEMIT)
    prune_base: str = "original"  # "current": W + restrain(W − W_0) (published BLUE code)
    # Deliberately wrong variants, used only to show that a test can tell them apart:
    kl_edited_first: bool = True  # False: KL(P_init ‖ P_δ)
    rect_full_first: bool = True  # False: sparsify each layer's update before the next is computed
    key_weights: str = "half"  # "uniform": k = mean over all templates


@dataclass
class OracleTarget:
    z: torch.Tensor  # [d]
    h_init: torch.Tensor
    delta: torch.Tensor
    updates: int  # Adam steps taken
    loss: float  # the last loss computed


@dataclass
class OracleStep:
    layer: int
    target_layer: int
    residuals: torch.Tensor  # [d, B] float64
    keys: torch.Tensor  # [d_k, B] float64
    delta: torch.Tensor  # [d, d_k] float64, the update written (RECT: the full one of the first pass)


@dataclass
class OracleRound:
    targets: dict  # layer -> list[OracleTarget]
    steps: list  # OracleStep in write order
    written: dict  # layer -> the ΔW finally added in this round (RECT: sparsified)
    history: dict  # layer -> H after the round


# -- model access -----------------------------------------------------------------------------------
class Model:
    def __init__(self, model, tokenizer):
        self.model, self.tok = model, tokenizer
        self.layout = LAYOUTS[model.config.model_type]
        self.blocks = model.get_submodule(self.layout["blocks"])
        self.norm = model.get_submodule(self.layout["norm"])
        self.head = model.get_submodule(self.layout["head"])

    @property
    def num_layers(self) -> int:
        return len(self.blocks)

    def w_out(self, l: int) -> torch.nn.Module:
        return self.blocks[l].get_submodule(self.layout["w_out"])

    def get_W(self, l: int) -> torch.Tensor:
        w = self.w_out(l).weight.detach().clone()
        return w.T.contiguous() if self.layout["transposed"] else w

    def set_W(self, l: int, W: torch.Tensor) -> None:
        p = self.w_out(l).weight
        with torch.no_grad():
            p.copy_((W.T if self.layout["transposed"] else W).to(p.dtype))

    def add_W(self, l: int, delta: torch.Tensor) -> None:
        self.set_W(l, self.get_W(l).double() + delta.double())

    # -- tokenization --------------------------------------------------------------------------
    def encode(self, template: str, subject: str) -> tuple[list[int], int]:
        """Ids of ``template`` with ``subject`` in its slot, and the fact token: the first token whose
        decoded prefix of the sequence reaches the subject's last character."""
        start = template.index("{}")
        text = template[:start] + subject + template[start + 2:]
        ids = list(self.tok(text)["input_ids"])
        end = start + len(subject)
        for t in range(len(ids)):
            decoded = self.tok.decode(ids[: t + 1], skip_special_tokens=True, clean_up_tokenization_spaces=False)
            if len(decoded) >= end:
                assert decoded[:end] == text[:end], (decoded, text)
                return ids, t
        raise AssertionError(f"subject {subject!r} not found in {text!r}")

    def target_ids(self, target: str) -> list[int]:
        ids = list(self.tok(" " + target.lstrip(" "), add_special_tokens=False)["input_ids"])
        if ids and ids[0] == self.tok.bos_token_id:
            ids = ids[1:]
        return ids

    # -- one forward pass on one sequence ---------------------------------------------------------
    def run(self, ids: list[int], add: tuple | None = None, hidden=(), keys=()):
        """Logits ``[T, V]`` of one unpadded sequence; ``add = (layer, position, δ)`` adds δ to block
        ``layer``'s output there; returns ``(logits, {l: block output [T, d]}, {l: W_out input [T, d_k]})``."""
        out_h, out_k, handles = {}, {}, []

        def block_hook(l):
            def hook(module, args, output):
                h = output[0] if isinstance(output, tuple) else output
                if add is not None and add[0] == l:
                    onehot = torch.zeros(h.shape[1], 1, dtype=h.dtype)
                    onehot[add[1]] = 1
                    h = h + onehot * add[2].to(h.dtype)  # [1, T, d] + [T, 1]·[d]
                out_h[l] = h[0]
                return (h,) + tuple(output[1:]) if isinstance(output, tuple) else h
            return hook

        def key_hook(l):
            def hook(module, args):
                out_k[l] = args[0][0]
            return hook

        layers = set(hidden) | ({add[0]} if add is not None else set())
        for l in layers:
            handles.append(self.blocks[l].register_forward_hook(block_hook(l)))
        for l in set(keys):
            handles.append(self.w_out(l).register_forward_pre_hook(key_hook(l)))
        try:
            logits = self.model(input_ids=torch.tensor([ids])).logits[0]
        finally:
            for h in handles:
                h.remove()
        return logits, out_h, out_k

    def logprobs_at_layer(self, h: torch.Tensor) -> torch.Tensor:
        return torch.log_softmax(self.head(self.norm(h)).float(), dim=-1)


class _NoParamGrads:
    def __init__(self, model):
        self.params = list(model.parameters())

    def __enter__(self):
        self.before = [p.requires_grad for p in self.params]
        for p in self.params:
            p.requires_grad_(False)

    def __exit__(self, *exc):
        for p, r in zip(self.params, self.before):
            p.requires_grad_(r)


# -- the oracle ----------------------------------------------------------------------------------------
class Oracle:
    """One editing round of :class:`OracleHParams` on ``model`` (edited in place).

    ``requests`` are objects with ``prompt`` (one ``{}``), ``subject`` and ``target_new``;
    ``templates`` the context templates (must contain the bare ``"{}"``); ``mom2[l]`` ``C_0^l``.
    """

    def __init__(self, model, tokenizer, hp: OracleHParams, mom2: dict, templates: list[str],
                 history: dict | None = None, original: dict | None = None):
        assert "{}" in templates
        self.m = Model(model, tokenizer)
        self.hp, self.templates = hp, list(templates)
        self.mom2 = {l: c.double() for l, c in mom2.items()}
        self.edited = [hp.layers[0], hp.layers[-1]] if hp.strategy == "boundary" else list(hp.layers)
        if hp.strategy == "boundary" and hp.layers[0] == hp.layers[-1]:
            self.edited = [hp.layers[0]]
        dk = {l: self.m.get_W(l).shape[1] for l in self.edited}
        self.history = history or {l: torch.zeros(dk[l], dk[l], dtype=torch.float64) for l in self.edited}
        self.original = original or {l: self.m.get_W(l).double() for l in self.edited}

    # -- section 2 --------------------------------------------------------------------------------
    def target(self, req, layer: int) -> OracleTarget:
        hp, m = self.hp, self.m
        loss_layer = m.num_layers - 1 if hp.loss_layer is None else hp.loss_layer
        loss_layer = max(loss_layer, layer)
        target = m.target_ids(req.target_new)
        rewriting = []  # (ids, fact, prompt length)
        for c in self.templates:
            ids, fact = m.encode(c.replace("{}", req.prompt, 1), req.subject)
            rewriting.append((ids + target[:-1], fact, len(ids)))
        kl_ids, kl_fact = m.encode(hp.kl_prompt, req.subject)
        bare_ids, bare_fact = m.encode(req.prompt, req.subject)
        with torch.no_grad():
            _, hs, _ = m.run(bare_ids, hidden=[layer])
        h_init = hs[layer][bare_fact].detach().float()
        with torch.no_grad():
            logits, _, _ = m.run(kl_ids)
        p_init = torch.log_softmax(logits[kl_fact].float(), dim=-1)  # log P_init, δ = 0

        delta = torch.zeros_like(h_init, requires_grad=True)
        opt = torch.optim.Adam([delta], lr=hp.v_lr)
        updates, loss_value = 0, float("nan")
        with _NoParamGrads(m.model):
            for it in range(hp.v_num_grad_steps):
                nlls = []
                for ids, fact, plen in rewriting:
                    _, hs, _ = m.run(ids, add=(layer, fact, delta), hidden=[loss_layer])
                    logp = m.logprobs_at_layer(hs[loss_layer])  # [T, V]
                    tok_logp = [logp[plen - 1 + j, t] for j, t in enumerate(target)]
                    nlls.append(-torch.stack(tok_logp).sum() / len(target))
                nll = torch.stack(nlls).mean()
                logits, _, _ = m.run(kl_ids, add=(layer, kl_fact, delta))
                p_delta = torch.log_softmax(logits[kl_fact].float(), dim=-1)
                if hp.kl_edited_first:
                    kl = (p_delta.exp() * (p_delta - p_init)).sum()  # KL(P_δ ‖ P_init)
                else:
                    kl = (p_init.exp() * (p_init - p_delta)).sum()
                wd = hp.v_weight_decay * delta.norm() / h_init.norm() ** 2
                loss = nll + hp.kl_factor * kl + wd
                loss_value = float(loss.detach())
                if loss_value < hp.early_stop_loss or it == hp.v_num_grad_steps - 1:
                    break
                opt.zero_grad()
                loss.backward()
                opt.step()
                updates += 1
                with torch.no_grad():
                    bound = hp.clamp_norm_factor * h_init.norm()
                    if delta.norm() > bound:
                        delta.mul_(bound / delta.norm())
        delta = delta.detach().clone()
        return OracleTarget(h_init + delta, h_init, delta, updates, loss_value)

    # -- section 3 --------------------------------------------------------------------------------
    @torch.no_grad()
    def key(self, req, layer: int) -> torch.Tensor:
        bare, others = None, []
        for c in self.templates:
            ids, fact = self.m.encode(c.replace("{}", req.prompt, 1), req.subject)
            _, _, ks = self.m.run(ids, keys=[layer])
            k = ks[layer][fact].double()
            if c == "{}":
                bare = k
            else:
                others.append(k)
        if not others:
            return bare
        if self.hp.key_weights == "uniform":
            return torch.stack([bare] + others).mean(0)
        return 0.5 * bare + 0.5 * torch.stack(others).mean(0)

    @torch.no_grad()
    def hidden(self, req, layer: int) -> torch.Tensor:
        ids, fact = self.m.encode(req.prompt, req.subject)
        _, hs, _ = self.m.run(ids, hidden=[layer])
        return hs[layer][fact].double()

    def keys(self, requests, layer) -> torch.Tensor:
        return torch.stack([self.key(r, layer) for r in requests], dim=1)

    def hiddens(self, requests, layer) -> torch.Tensor:
        return torch.stack([self.hidden(r, layer) for r in requests], dim=1)

    def solve(self, layer: int, R: torch.Tensor, K: torch.Tensor) -> torch.Tensor:
        H, KKt = self.history[layer], K @ K.T
        if self.hp.method == "alphaedit":
            C = self.mom2[layer]
            evals, evecs = torch.linalg.eigh(C)
            U = evecs[:, evals < self.hp.nullspace_threshold]
            P = U @ U.T
            A = P @ (H + KKt) + self.hp.alpha * torch.eye(C.shape[0], dtype=torch.float64)
            return torch.linalg.solve(A, P @ K @ R.T).T
        A = self.hp.lam * self.mom2[layer] + KKt + (H if self.hp.use_history else 0)
        return torch.linalg.solve(A, K @ R.T).T  # A is symmetric: (R Kᵀ A⁻¹)ᵀ = A⁻¹ K Rᵀ

    # -- section 4: one round -----------------------------------------------------------------------
    def edit_round(self, requests) -> OracleRound:
        hp = self.hp
        before = {l: self.m.get_W(l).double() for l in self.edited}
        targets, steps = {}, []
        if hp.strategy == "distribute":
            L, mcount = hp.layers[-1], len(hp.layers)
            targets[L] = [self.target(r, L) for r in requests]
            z = torch.stack([t.z.double() for t in targets[L]], dim=1)
            for i, l in enumerate(hp.layers):
                K = self.keys(requests, l)
                R = (z - self.hiddens(requests, L)) / (mcount - i)
                dW = self.solve(l, R, K)
                steps.append(OracleStep(l, L, R, K, dW))
                self._write(l, dW, before[l])
        else:
            for l in self.edited:
                targets[l] = [self.target(r, l) for r in requests]
                z = torch.stack([t.z.double() for t in targets[l]], dim=1)
                K = self.keys(requests, l)
                R = z - self.hiddens(requests, l)
                dW = self.solve(l, R, K)
                steps.append(OracleStep(l, l, R, K, dW))
                self._write(l, dW, before[l])
        written = {s.layer: s.delta for s in steps}
        if hp.method == "rect" and not hp.rect_full_first:
            written = {s.layer: rect_sparse(s.delta, before[s.layer], hp.rect_keep) for s in steps}
        elif hp.method == "rect":  # restore, then write each layer's sparsified full update
            for s in steps:
                written[s.layer] = rect_sparse(s.delta, before[s.layer], hp.rect_keep)
                self.m.set_W(s.layer, before[s.layer] + written[s.layer])
        for l in self.edited:
            K = self.keys(requests, l)
            self.history[l] = self.history[l] + K @ K.T
        return OracleRound(targets, steps, written, dict(self.history))

    def _write(self, l: int, dW: torch.Tensor, W_before: torch.Tensor) -> None:
        if self.hp.method == "rect" and not self.hp.rect_full_first:
            dW = rect_sparse(dW, W_before, self.hp.rect_keep)
        self.m.add_W(l, dW)

    def finalize(self) -> None:
        """PRUNE's restraint after the last round (other methods: nothing)."""
        if self.hp.method != "prune":
            return
        for l in self.edited:
            W0, W = self.original[l], self.m.get_W(l).double()
            restrained = prune(W0, W)
            self.m.set_W(l, restrained if self.hp.prune_base == "original" else W + (restrained - W0))


def rect_sparse(delta: torch.Tensor, W: torch.Tensor, keep: float) -> torch.Tensor:
    """Keep the ``round(keep · n)`` entries of ``delta`` with the largest ``|ΔW| / (|W| + 1e-8)``."""
    score = (delta.abs() / (W.double().abs() + 1e-8)).flatten()
    n_keep = int(round(keep * score.numel()))
    threshold = torch.sort(score, descending=True).values[n_keep - 1]
    return torch.where((score >= threshold).view_as(delta), delta, torch.zeros_like(delta))


def prune(W0: torch.Tensor, W: torch.Tensor) -> torch.Tensor:
    U, S, Vh = torch.linalg.svd(W - W0, full_matrices=False)
    sigma = torch.linalg.svdvals(W0)[0]
    S = torch.where(S > sigma, torch.log(S) - torch.log(sigma) + sigma, S)
    return W0 + U @ torch.diag(S) @ Vh


# -- CounterFact metrics (docs/algorithms.md, evaluation) -------------------------------------------------
@torch.no_grad()
def mean_nll(m: Model, prompt: str, target: str) -> float:
    """Mean-token NLL of ``target`` (leading space) after the filled ``prompt``, one unpadded pass."""
    ids = list(m.tok(prompt)["input_ids"])
    cont = m.target_ids(target)
    logits, _, _ = m.run(ids + cont)
    logp = torch.log_softmax(logits.double(), dim=-1)
    return float(-sum(logp[len(ids) - 1 + j, t] for j, t in enumerate(cont)) / len(cont))


def counterfact_metrics(model, tokenizer, requests, pooled: bool = False) -> dict[str, float]:
    """Efficacy, generalization and specificity in percent, each averaged per record first:
    efficacy 1[NLL(o*|p) < NLL(o|p)]; generalization the same on each paraphrase; specificity
    1[NLL(o|n) < NLL(o*|n)] on each neighborhood prompt. ``pooled``: the wrong variant that averages
    over all prompts at once (used only to show that a test tells them apart)."""
    m = Model(model, tokenizer)
    eff, gen, spe = [], [], []
    for r in requests:
        def wins(prompt, a, b):
            return float(mean_nll(m, prompt, a) < mean_nll(m, prompt, b))
        eff.append(wins(r.prompt.replace("{}", r.subject), r.target_new, r.target_true))
        g = [wins(p, r.target_new, r.target_true) for p in r.paraphrases]
        s = [wins(n, r.target_true, r.target_new) for n in r.neighborhood]
        if pooled:
            gen.extend(g)
            spe.extend(s)
        else:
            gen.extend([sum(g) / len(g)] if g else [])
            spe.extend([sum(s) / len(s)] if s else [])
    mean = lambda xs: 100.0 * sum(xs) / len(xs) if xs else float("nan")  # noqa: E731
    return {"efficacy": mean(eff), "generalization": mean(gen), "specificity": mean(spe)}
