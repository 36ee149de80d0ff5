"""Reasoning kept out of the answer: what a thinking model writes before it answers, either as `<think>...</think>`
at the start of its text or in the deltas' own reasoning field (wire.Delta.reasoning).

The chat layer gets answer text only, so reasoning is neither shown nor stored as the answer. With `[model]
show_reasoning`, it goes in front of the answer as one Discord spoiler line, "> *Thinking:* ||...||", once it is
complete: a spoiler cannot be streamed in pieces, and one line kept short is never cut by bot/reply_stream.py's
2,000-character split. That line is then part of the stored answer, so `without_shown_reasoning` takes it out of
the history sent back to the model.

Tags are looked for only at the start of the text: an answer that mentions `<think>` later keeps it. A tag may
arrive split across deltas ("<thi" + "nk>"), so text that may be the start of one is held back until the next
delta tells.
"""

from __future__ import annotations

import logging
import re
from typing import Literal

from bot.engine.remote.wire import Delta

log = logging.getLogger(__name__)

OPEN, CLOSE = "<think>", "</think>"
SHOWN_PREFIX = "> *Thinking:* ||"
# Characters of the reasoning shown (its start and end); even with every one escaped, the line fits one message.
SHOWN_CHARS = 900
# Discord markdown that could end the spoiler early or pull the answer into a code span or emphasis.
_MARKDOWN = re.compile(r"([\\|`*_~])")
_SHOWN = re.compile(r"\A> \*Thinking:\* \|\|(?:[^|\\\n]|\\.)*\|\|\s*")


class ReasoningFilter:
    """One answer's deltas in, its answer text out; `feed` each delta, then `finish` once the stream ends."""

    def __init__(self, *, show: bool) -> None:
        self.show = show
        # "start": no answer text yet, so a `<think>` may still come; "thinking": inside one; "answer": after.
        self._state: Literal["start", "thinking", "answer"] = "start"
        self._held = ""  # text that may be part of a tag
        self._reasoning: list[str] = []
        self._reasoned = False  # a think block or a reasoning delta came (even an empty one)
        self.answered = False  # answer text other than whitespace has been passed on
        self.finish_reason: str | None = None

    @property
    def reasoning(self) -> str:
        return "".join(self._reasoning)

    @property
    def thought(self) -> bool:
        """Whether the model wrote any reasoning (an empty `<think></think>` is none)."""
        return any(part.strip() for part in self._reasoning)

    def feed(self, delta: Delta) -> str:
        """The answer text `delta` completes: possibly nothing yet, and with the reasoning line first if shown."""
        if delta.finish_reason:
            self.finish_reason = delta.finish_reason
        if delta.reasoning:
            if self.answered:
                log.debug("reasoning after the answer began; not shown (%d characters)", len(delta.reasoning))
            else:
                self._reasoning.append(delta.reasoning)
                self._reasoned = True
        return self._answer(self._split(delta.text)) if delta.text else ""

    def finish(self) -> str:
        """What was held back, at the end of the stream: text that never became a tag is answer after all, and a
        think block that never closed (the answer budget ran out) is reasoning. When there is no answer but
        reasoning to show, that is shown."""
        held, self._held = self._held, ""
        if self._state == "thinking":
            self._reasoning.append(held)
            held = ""
        text = self._answer(held)
        if not self.answered and self.show and self.thought:
            return self._shown()
        return text

    def _split(self, text: str) -> str:
        """The part of `text` (after what was held) that is answer; reasoning goes aside."""
        if self._state == "answer":
            return text
        held, self._held = self._held + text, ""
        if self._state == "start":
            head = held.lstrip()
            if len(head) < len(OPEN) and OPEN.startswith(head):
                self._held = held  # only whitespace, or "<thi" that the next delta may complete
                return ""
            if not head.startswith(OPEN):
                self._state = "answer"
                return held
            self._state, self._reasoned = "thinking", True
            held = head[len(OPEN) :]
        end = held.find(CLOSE)
        if end < 0:
            keep = _tag_start(held, CLOSE)
            self._reasoning.append(held[: len(held) - keep])
            self._held = held[len(held) - keep :]
            return ""
        self._reasoning.append(held[:end])
        self._state = "answer"
        return held[end + len(CLOSE) :]

    def _answer(self, text: str) -> str:
        if self.answered or not text:
            return text
        if self._reasoned:
            text = text.lstrip()  # the blank lines between reasoning and answer
        if not text.strip():
            return text
        self.answered = True
        if self.show and self.thought:
            return self._shown() + text
        return text

    def _shown(self) -> str:
        """The reasoning as one spoiler line: its whitespace collapsed, its middle cut when long, markdown escaped."""
        text = " ".join(self.reasoning.split())
        if len(text) > SHOWN_CHARS:
            half = SHOWN_CHARS // 2
            text = f"{text[:half]} … {text[-half:]}"
        escaped = _MARKDOWN.sub(r"\\\1", text)
        return f"{SHOWN_PREFIX}{escaped}||\n\n"


def without_shown_reasoning(answer: str) -> str:
    """A stored answer without the reasoning line `show_reasoning` put in front of it."""
    return _SHOWN.sub("", answer, count=1)


def _tag_start(text: str, tag: str) -> int:
    """How many characters at the end of `text` may be the start of `tag`."""
    for n in range(min(len(tag) - 1, len(text)), 0, -1):
        if text.endswith(tag[:n]):
            return n
    return 0
