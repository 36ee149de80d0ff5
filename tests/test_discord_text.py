from __future__ import annotations

import random

import pytest

from bot.discord_text import MESSAGE_LIMIT, no_pings, open_fence, split_message, strip_mentions_of


def test_short_text_is_one_message() -> None:
    assert split_message("hello") == ["hello"]


def test_paragraph_boundary_preferred() -> None:
    text = "a" * 1500 + "\n\n" + "b" * 1000
    chunks = split_message(text)
    assert chunks == ["a" * 1500, "b" * 1000]


def test_line_then_sentence_boundaries() -> None:
    text = "x" * 1200 + "\n" + "y" * 1200
    assert split_message(text) == ["x" * 1200, "y" * 1200]
    sentences = " ".join(["This is a sentence."] * 200)
    chunks = split_message(sentences)
    assert all(len(c) <= MESSAGE_LIMIT for c in chunks)
    assert all(c.endswith(".") for c in chunks)
    assert " ".join(chunks) == sentences


def test_no_boundary_cuts_hard_and_loses_nothing() -> None:
    text = "z" * 5000
    chunks = split_message(text)
    assert all(len(c) <= MESSAGE_LIMIT for c in chunks)
    assert "".join(chunks) == text


def test_code_fences_closed_and_reopened() -> None:
    code = "\n".join(f"print({i})" for i in range(600))
    text = "Here is code:\n```py\n" + code + "\n```\nDone."
    chunks = split_message(text)
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
def test_random_text_fits_and_keeps_content(seed: int) -> None:
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
    chunks = split_message(text)
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
