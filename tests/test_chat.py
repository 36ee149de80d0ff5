"""The chat pipeline (sessions → history → prompt → engine → history) with real parts, without Discord."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from bot.chat import TurnInput
from bot.config import Settings, settings_from_mapping
from bot.core import Core, open_core
from bot.errors import MessageRejectedError, PromptTooLongError
from bot.importer import ImportFormatError, import_gradio_history
from bot.render import Exchange, Llama2Format
from bot.sessions import Place

CHANNEL = Place(kind="channel", guild_id=1, channel_id=10)


def make_settings(model_dir: Path, data_dir: Path, **model: object) -> Settings:
    return settings_from_mapping(
        {
            "model": {"name": str(model_dir), "temperature": 0, "max_new_tokens": 8, "device_map": "cpu", **model},
            "chat": {"system_prompt": "Be brief.", "max_message_chars": 500},
            "storage": {"data_dir": str(data_dir)},
        }
    )


@pytest.fixture
async def core(tiny_llama_dir: Path, tmp_path: Path) -> AsyncIterator[Core]:
    async with open_core(make_settings(tiny_llama_dir, tmp_path / "data")) as opened:
        yield opened


async def say(core: Core, text: str, place: Place = CHANNEL, author: int = 7) -> str:
    async with core.chat.turn(TurnInput(place=place, author_id=author, text=text)) as turn:
        async for _ in turn.stream():
            pass
    return turn.answer


async def test_llama2_models_get_the_reference_format(core: Core) -> None:
    assert isinstance(core.renderer.format, Llama2Format)


async def test_a_turn_is_answered_and_stored(core: Core) -> None:
    answer = await say(core, "Hello there")
    assert answer
    session = await core.store.current(CHANNEL)
    assert session is not None
    assert [(m.role, m.status) for m in session.messages] == [("user", "ok"), ("assistant", "ok")]
    assert session.messages[0].content == "Hello there"
    assert session.messages[1].content == answer.strip()
    assert session.title == "Hello there"
    assert session.system_prompt == "Be brief."


async def test_the_next_prompt_holds_the_earlier_turns(core: Core) -> None:
    first = await say(core, "first question")
    session = await core.store.current(CHANNEL)
    assert session is not None
    expected = core.renderer.format.encode(
        "Be brief.",
        [Exchange("first question", first.strip())],
        "second question",
    )
    assert list(core.renderer.render(session, "second question").prompt.ids) == expected


async def test_concurrent_turns_in_one_session_both_land_in_order(core: Core) -> None:
    answers = await asyncio.gather(say(core, "one"), say(core, "two"), say(core, "three"))
    session = await core.store.current(CHANNEL)
    assert session is not None
    users = [m.content for m in session.messages if m.role == "user"]
    assert users == ["one", "two", "three"]
    assert [m.content for m in session.messages if m.role == "assistant"] == [a.strip() for a in answers]


async def test_sessions_of_different_places_are_separate(core: Core) -> None:
    other = Place(kind="dm", user_id=99)
    await say(core, "in the channel")
    await say(core, "in a dm", place=other, author=99)
    channel_session = await core.store.current(CHANNEL)
    dm_session = await core.store.current(other)
    assert channel_session is not None and dm_session is not None
    assert channel_session.id != dm_session.id
    assert dm_session.messages[0].content == "in a dm"


async def test_empty_and_overlong_messages_are_refused_before_the_model(core: Core) -> None:
    with pytest.raises(MessageRejectedError, match="empty"):
        await say(core, "   ")
    with pytest.raises(MessageRejectedError) as info:
        await say(core, "x" * 501)
    assert "501 characters" in info.value.user_message and "500" in info.value.user_message
    assert core.engine.stats.requests == 0


async def test_a_message_over_the_token_limit_is_refused_and_marked(tiny_llama_dir: Path, tmp_path: Path) -> None:
    settings = make_settings(tiny_llama_dir, tmp_path / "data", context_length=64)
    async with open_core(settings) as small:
        with pytest.raises(PromptTooLongError) as info:
            await say(small, "word " * 90)
        assert "tokens" in info.value.user_message
        assert small.engine.stats.requests == 0
        session = await small.store.current(CHANNEL)
        assert session is not None
        assert [(m.role, m.status) for m in session.messages] == [("user", "failed")]
        assert session.exchanges() == []


async def test_leaving_the_stream_early_marks_the_turn_cancelled(core: Core) -> None:
    async with core.chat.turn(TurnInput(place=CHANNEL, author_id=7, text="stop early")) as turn:
        async for _ in turn.stream():
            break
    session = await core.store.current(CHANNEL)
    assert session is not None
    assert [(m.role, m.status) for m in session.messages] == [("user", "cancelled")]
    # The next turn still works and does not see the cancelled one as an exchange.
    await say(core, "again")
    session = await core.store.current(CHANNEL)
    assert session is not None and session.exchanges() == [("again", session.messages[-1].content)]


async def test_a_cancelled_task_marks_the_turn_cancelled(core: Core) -> None:
    task = asyncio.create_task(say(core, "cancel me"))
    while core.engine.stats.requests == 0:  # noqa: ASYNC110 - polling the engine's counter is the point
        await asyncio.sleep(0.01)
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    session = await core.store.current(CHANNEL)
    assert session is not None
    assert session.messages[-1].status == "cancelled"


async def test_history_survives_a_restart(tiny_llama_dir: Path, tmp_path: Path) -> None:
    settings = make_settings(tiny_llama_dir, tmp_path / "data")
    async with open_core(settings) as first:
        answer = await say(first, "remember me")
    async with open_core(settings) as second:
        session = await second.store.current(CHANNEL)
        assert session is not None
        assert session.exchanges() == [("remember me", answer.strip())]


async def test_import_gradio_history(core: Core, tmp_path: Path) -> None:
    exported = tmp_path / "chat_history.json"
    exported.write_text(
        json.dumps(
            {
                "abc": [["Hi", "Hello! How can I help?"], ["What's 2+2?", "4"]],
                "def": [
                    {"role": "system", "content": "You are a pirate."},
                    {"role": "user", "content": "Ahoy"},
                    {"role": "assistant", "content": "Arr!"},
                ],
                "empty": [],
            }
        )
    )
    report = await import_gradio_history(exported, core.store, default_system_prompt="Default.")
    assert (report.sessions, report.messages, report.skipped) == (2, 6, ["empty"])
    summaries = {s.title: s for s in core.store.list_sessions(kinds=["console"])}
    assert set(summaries) == {"Imported abc", "Imported def"}
    abc = await core.store.get(summaries["Imported abc"].id)
    pirate = await core.store.get(summaries["Imported def"].id)
    assert abc is not None and pirate is not None
    assert abc.exchanges() == [("Hi", "Hello! How can I help?"), ("What's 2+2?", "4")]
    assert abc.system_prompt == "Default."
    assert pirate.system_prompt == "You are a pirate." and pirate.exchanges() == [("Ahoy", "Arr!")]


async def test_a_broken_import_file_imports_nothing(core: Core, tmp_path: Path) -> None:
    exported = tmp_path / "chat_history.json"
    exported.write_text(json.dumps({"good": [["a", "b"]], "bad": [{"role": "wizard", "content": "x"}]}))
    with pytest.raises(ImportFormatError, match="bad"):
        await import_gradio_history(exported, core.store, default_system_prompt="")
    assert core.store.list_sessions() == []
