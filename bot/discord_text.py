"""Text for Discord: splitting long answers at natural boundaries with code fences kept balanced, and the
mention rules every message the bot sends carries."""

from __future__ import annotations

import re

import discord

MESSAGE_LIMIT = 2000
FENCE = "```"
# Cut points in order of preference; each pattern marks where the text may be split (after the match).
_BOUNDARIES = (re.compile(r"\n\n"), re.compile(r"\n"), re.compile(r"[.!?。！？](?=\s)"), re.compile(r"\s"))
# A split point must leave at least this much of the limit used, or a cut mid-word reads better.
_MIN_FILL = 0.5
_FENCE_RE = re.compile(r"```([\w+#.-]*)(\n?)")
_MENTION = re.compile(r"<@!?(\d+)> ?")
# A fence's language tag is kept short when reopened, so a split always makes progress.
_MAX_FENCE_LINE = 24


def no_pings(*, ping_author: bool = False) -> discord.AllowedMentions:
    """Model text must never ping: no @everyone/@here, roles or users; the replied-to author only if asked."""
    return discord.AllowedMentions(everyone=False, users=False, roles=False, replied_user=ping_author)


def strip_mentions_of(text: str, user_id: int) -> str:
    """The message without mentions of the bot itself (they are addressing, not content)."""
    return _MENTION.sub(lambda m: "" if int(m.group(1)) == user_id else m.group(0), text).strip()


def open_fence(text: str) -> str | None:
    """The opening of the code block still open at the end of `text` (e.g. "```py"), or None.

    Discord toggles a code block at every ``` (not only at the start of a line); an opening fence's language
    is the word right after it when a newline follows."""
    opening: str | None = None
    for match in _FENCE_RE.finditer(text):
        if opening is not None:
            opening = None
        else:
            language = match.group(1) if match.group(2) else ""
            opening = (FENCE + language)[:_MAX_FENCE_LINE]
    return opening


def take_chunk(text: str, limit: int = MESSAGE_LIMIT) -> tuple[str, str]:
    """Split off the first message of `text`: (chunk, rest). The chunk fits `limit` with any open code fence
    closed; the rest reopens that fence. The caller splits only when `text` is longer than `limit`."""
    # Reserve room for closing a fence at the cut: "\n```".
    budget = limit - len(FENCE) - 1
    cut = _best_cut(text, budget)
    head, rest = text[:cut], text[cut:]
    fence = open_fence(head)
    if fence is not None:
        head = head.rstrip("\n") + "\n" + FENCE
        rest = fence + "\n" + rest.lstrip("\n")
    else:
        rest = rest.lstrip()
    return head.rstrip() if fence is None else head, rest


def _best_cut(text: str, budget: int) -> int:
    window = text[: budget + 1]
    for pattern in _BOUNDARIES:
        ends = [m.end() for m in pattern.finditer(window) if m.end() <= budget]
        if ends and ends[-1] >= budget * _MIN_FILL:
            return ends[-1]
    return budget
