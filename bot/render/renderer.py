"""The renderer: a session's history, its system prompt and the new turn -> the one prompt an engine runs.

It decides everything about the prompt, once: which format (Meta's LLaMA-2 reference format, the tokenizer's chat
template, or chat messages for a server that applies the template itself), what users' text may carry into it
(LLaMA-2's markers defused), and which of the oldest exchanges are left out to fit the context window. Engines get
the result as a TokenPrompt or a MessagePrompt and only check that it fits.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from bot.engine.base import ChatMessage, MessagePrompt, Prompt, TokenPrompt
from bot.errors import ConfigError
from bot.render.fitting import fit_chars, fit_tokens
from bot.render.formats import ChatTemplateFormat, Exchange, Llama2Format, PromptFormat, neutralise_control_tags

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from bot.config import Settings
    from bot.engine.base import Engine
    from bot.sessions import Session

log = logging.getLogger(__name__)

PROMPT_FORMATS = ("auto", "llama2", "template")
# Discord display names are at most 32 characters; anything longer came from somewhere else.
SPEAKER_NAME_CHARS = 32


@dataclass(frozen=True)
class Speaker:
    """Who asks the new turn: their id tells speakers apart, their display name goes into the prompt."""

    id: int | None
    name: str | None = None


@dataclass(frozen=True)
class RenderedPrompt:
    prompt: Prompt
    dropped_exchanges: int  # the oldest exchanges left out to fit the context window


def is_llama2_name(model_name: str) -> bool:
    name = model_name.lower()
    return "llama-2" in name or "llama2" in name


def select_format(tokenizer: PreTrainedTokenizerBase, model_name: str, prompt_format: str = "auto") -> PromptFormat:
    """Pick the prompt format: "llama2", "template", or "auto" (LLaMA-2 by name or when no template)."""
    if prompt_format == "llama2":
        return Llama2Format(tokenizer)
    if prompt_format == "template":
        return ChatTemplateFormat(tokenizer)
    if prompt_format != "auto":
        raise ValueError(f"unknown prompt format {prompt_format!r}; expected one of {PROMPT_FORMATS}")
    if is_llama2_name(model_name) or not tokenizer.chat_template:
        log.info("prompt format for %s: llama2", model_name)
        return Llama2Format(tokenizer)
    log.info("prompt format for %s: the tokenizer's chat template", model_name)
    return ChatTemplateFormat(tokenizer)


class Renderer:
    """Builds every turn's prompt; made once per engine (`for_engine`) after the engine has started."""

    def __init__(
        self, *, fmt: PromptFormat | None, as_messages: bool, context_length: int, max_new_tokens: int
    ) -> None:
        if fmt is None and not as_messages:
            raise ValueError("a token prompt needs a prompt format (and so a tokenizer)")
        self.format = fmt
        # True: the engine gets chat messages (the server templates them); the format, when there is one, still
        # counts the tokens that decide what fits.
        self.as_messages = as_messages
        self.context_length = context_length
        self.max_new_tokens = max_new_tokens

    @classmethod
    def for_engine(cls, settings: Settings, engine: Engine) -> Renderer:
        m = settings.model
        tokenizer = engine.tokenizer
        fmt: PromptFormat | None = None
        if tokenizer is not None:
            fmt = select_format(tokenizer, m.name, m.prompt_format)
        elif m.prompt_format == "llama2" or (m.prompt_format == "auto" and is_llama2_name(m.name)):
            raise ConfigError(
                settings.source or "<config>",
                "model.tokenizer",
                f"the LLaMA-2 prompt of {m.name} is built from token IDs, so its tokenizer is needed: set "
                "model.tokenizer to a folder or hub ID holding it",
            )
        # LLaMA-2 goes as our own Meta-exact token IDs everywhere; a server would template it its own way.
        as_messages = engine.accepts_messages and not isinstance(fmt, Llama2Format)
        renderer = cls(
            fmt=fmt, as_messages=as_messages, context_length=engine.context_length, max_new_tokens=m.max_new_tokens
        )
        log.info("prompts: %s", renderer.describe())
        return renderer

    def describe(self) -> str:
        shape = "chat messages for the server" if self.as_messages else "token IDs"
        counted = type(self.format).__name__ if self.format else "characters (no tokenizer)"
        return f"{shape}, fitted by {counted}"

    def render(
        self, session: Session, user_text: str, speaker: Speaker | None = None, *, answer_start: str = ""
    ) -> RenderedPrompt:
        """The prompt for `user_text` as the next turn of `session`, fitted to the context window; with
        `answer_start` (Continue), the prompt ends inside that turn's answer, after that text, for the model to
        go on with the same answer rather than start a new one.

        History keeps what users typed; only the prompt gets their text with LLaMA-2's markers defused. Where more
        than one person has spoken (a channel's shared session), every user turn starts with its speaker's name,
        "Alice: ...", so the model can tell them apart; the prefix is part of the user text, Meta's format stays."""
        turns = session.answered_turns()
        speakers = {user.author_id for user, _ in turns} | {speaker.id if speaker else None}
        named = len(speakers - {None}) > 1

        def user_turn(text: str, author_id: int | None, author_name: str | None) -> str:
            text = neutralise_control_tags(text)
            return f"{speaker_label(author_id, author_name)}: {text}" if named else text

        text = user_turn(user_text, speaker.id if speaker else None, speaker.name if speaker else None)
        system_prompt = neutralise_control_tags(session.system_prompt) if session.system_prompt else None
        history = [
            Exchange(user=user_turn(user.content, user.author_id, user.author_name), assistant=answer.content)
            for user, answer in turns
        ]
        budget = {"context_length": self.context_length, "max_new_tokens": self.max_new_tokens}
        answer_start = answer_start.strip()
        if self.format is None:
            dropped = fit_chars(system_prompt, history, text, **budget, answer_start=answer_start)
            prompt: Prompt = _messages(system_prompt, history[dropped:], text, answer_start)
        else:
            built = fit_tokens(self.format, system_prompt, history, text, **budget, answer_start=answer_start)
            dropped = built.dropped_exchanges
            if self.as_messages:
                prompt = _messages(system_prompt, history[dropped:], text, answer_start)
            else:
                prompt = TokenPrompt(tuple(built.token_ids), continues_answer=bool(answer_start))
        if dropped:
            log.info(
                "session %s: %d oldest exchanges left out of the prompt to fit the context window", session.id, dropped
            )
        return RenderedPrompt(prompt=prompt, dropped_exchanges=dropped)


def speaker_label(author_id: int | None, author_name: str | None) -> str:
    """A speaker's name as the prompt shows it: one line, no LLaMA-2 markers, no colon to fake another speaker."""
    name = " ".join((author_name or "").split()).replace(":", "")[:SPEAKER_NAME_CHARS].strip()
    if name:
        return neutralise_control_tags(name)
    return f"User {author_id}" if author_id is not None else "User"


def _messages(system_prompt: str | None, history: Sequence[Exchange], text: str, answer_start: str) -> MessagePrompt:
    messages = [ChatMessage("system", system_prompt)] if system_prompt else []
    for exchange in history:
        messages += [ChatMessage("user", exchange.user), ChatMessage("assistant", exchange.assistant)]
    messages.append(ChatMessage("user", text))
    if answer_start:
        messages.append(ChatMessage("assistant", answer_start))
    return MessagePrompt(tuple(messages))
