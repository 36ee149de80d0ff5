"""Long answers as Discord messages: what the streaming reply (bot/reply_stream.py) ends up showing, cut with
bot/discord_text.py's rules; and the mention rules."""

from __future__ import annotations

import random
from typing import Any, cast

import discord
import pytest

from bot.discord_text import MESSAGE_LIMIT, no_pings, open_fence, strip_mentions_of
from bot.reply_stream import EMPTY_ANSWER, STREAMING_MARK, StreamingReply


class FakeMessage:
    """What StreamingReply needs of a sent message: its content, and edit()."""

    def __init__(self, content: str) -> None:
        self.content = content
        self.edits = 0

    async def edit(
        self, *, content: str | None = None, allowed_mentions: discord.AllowedMentions | None = None, **_: Any
    ) -> FakeMessage:
        if content is not None:
            assert len(content) <= MESSAGE_LIMIT, "every edit fits one Discord message"
            self.content = content
        self.edits += 1
        return self


class FakeChannel:
    def __init__(self) -> None:
        self.sent: list[FakeMessage] = []

    async def send(self, content: str, **_: Any) -> FakeMessage:
        assert len(content) <= MESSAGE_LIMIT
        self.sent.append(FakeMessage(content))
        return self.sent[-1]


class FakeSource:
    """The user's message the answer replies to."""

    def __init__(self) -> None:
        self.channel = FakeChannel()

    def to_reference(self, *, fail_if_not_exists: bool) -> None:
        return None


async def streamed(text: str, *, seed: int = 0) -> list[str]:
    """The messages an answer ends as: `text` fed to the streaming reply in random pieces, then finished."""
    source = FakeSource()
    reply = StreamingReply(cast(discord.Message, source), edit_interval=0)
    rng = random.Random(seed)
    at = 0
    while at < len(text):
        step = rng.randint(1, 120)
        await reply.feed(text[at : at + step])
        at += step
    await reply.finish()
    messages = [m.content for m in source.channel.sent]
    assert all(STREAMING_MARK not in m for m in messages), "the final edits drop the streaming mark"
    return messages


async def test_short_text_is_one_message() -> None:
    assert await streamed("hello") == ["hello"]


async def test_an_empty_answer_says_so() -> None:
    assert await streamed("") == [EMPTY_ANSWER]
    assert await streamed(" \n ") == [EMPTY_ANSWER]


async def test_paragraph_boundary_preferred() -> None:
    text = "a" * 1500 + "\n\n" + "b" * 1000
    assert await streamed(text) == ["a" * 1500, "b" * 1000]


async def test_line_then_sentence_boundaries() -> None:
    text = "x" * 1200 + "\n" + "y" * 1200
    assert await streamed(text) == ["x" * 1200, "y" * 1200]
    sentences = " ".join(["This is a sentence."] * 200)
    chunks = await streamed(sentences)
    assert all(len(c) <= MESSAGE_LIMIT for c in chunks)
    assert all(c.endswith(".") for c in chunks)
    assert " ".join(chunks) == sentences


async def test_no_boundary_cuts_hard_and_loses_nothing() -> None:
    text = "z" * 5000
    chunks = await streamed(text)
    assert all(len(c) <= MESSAGE_LIMIT for c in chunks)
    assert "".join(chunks) == text


async def test_code_fences_closed_and_reopened() -> None:
    code = "\n".join(f"print({i})" for i in range(600))
    text = "Here is code:\n```py\n" + code + "\n```\nDone."
    chunks = await streamed(text)
    assert len(chunks) >= 3
    for chunk in chunks:
        assert len(chunk) <= MESSAGE_LIMIT
        assert open_fence(chunk) is None, "every message has balanced fences"
    for chunk in chunks[1:-1]:
        assert chunk.startswith("```py\n")
    body = "\n".join(chunks)
    for i in range(600):
        assert f"print({i})" in body


@pytest.mark.parametrize("seed", range(20))
async def test_random_text_fits_and_keeps_content(seed: int) -> None:
    rng = random.Random(seed)
    parts = []
    for _ in range(rng.randint(50, 400)):
        kind = rng.random()
        if kind < 0.1:
            parts.append("\n```py\n")
        elif kind < 0.2:
            parts.append("\n\n")
        else:
            parts.append("".join(rng.choice("abcdefgh .,!?\n") for _ in range(rng.randint(1, 80))))
    text = "".join(parts)
    chunks = await streamed(text, seed=seed)
    assert all(0 < len(c) <= MESSAGE_LIMIT for c in chunks)
    assert all(open_fence(c) is None for c in chunks[:-1])
    original = "".join(text.split()).replace("```py", "").replace("```", "")
    assert "".join("".join(c.split()) for c in chunks).replace("```py", "").replace("```", "") == original


def test_no_pings_forbids_everything_but_the_author_when_asked() -> None:
    mentions = no_pings().to_dict()
    assert mentions["parse"] == []
    assert mentions.get("replied_user", False) is False
    assert no_pings(ping_author=True).to_dict()["replied_user"] is True


def test_strip_mentions_of_bot_only() -> None:
    assert strip_mentions_of("<@42> hello <@7> there", 42) == "hello <@7> there"
    assert strip_mentions_of("hi <@!42>", 42) == "hi"
    assert strip_mentions_of("<@42>", 42) == ""
