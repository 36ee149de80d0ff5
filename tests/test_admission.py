"""Per-user admission (one request in flight per user and session, messages and /newchat per minute), and answers
whose thread is archived while they are written: the limits alone, then through the real bot and the Discord
emulator."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
from discord_harness import StartBot, World, channel_place, finished_session, mention, thread_place
from script_model import build_script_llama

from bot.admission import Admission, NewChatRateLimitedError, NoticeGate, RateLimitedError, RateWindow, UserBusyError
from discord_emulator import Channel, User

LONG_SCRIPT = "Counting sheep slowly until the night is over."


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


# --- the limits alone -------------------------------------------------------------------------------------


def test_one_request_in_flight_per_user_and_session() -> None:
    admission = Admission(per_minute=0)
    with admission.admit(1, "thread:7"):
        with pytest.raises(UserBusyError) as refused:
            admission.admit(1, "thread:7")
        assert "still answering your previous message" in refused.value.user_message
        # Another session of the same user, and another user in the same session, are not held up.
        with admission.admit(1, "channel:8"), admission.admit(2, "thread:7"):
            assert admission.in_flight == 3
    assert admission.in_flight == 0
    with admission.admit(1, "thread:7"):
        pass


def test_the_slot_is_freed_when_the_answer_fails() -> None:
    admission = Admission(per_minute=0)
    with pytest.raises(RuntimeError), admission.admit(1, "dm:1"):
        raise RuntimeError("the model broke")
    assert admission.in_flight == 0


def test_rate_limit_names_when_to_retry_and_frees_up_as_the_minute_passes() -> None:
    clock = FakeClock()
    admission = Admission(per_minute=3, clock=clock)
    for step in range(3):
        with admission.admit(1, f"place:{step}"):
            pass
        clock.now += 10  # admitted at 1000, 1010, 1020
    with pytest.raises(RateLimitedError) as refused:
        admission.admit(1, "place:x")  # at 1030: the first admission leaves the window at 1060
    assert refused.value.retry_after == pytest.approx(30)
    assert refused.value.user_message == (
        "You've sent me 3 messages in the last minute, the most I take from one person; please try again in 30 seconds."
    )
    # Another user has their own budget.
    with admission.admit(2, "place:x"):
        pass
    clock.now = 1059.5
    with pytest.raises(RateLimitedError) as refused:
        admission.admit(1, "place:x")
    assert "try again in 1 second." in refused.value.user_message
    clock.now = 1060.0
    with admission.admit(1, "place:x"):
        pass
    with pytest.raises(RateLimitedError):
        admission.admit(1, "place:x")


def test_refused_messages_do_not_use_up_the_budget() -> None:
    clock = FakeClock()
    admission = Admission(per_minute=1, clock=clock)
    with admission.admit(1, "a"):
        pass
    for _ in range(50):
        clock.now += 1
        with pytest.raises(RateLimitedError):
            admission.admit(1, "a")
    clock.now = 1060.0
    with admission.admit(1, "a"):
        pass


def test_busy_refusals_do_not_count_against_the_rate() -> None:
    admission = Admission(per_minute=2, clock=FakeClock())
    with admission.admit(1, "a"):
        for _ in range(5):
            with pytest.raises(UserBusyError):
                admission.admit(1, "a")
    with admission.admit(1, "a"):
        pass


def test_zero_means_no_rate_limit() -> None:
    admission = Admission(per_minute=0, clock=FakeClock())
    for _ in range(1000):
        with admission.admit(1, "a"):
            pass
    assert admission.tracked_users == 0


def test_memory_holds_only_the_users_of_the_last_minute() -> None:
    clock = FakeClock()
    admission = Admission(per_minute=5, clock=clock)
    for user in range(10_000):
        with admission.admit(user, "a"):
            pass
        clock.now += 0.1  # 10,000 users over 1,000 seconds
    assert admission.tracked_users <= 601
    assert admission.in_flight == 0


def test_new_chats_have_their_own_window_and_sentence() -> None:
    clock = FakeClock()
    newchats = RateWindow(2, NewChatRateLimitedError, clock=clock)
    newchats.take(1)
    clock.now += 5
    newchats.take(1)
    with pytest.raises(NewChatRateLimitedError) as refused:
        newchats.take(1)
    assert refused.value.user_message == (
        "You've started 2 new chats in the last minute, the most I open for one person; please try again in 55 seconds."
    )
    newchats.take(2)
    clock.now += 55
    newchats.take(1)


def test_a_refusal_is_told_once_per_interval() -> None:
    clock = FakeClock()
    gate = NoticeGate(3600, clock=clock)
    assert gate.should_tell(1)
    assert not gate.should_tell(1)
    assert gate.should_tell(2)
    clock.now += 3599
    assert not gate.should_tell(1)
    clock.now += 1
    assert gate.should_tell(1)


# --- through Discord --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def long_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_script_llama(tmp_path_factory.mktemp("long-model"), LONG_SCRIPT)


async def new_thread(world: World, user: User, topic: str) -> Channel:
    handle = await world.emu.invoke_command(world.general, user, "newchat", {"topic": topic})
    await world.emu.wait_for(
        lambda: handle.original() is not None and not handle.is_loading(), timeout=60, what="/newchat"
    )
    (thread,) = [t for t in world.emu.threads_of(world.general) if t.name == topic]
    return thread


def replies_to(world: World, channel: Channel, message: dict[str, Any]) -> list[dict[str, Any]]:
    return [
        m
        for m in world.emu.bot_messages_in(channel)
        if (m.get("message_reference") or {}).get("message_id") == message["id"]
    ]


async def test_a_second_message_while_the_first_is_answered_is_refused_at_once(
    world: World, start_bot: StartBot, long_model_dir: Path
) -> None:
    emu = world.emu
    async with start_bot(model_dir=long_model_dir, model={"max_new_tokens": 3000}) as bot:
        thread = await new_thread(world, world.alice, "patience")
        place = thread_place(world, thread)
        first = await emu.send_message(thread, world.alice, "tell me a very long story")
        await emu.wait_for_message(thread, after=first, timeout=60)  # the answer is streaming
        second = await emu.send_message(thread, world.alice, "and another thing")
        await emu.wait_for(lambda: replies_to(world, thread, second), what="the refusal")
        (refusal,) = replies_to(world, thread, second)
        assert bot.core.engine.running == 1, "the first answer is still being written"
        assert refusal["content"] == UserBusyError.user_message

        await emu.delete_message(first)  # ends the long answer
        session = await finished_session(bot, place)
        cog = bot.get_cog("ChatCog")
        await emu.wait_for(lambda: cog.admission.in_flight == 0, what="the slot to be freed")  # type: ignore[union-attr]
    # The refused message never became part of the conversation.
    assert [(m.content, m.status) for m in session.messages] == [("tell me a very long story", "cancelled")]
    assert len(replies_to(world, thread, second)) == 1


async def test_another_user_in_the_same_thread_is_not_refused(
    world: World, start_bot: StartBot, long_model_dir: Path
) -> None:
    emu = world.emu
    async with start_bot(model_dir=long_model_dir, model={"max_new_tokens": 150}) as bot:
        thread = await new_thread(world, world.alice, "shared")
        first = await emu.send_message(thread, world.alice, "first question")
        await emu.wait_for_message(thread, after=first, timeout=60)
        await emu.send_message(thread, world.bob, "my question too")
        session = await finished_session(bot, thread_place(world, thread), turns=2, timeout=120)
    assert [(m.role, m.status) for m in session.messages] == [("user", "ok"), ("assistant", "ok")] * 2
    assert all(UserBusyError.user_message not in m["content"] for m in emu.bot_messages_in(thread))


async def test_the_rate_limit_answers_with_when_to_retry(world: World, start_bot: StartBot) -> None:
    emu = world.emu
    async with start_bot(chat={"rate_limit_per_minute": 2}) as bot:
        for number, channel in enumerate((world.general, world.random)):
            await mention(world, channel, world.alice, f"question {number}")
            await finished_session(bot, channel_place(world, channel))
        third = await mention(world, world.general, world.alice, "question 2")
        told = await emu.wait_for_message(world.general, after=third)
        # Bob has his own budget.
        await mention(world, world.general, world.bob, "bob's question")
        general = await finished_session(bot, channel_place(world, world.general), turns=2)
    assert told["message_reference"]["message_id"] == third["id"]
    assert told["content"].startswith("You've sent me 2 messages in the last minute")
    seconds = int(told["content"].split("try again in ")[1].split(" second")[0])
    assert 1 <= seconds <= 60
    assert [m.content for m in general.messages if m.role == "user"] == ["question 0", "bob's question"]


async def test_archiving_the_thread_cancels_its_answer_quietly(
    world: World, start_bot: StartBot, long_model_dir: Path
) -> None:
    emu = world.emu
    async with start_bot(model_dir=long_model_dir, model={"max_new_tokens": 3000}) as bot:
        thread = await new_thread(world, world.alice, "to be archived")
        asked = await emu.send_message(thread, world.alice, "write forever")
        await emu.wait_for_message(thread, after=asked, timeout=60)
        await emu.archive_thread(thread)
        session = await finished_session(bot, thread_place(world, thread))
        await emu.wait_for(lambda: bot.core.engine.running == 0, what="the request to leave the engine")
        posts_after_archive = len(emu.calls("POST", rf"/channels/{thread.id}/messages"))
        await asyncio.sleep(0.3)
        assert len(emu.calls("POST", rf"/channels/{thread.id}/messages")) == posts_after_archive
    assert [(m.role, m.status) for m in session.messages] == [("user", "cancelled")]
    # No "sorry" note: a post would have unarchived the thread a moderator just closed.
    assert emu.channel(thread).archived
    assert all("sorry" not in m["content"].lower() for m in emu.bot_messages_in(thread))


async def test_newchat_in_a_loop_is_held_to_the_limit(world: World, start_bot: StartBot) -> None:
    """Eight /newchat at once from alice open three threads (`[chat] newchat_per_minute`); the other five are
    told, only to her, when to try again. Bob has his own budget."""
    emu = world.emu
    async with start_bot(chat={"newchat_per_minute": 3}):
        handles = [
            await emu.invoke_command(world.general, world.alice, "newchat", {"topic": f"loop {n}"}) for n in range(8)
        ]
        await emu.wait_for(
            lambda: all(h.responded and not h.is_loading() for h in handles), timeout=60, what="eight answers"
        )
        bobs = await new_thread(world, world.bob, "bob's own")
    refused = [h for h in handles if h.ephemeral]
    assert len(refused) == 5
    for handle in refused:
        content = str(handle.response_data.get("content"))
        assert content.startswith("You've started 3 new chats in the last minute"), content
    alices = [t for t in emu.threads_of(world.general) if t.name.startswith("loop")]
    assert len(alices) == 3
    assert bobs.name == "bob's own"
