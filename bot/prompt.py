"""Conversation -> prompt token IDs, within the model's context budget.

Two formats: `Llama2Format` reproduces Meta's reference `chat_completion` (meta-llama/llama,
llama/generation.py) token for token; `ChatTemplateFormat` uses the tokenizer's own chat template.
`build_prompt` drops the oldest whole exchanges until the prompt plus the answer fits the context.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from transformers import PreTrainedTokenizerBase

from bot.errors import PromptTooLongError

log = logging.getLogger(__name__)

B_INST, E_INST = "[INST]", "[/INST]"
B_SYS, E_SYS = "<<SYS>>\n", "\n<</SYS>>\n\n"

PROMPT_FORMATS = ("auto", "llama2", "template")


@dataclass(frozen=True)
class Exchange:
    """One finished user/assistant pair from history."""

    user: str
    assistant: str


class PromptFormat(Protocol):
    def encode(self, system_prompt: str | None, history: Sequence[Exchange], user_message: str) -> list[int]:
        """Token IDs of the whole prompt, ready for generation of the assistant's answer."""
        ...


@dataclass(frozen=True)
class BuiltPrompt:
    token_ids: list[int]
    kept_exchanges: int
    dropped_exchanges: int


class Llama2Format:
    """Meta's LLaMA-2 chat format, exactly as `Llama.chat_completion` builds it.

    Deviation by choice: Meta adds a `<<SYS>>` block for any system message, even an empty one; here
    None and "" both mean "no system prompt". A whitespace-only system prompt is kept, as Meta would.
    Meta also refuses dialogs that contain its tags (`[INST]`, `<<SYS>>`, ...); here they are plain text.
    """

    def __init__(self, tokenizer: PreTrainedTokenizerBase) -> None:
        if tokenizer.bos_token_id is None or tokenizer.eos_token_id is None:
            raise ValueError("the LLaMA-2 format needs a tokenizer with BOS and EOS tokens")
        self._tokenizer = tokenizer
        self._bos: int = tokenizer.bos_token_id
        self._eos: int = tokenizer.eos_token_id

    def encode(self, system_prompt: str | None, history: Sequence[Exchange], user_message: str) -> list[int]:
        ids: list[int] = []
        for i, exchange in enumerate(history):
            ids += self.exchange_ids(exchange, system_prompt if i == 0 else None)
        ids += self.open_turn_ids(user_message, None if history else system_prompt)
        return ids

    def exchange_ids(self, exchange: Exchange, system_prompt: str | None = None) -> list[int]:
        """One finished exchange; `system_prompt` only when it is the first exchange of the prompt."""
        user = _with_system(system_prompt, exchange.user)
        text = f"{B_INST} {user.strip()} {E_INST} {exchange.assistant.strip()} "
        return [self._bos, *self._sp_encode(text), self._eos]

    def open_turn_ids(self, user_message: str, system_prompt: str | None = None) -> list[int]:
        """The newest user message, left open for the answer."""
        user = _with_system(system_prompt, user_message)
        return [self._bos, *self._sp_encode(f"{B_INST} {user.strip()} {E_INST}")]

    def _sp_encode(self, text: str) -> list[int]:
        # Meta calls raw SentencePiece, which never makes control tokens out of text: a user who types
        # "<s>" or "</s>" gets those characters, not BOS/EOS. split_special_tokens gives the same here.
        return list(self._tokenizer.encode(text, add_special_tokens=False, split_special_tokens=True))


def _with_system(system_prompt: str | None, user: str) -> str:
    if not system_prompt:
        return user
    return f"{B_SYS}{system_prompt}{E_SYS}{user}"


class ChatTemplateFormat:
    """Any model with a chat template: `tokenizer.apply_chat_template(..., add_generation_prompt=True)`.

    Control tokens typed in a message (ChatML's `<|im_start|>`, `</s>`, any special token) are encoded as plain
    text, so only the template's own ones are tokens: a message can't open a turn, a system prompt or end the
    prompt. transformers' `sanitize_control_tokens` does it: it marks the typed ones before rendering and encodes
    them without matching added tokens; a message without any gets the same IDs as the plain template.
    """

    def __init__(self, tokenizer: PreTrainedTokenizerBase) -> None:
        if not tokenizer.chat_template:
            raise ValueError("the tokenizer has no chat_template; use the llama2 prompt format")
        self._tokenizer = tokenizer

    def encode(self, system_prompt: str | None, history: Sequence[Exchange], user_message: str) -> list[int]:
        messages: list[dict[str, str]] = []
        if system_prompt:
            messages.append({"role": "system", "content": system_prompt})
        for exchange in history:
            messages.append({"role": "user", "content": exchange.user})
            messages.append({"role": "assistant", "content": exchange.assistant})
        messages.append({"role": "user", "content": user_message})
        # return_dict=True pins the return type (transformers 5 returns a BatchEncoding by default).
        encoded: Any = self._tokenizer.apply_chat_template(
            messages, add_generation_prompt=True, tokenize=True, return_dict=True, sanitize_control_tokens=True
        )
        ids = encoded["input_ids"] if isinstance(encoded, Mapping) else encoded
        return [int(i) for i in ids]


