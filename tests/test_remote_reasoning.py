"""Thinking models through the `openai` backend: reasoning kept out of the answer (or shown as a spoiler), and how
streams that end without an answer, or without saying they ended, turn out. The scripted fake plays the server."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from fake_openai import FakeOpenAIServer, Reply

from bot.chat import TurnInput
from bot.config import ModelSettings, Settings, settings_from_mapping
from bot.core import Core, open_core
from bot.engine import ChatMessage, GenerationRequest, MessagePrompt, RemoteEngine, RetryPolicy, SamplingParams
from bot.engine.remote.reasoning import SHOWN_CHARS, ReasoningFilter, without_shown_reasoning
from bot.engine.remote.wire import Delta
from bot.errors import ServerBrokeOffError, ThoughtWithoutAnswerError
from bot.sessions import Place

FAST = RetryPolicy(attempts=4, base_delay=0.01, max_delay=0.05, cooldown=60.0, connect_timeout=2)
FAKE_MODEL = "/nonexistent/fake-model"  # no tokenizer there: prompts go as messages


@pytest.fixture
async def fake() -> AsyncIterator[FakeOpenAIServer]:
    server = FakeOpenAIServer()
    await server.start()
    yield server
    await server.stop()


def engine_for(fake: FakeOpenAIServer, *, show_reasoning: bool = False) -> RemoteEngine:
    settings = ModelSettings(
        name=FAKE_MODEL,
        backend="openai",
        base_url=(fake.base_url,),
        context_length=2048,
        temperature=0.0,
        show_reasoning=show_reasoning,
    )
    return RemoteEngine(settings, api_key=None, retry=FAST)


def chat_request() -> GenerationRequest:
    return GenerationRequest(MessagePrompt((ChatMessage("user", "hi"),)), SamplingParams(max_new_tokens=24))


async def collect(stream: AsyncIterator[str]) -> list[str]:
    return [delta async for delta in stream]


def filtered(pieces: list[str], *, show: bool = False) -> tuple[list[str], ReasoningFilter]:
    answer = ReasoningFilter(show=show)
    out = [answer.feed(Delta(piece)) for piece in pieces] + [answer.finish()]
    return [text for text in out if text], answer


# --- the filter alone ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "pieces",
    [
        ["<think>Hmm.</think>\n\nParis."],
        ["<", "t", "h", "i", "n", "k", ">", "Hmm.", "<", "/", "think", ">", "\n", "\n", "Paris", "."],
        ["\n<thi", "nk>Hm", "m.</thi", "nk", ">\n\nParis."],
        ["  <think>Hmm.</", "think>Paris."],
    ],
    ids=["whole", "one-character-pieces", "split-tags", "leading-space"],
)
def test_think_tags_split_anywhere_are_taken_out(pieces: list[str]) -> None:
    out, answer = filtered(pieces)
    assert "".join(out) == "Paris."
    assert answer.reasoning == "Hmm."
    assert answer.answered and answer.thought


def test_text_that_only_looks_like_a_tag_is_answer() -> None:
    assert "".join(filtered(["<thi", "ng> is not a tag"])[0]) == "<thing> is not a tag"
    assert filtered(["<thi"])[0] == ["<thi"]  # held back, then given back at the end
    out, answer = filtered(["Use ", "<think>", " tags.</think>"])
    assert "".join(out) == "Use <think> tags.</think>"  # only a tag at the start is reasoning
    assert not answer.thought


def test_an_answer_without_reasoning_passes_unchanged() -> None:
    out, _ = filtered(["\n", " Hello", " there", "!"])
    assert out == ["\n Hello", " there", "!"]  # leading whitespace is held only while a tag may follow


def test_reasoning_deltas_are_kept_apart_and_shown_only_when_asked() -> None:
    for show, expected in ((False, "Paris."), (True, "> *Thinking:* ||Two lines of thought.||\n\nParis.")):
        answer = ReasoningFilter(show=show)
        out = [answer.feed(Delta(reasoning="Two lines\n")), answer.feed(Delta(reasoning="of thought.")), ""]
        out += [answer.feed(Delta("\n\n")), answer.feed(Delta("Paris.", finish_reason="stop")), answer.finish()]
        assert "".join(out) == expected
        assert answer.finish_reason == "stop"


def test_the_shown_reasoning_is_one_short_escaped_line_the_history_leaves_out() -> None:
    thinking = "a || b `code` *x* \\ " + "long " * 400
    out, _ = filtered([f"<think>{thinking}</think>", "Answer with `code`."], show=True)
    shown = "".join(out)
    line, answer = shown.split("\n\n", 1)
    assert answer == "Answer with `code`."
    assert "\n" not in line and len(line) < 2 * SHOWN_CHARS + 40
    assert line.startswith("> *Thinking:* ||a \\|\\| b \\`code\\` \\*x\\* \\\\ long")
    assert line.endswith("long||") and " … " in line
    assert line.count("||") == 2  # the reasoning cannot close the spoiler early
    assert without_shown_reasoning(shown) == answer
    assert without_shown_reasoning("> *Thinking:* a quote") == "> *Thinking:* a quote"


# --- through the engine, against the fake server ---------------------------------------------------------------


async def test_a_think_answer_streams_only_the_answer(fake: FakeOpenAIServer) -> None:
    fake.script.append(Reply(("<thi", "nk>The user", " greets me.</th", "ink>\n\n", "Hello", "!")))
    async with engine_for(fake) as engine:
        deltas = await collect(engine.generate(chat_request()))
        assert engine.stats.tokens_generated == 6  # the reasoning's chunks are generated tokens too
    assert deltas == ["Hello", "!"]


@pytest.mark.parametrize("field", ["reasoning_content", "reasoning"])
async def test_reasoning_fields_are_left_out(fake: FakeOpenAIServer, field: str) -> None:
    fake.script.append(Reply(("\n\nHi", "!"), reasoning=("Say", " hi."), reasoning_field=field))
    async with engine_for(fake) as engine:
        assert await collect(engine.generate(chat_request())) == ["Hi", "!"]


async def test_show_reasoning_puts_it_first_as_a_spoiler_line(fake: FakeOpenAIServer) -> None:
    fake.script.append(Reply(("Hi", "!"), reasoning=("Say", " hi.")))
    async with engine_for(fake, show_reasoning=True) as engine:
        deltas = await collect(engine.generate(chat_request()))
    assert deltas == ["> *Thinking:* ||Say hi.||\n\nHi", "!"]


async def test_a_stream_that_ends_unfinished_after_answer_text_broke_off(fake: FakeOpenAIServer) -> None:
    fake.script.append(Reply(("Half", " an"), finish=None))  # the response ends: no finish_reason, no [DONE]
    async with engine_for(fake) as engine:
        received: list[str] = []
        with pytest.raises(ServerBrokeOffError):
            async for delta in engine.generate(chat_request()):
                received.append(delta)
    assert received == ["Half", " an"]
    assert len(fake.bodies) == 1


async def test_a_stream_that_ends_unfinished_while_thinking_broke_off_without_a_retry(
    fake: FakeOpenAIServer,
) -> None:
    fake.script.append(Reply(("<think>Let me", " see"), finish=None))
    async with engine_for(fake) as engine:
        with pytest.raises(ServerBrokeOffError):
            await collect(engine.generate(chat_request()))
    assert len(fake.bodies) == 1  # the model would think it all over again while the user waits


@pytest.mark.parametrize(
    "reply",
    [
        Reply((), reasoning=("Thinking", " and thinking"), finish="length"),
        Reply(("<think>Thinking", " and thinking"), finish="length"),
        Reply(("<think>Thought.</think>", "\n\n"), finish="stop"),
        Reply(("\n",), finish="length"),
    ],
    ids=["reasoning-field-at-length", "unclosed-think-at-length", "reasoning-then-nothing", "empty-at-length"],
)
async def test_no_answer_after_thinking_or_at_length_is_one_clear_sentence(
    fake: FakeOpenAIServer, reply: Reply
) -> None:
    fake.script.append(reply)
    async with engine_for(fake) as engine:
        with pytest.raises(ThoughtWithoutAnswerError) as caught:
            await collect(engine.generate(chat_request()))
    assert "max_new_tokens" in caught.value.user_message
    assert len(fake.bodies) == 1


async def test_shown_reasoning_without_an_answer_comes_before_the_sentence(fake: FakeOpenAIServer) -> None:
    fake.script.append(Reply((), reasoning=("Hmm.",), finish="length"))
    async with engine_for(fake, show_reasoning=True) as engine:
        received: list[str] = []
        with pytest.raises(ThoughtWithoutAnswerError):
            async for delta in engine.generate(chat_request()):
                received.append(delta)
    assert received == ["> *Thinking:* ||Hmm.||\n\n"]  # the reply shows it, then the error's sentence


async def test_an_empty_answer_the_model_chose_still_stands(fake: FakeOpenAIServer) -> None:
    fake.script.extend([Reply(()), Reply(("<think>\n\n</think>\n\n",))])  # an empty think block is no reasoning
    async with engine_for(fake) as engine:
        assert "".join(await collect(engine.generate(chat_request()))).strip() == ""
        assert await collect(engine.generate(chat_request())) == []


# --- whole turns: what history keeps ---------------------------------------------------------------------------


def core_settings(fake: FakeOpenAIServer, tmp_path: Path, **model: object) -> Settings:
    raw = {
        "model": {"name": FAKE_MODEL, "backend": "openai", "base_url": fake.base_url, **model},
        "storage": {"data_dir": str(tmp_path / "data")},
        "chat": {"system_prompt": ""},
    }
    fake.models = [{"id": FAKE_MODEL, "max_model_len": 4096}]
    return settings_from_mapping(raw)


async def turn_text(core: Core, text: str) -> str:
    place = Place(kind="dm", user_id=9)
    async with core.chat.turn(TurnInput(place=place, author_id=9, text=text)) as turn:
        return "".join([d async for d in turn.stream()])


async def test_an_answer_cut_at_length_is_stored_as_the_answer(fake: FakeOpenAIServer, tmp_path: Path) -> None:
    fake.script.append(Reply(("<think>Short.</think>", "The capital", " of France is"), finish="length"))
    async with open_core(core_settings(fake, tmp_path)) as core:
        assert await turn_text(core, "capital?") == "The capital of France is"
        session = await core.store.current(Place(kind="dm", user_id=9))
    assert session is not None
    assert [(m.role, m.status, m.content) for m in session.messages] == [
        ("user", "ok", "capital?"),
        ("assistant", "ok", "The capital of France is"),
    ]


async def test_thinking_without_an_answer_fails_the_turn(fake: FakeOpenAIServer, tmp_path: Path) -> None:
    fake.script.append(Reply(("<think>On and on",), finish="length"))
    async with open_core(core_settings(fake, tmp_path)) as core:
        with pytest.raises(ThoughtWithoutAnswerError):
            await turn_text(core, "think hard")
        session = await core.store.current(Place(kind="dm", user_id=9))
    assert session is not None
    assert [(m.role, m.status) for m in session.messages] == [("user", "failed")]


async def test_shown_reasoning_is_stored_but_not_sent_back_to_the_model(fake: FakeOpenAIServer, tmp_path: Path) -> None:
    fake.script.extend([Reply(("Hi!",), reasoning=("Greet back.",)), Reply(("Fine.",))])
    async with open_core(core_settings(fake, tmp_path, show_reasoning=True)) as core:
        assert await turn_text(core, "hello") == "> *Thinking:* ||Greet back.||\n\nHi!"
        assert await turn_text(core, "how are you?") == "Fine."
    assert fake.bodies[1]["messages"] == [
        {"role": "user", "content": "hello"},
        {"role": "assistant", "content": "Hi!"},
        {"role": "user", "content": "how are you?"},
    ]
