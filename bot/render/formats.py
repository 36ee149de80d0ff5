"""Prompt formats: a conversation -> token IDs, with no budget (bot/render/fitting.py fits them to the context).

`Llama2Format` reproduces Meta's reference `chat_completion` (meta-llama/llama, llama/generation.py) token for
token; `ChatTemplateFormat` uses the tokenizer's own chat template.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from transformers import PreTrainedTokenizerBase

log = logging.getLogger(__name__)

B_INST, E_INST = "[INST]", "[/INST]"
B_SYS, E_SYS = "<<SYS>>\n", "\n<</SYS>>\n\n"


@dataclass(frozen=True)
class Exchange:
    """One finished user/assistant pair from history."""

    user: str
    assistant: str


class PromptFormat(Protocol):
    def encode(
        self, system_prompt: str | None, history: Sequence[Exchange], user_message: str, answer_start: str = ""
    ) -> list[int]:
        """Token IDs of the whole prompt, ready for generation of the assistant's answer; with `answer_start`, the
        prompt ends inside the answer, after that text, for the model to go on with (Continue)."""
        ...


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

    def encode(
        self, system_prompt: str | None, history: Sequence[Exchange], user_message: str, answer_start: str = ""
    ) -> list[int]:
        ids: list[int] = []
        for i, exchange in enumerate(history):
            ids += self.exchange_ids(exchange, system_prompt if i == 0 else None)
        ids += self.open_turn_ids(user_message, None if history else system_prompt, answer_start)
        return ids

    def exchange_ids(self, exchange: Exchange, system_prompt: str | None = None) -> list[int]:
        """One finished exchange; `system_prompt` only when it is the first exchange of the prompt."""
        user = _with_system(system_prompt, exchange.user)
        text = f"{B_INST} {user.strip()} {E_INST} {exchange.assistant.strip()} "
        return [self._bos, *self._sp_encode(text), self._eos]

    def open_turn_ids(self, user_message: str, system_prompt: str | None = None, answer_start: str = "") -> list[int]:
        """The newest user message, left open for the answer; or, with `answer_start`, the exchange as Meta
        writes it up to the end of that text (no closing space or EOS), for the answer to go on."""
        user = _with_system(system_prompt, user_message)
        text = f"{B_INST} {user.strip()} {E_INST}"
        if answer_start.strip():
            text += f" {answer_start.strip()}"
        return [self._bos, *self._sp_encode(text)]

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

    def encode(
        self, system_prompt: str | None, history: Sequence[Exchange], user_message: str, answer_start: str = ""
    ) -> list[int]:
        messages: list[dict[str, str]] = []
        if system_prompt:
            messages.append({"role": "system", "content": system_prompt})
        for exchange in history:
            messages.append({"role": "user", "content": exchange.user})
            messages.append({"role": "assistant", "content": exchange.assistant})
        messages.append({"role": "user", "content": user_message})
        go_on = bool(answer_start.strip())
        if go_on:
            messages.append({"role": "assistant", "content": answer_start.strip()})
        # return_dict=True pins the return type (transformers 5 returns a BatchEncoding by default).
        encoded: Any = self._tokenizer.apply_chat_template(
            messages,
            add_generation_prompt=not go_on,
            continue_final_message=go_on,
            tokenize=True,
            return_dict=True,
            sanitize_control_tokens=True,
        )
        ids = encoded["input_ids"] if isinstance(encoded, Mapping) else encoded
        return [int(i) for i in ids]


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