def select_format(tokenizer: PreTrainedTokenizerBase, model_name: str, prompt_format: str = "auto") -> PromptFormat:
    """Pick the prompt format: "llama2", "template", or "auto" (LLaMA-2 by name or when no template)."""
    if prompt_format == "llama2":
        return Llama2Format(tokenizer)
    if prompt_format == "template":
        return ChatTemplateFormat(tokenizer)
    if prompt_format != "auto":
        raise ValueError(f"unknown prompt format {prompt_format!r}; expected one of {PROMPT_FORMATS}")
    name = model_name.lower()
    if "llama-2" in name or "llama2" in name or not tokenizer.chat_template:
        log.info("prompt format for %s: llama2", model_name)
        return Llama2Format(tokenizer)
    log.info("prompt format for %s: the tokenizer's chat template", model_name)
    return ChatTemplateFormat(tokenizer)


def build_prompt(
    fmt: PromptFormat,
    system_prompt: str | None,
    history: Sequence[Exchange],
    user_message: str,
    *,
    context_length: int,
    max_new_tokens: int,
) -> BuiltPrompt:
    """Encode the conversation so that prompt + max_new_tokens <= context_length.

    The oldest whole exchanges go first; the system prompt and the newest message always stay.
    Raises PromptTooLongError when even those two alone do not fit.
    """
    if max_new_tokens < 0 or context_length <= max_new_tokens:
        raise ValueError(f"context_length ({context_length}) must be larger than max_new_tokens ({max_new_tokens})")
    budget = context_length - max_new_tokens
    if isinstance(fmt, Llama2Format):
        ids, dropped = _fit_llama2(fmt, system_prompt, history, user_message, budget)
    else:
        ids, dropped = _fit_generic(fmt, system_prompt, history, user_message, budget)
    if dropped:
        log.debug("dropped %s of %s exchanges to fit %s prompt tokens", dropped, len(history), budget)
    return BuiltPrompt(token_ids=ids, kept_exchanges=len(history) - dropped, dropped_exchanges=dropped)


def _fit_llama2(
    fmt: Llama2Format, system_prompt: str | None, history: Sequence[Exchange], user_message: str, budget: int
) -> tuple[list[int], int]:
    # Meta encodes each exchange on its own, so lengths add up: encode every exchange once, then only
    # re-encode the one that becomes first (it carries the system prompt) for each candidate cut.
    n = len(history)
    plain = [fmt.exchange_ids(exchange) for exchange in history]
    open_plain = fmt.open_turn_ids(user_message)
    suffix = [0] * (n + 1)  # suffix[k]: tokens of plain exchanges k..n-1
    for k in range(n - 1, -1, -1):
        suffix[k] = suffix[k + 1] + len(plain[k])
    for k in range(n):
        # Exchange k itself adds at least one token, so a cut whose remainder alone overflows can't fit.
        if suffix[k + 1] + len(open_plain) >= budget:
            continue
        first = fmt.exchange_ids(history[k], system_prompt) if system_prompt else plain[k]
        if len(first) + suffix[k + 1] + len(open_plain) <= budget:
            ids = [*first, *(t for ex in plain[k + 1 :] for t in ex), *open_plain]
            return ids, k
    open_sys = fmt.open_turn_ids(user_message, system_prompt) if system_prompt else open_plain
    if len(open_sys) > budget:
        raise _too_long(len(open_plain), len(open_sys), budget)
    return open_sys, n


def _fit_generic(
    fmt: PromptFormat, system_prompt: str | None, history: Sequence[Exchange], user_message: str, budget: int
) -> tuple[list[int], int]:
    # Templates may join turns in ways that don't add up, so re-encode; the length falls as exchanges
    # are dropped, so binary search for the fewest drops that fit.
    n = len(history)
    full = fmt.encode(system_prompt, history, user_message)
    if len(full) <= budget:
        return full, 0
    alone = fmt.encode(system_prompt, (), user_message)
    if len(alone) > budget:
        open_plain = fmt.encode(None, (), user_message)
        raise _too_long(len(open_plain), len(alone), budget)
    best, best_k = alone, n
    lo, hi = 1, n - 1
    while lo <= hi:
        mid = (lo + hi) // 2
        ids = fmt.encode(system_prompt, history[mid:], user_message)
        if len(ids) <= budget:
            best, best_k = ids, mid
            hi = mid - 1
        else:
            lo = mid + 1
    return best, best_k


def _too_long(message_tokens: int, with_system_tokens: int, budget: int) -> PromptTooLongError:
    # The limit is what the message's turn may take once the system prompt has its share, so
    # message_tokens > limit_tokens holds exactly when the prompt does not fit.
    # Clamped at 0 for a system prompt that alone overflows (a configuration problem, logged).
    system_share = with_system_tokens - message_tokens
    limit = budget - system_share
    if limit <= 0:
        log.warning("the system prompt alone takes %s of %s prompt tokens", system_share, budget)
    return PromptTooLongError(message_tokens=message_tokens, limit_tokens=max(0, limit))


# LLaMA-2's turn and system markers are plain text to its tokenizer: typed by a user they would read exactly
# like the real ones, so every format gets them with spaces inside.
CONTROL_TAGS = re.compile(r"\[(/?)INST\]|<<(/?)SYS>>", re.IGNORECASE)


def neutralise_control_tags(text: str) -> str:
    """`[INST]`, `[/INST]`, `<<SYS>>`, `<</SYS>>` (any case) with spaces inside, so they stay readable but are
    no longer the tokens of LLaMA-2's turn or system markers."""
    return CONTROL_TAGS.sub(_spaced, text)


def _spaced(match: re.Match[str]) -> str:
    tag = match.group(0)
    if tag.startswith("["):
        return f"[ {tag[1:-1]} ]"
    return f"< {tag[1:-1]} >"
