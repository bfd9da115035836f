"""Prompts in the tokenizer's chat template, for instruct models (``model.chat_template: true``).

A prompt ``x`` becomes the user's message of a one-turn chat followed by the assistant's header
(``apply_chat_template(..., add_generation_prompt=True)``), so the model is edited and evaluated
where a chat user meets it: the object is the first thing the assistant says. The subject slot
``{}`` is kept through the template (the template never sees it), so the fact token (the last
subject token) is still found by :func:`blueedit.models.tokens.encode_prompt` from the subject's
characters in the rendered text. Targets keep their leading space (``tokenize_target``), as in
plain-prompt runs. See docs/algorithms.md §13.
"""

from __future__ import annotations

from dataclasses import replace

from blueedit.config import UserInputError
from blueedit.data.records import EditRequest

#: Stands for the subject slot while the template renders (plain letters: templates that trim or
#: escape their content leave it alone).
_SLOT = "QXSUBJECTSLOTQX"


def has_chat_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def _adds_bos(tokenizer) -> bool:
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        return False
    ids = tokenizer("a")["input_ids"]
    return bool(ids) and ids[0] == bos


def chat_wrap(tokenizer, text: str) -> str:
    """``text`` (which may hold one ``{}`` for the subject) as the user's message of a chat,
    followed by the assistant's header; the ``{}`` is kept.

    A BOS that the template writes is dropped when the tokenizer adds one itself (it would be
    doubled). Raises ``ValueError`` when the tokenizer has no chat template, or when the rendered
    template holds a ``{}`` of its own (the subject slot would be ambiguous).
    """
    if not has_chat_template(tokenizer):
        raise UserInputError("model.chat_template is true but the tokenizer has no chat template")
    if text.count("{}") > 1:
        raise UserInputError(f"prompt {text!r} has more than one '{{}}'")
    rendered = tokenizer.apply_chat_template([{"role": "user", "content": text.replace("{}", _SLOT)}],
                                             tokenize=False, add_generation_prompt=True)
    if "{}" in rendered:
        raise UserInputError("the tokenizer's chat template itself writes '{}': the subject slot would be ambiguous; "
                         "set model.chat_template: false")
    if _SLOT not in rendered and "{}" in text:
        raise UserInputError(f"the chat template dropped the prompt {text!r}")
    bos = getattr(tokenizer, "bos_token", None)
    if bos and rendered.startswith(bos) and _adds_bos(tokenizer):
        rendered = rendered[len(bos):]
    return rendered.replace(_SLOT, "{}")


def chat_request(tokenizer, request: EditRequest) -> EditRequest:
    """``request`` with its prompt, paraphrases, neighborhood and generation prompts wrapped by
    :func:`chat_wrap` (the subject, targets and ids unchanged)."""
    def wrap_all(texts):
        return tuple(chat_wrap(tokenizer, t) for t in texts)

    return replace(
        request,
        prompt=chat_wrap(tokenizer, request.prompt),
        paraphrases=wrap_all(request.paraphrases),
        neighborhood=wrap_all(request.neighborhood),
        generation_prompts=wrap_all(request.generation_prompts),
    )


def chat_requests(tokenizer, requests: list[EditRequest]) -> list[EditRequest]:
    return [chat_request(tokenizer, r) for r in requests]
