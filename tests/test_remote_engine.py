"""RemoteEngine against a real `transformers serve` (SmolLM2 and the tiny LLaMA) and a scripted fake for failures."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
import torch
from fake_openai import DieAfter, Endless, FakeOpenAIServer, HangUp, Reply, Status
from model_fixtures import llama2_tokenizer_dir
from openai_server import RunningServer, free_port
from transformers import AutoModelForCausalLM, AutoTokenizer

from bot.chat import TurnInput
from bot.config import ModelSettings, settings_from_mapping
from bot.core import open_core
from bot.engine import (
    ChatMessage,
    GenerationRequest,
    MessagePrompt,
    RemoteEngine,
    RetryPolicy,
    SamplingParams,
    TokenPrompt,
)
from bot.engine.remote.text_prompt import prompt_text
from bot.engine.remote.wire import retry_after_seconds
from bot.errors import (
    ConfigError,
    EngineDeadError,
    InvalidPromptError,
    PromptTooLongError,
    QueueFullError,
    ServerBrokeOffError,
    ServerRefusedError,
    ServerUnreachableError,
)
from bot.render import Exchange, Llama2Format
from bot.sessions import Place

FAST = RetryPolicy(attempts=4, base_delay=0.01, max_delay=0.05, max_retry_after=1.0, cooldown=60.0, connect_timeout=2)
FRANCE = "What is the capital of France?"


def remote_settings(name: str | Path, urls: list[str], **overrides: object) -> ModelSettings:
    values: dict[str, object] = {"temperature": 0.0, "max_new_tokens": 24, "request_timeout": 30.0}
    values.update(overrides)
    return ModelSettings(name=str(name), backend="openai", base_url=tuple(urls), **values)  # type: ignore[arg-type]


def chat_request(text: str = FRANCE, max_new_tokens: int = 24) -> GenerationRequest:
    return GenerationRequest(
        MessagePrompt((ChatMessage("user", text),)), sampling=SamplingParams(max_new_tokens=max_new_tokens)
    )


async def collect(stream: AsyncIterator[str]) -> list[str]:
    return [delta async for delta in stream]


@pytest.fixture
def server(openai_server: RunningServer) -> RunningServer:
    """The session's `transformers serve` (tests/conftest.py); it serves SmolLM2 and the tiny LLaMA."""
    return openai_server


@pytest.fixture
async def fake() -> AsyncIterator[FakeOpenAIServer]:
    server = FakeOpenAIServer()
    await server.start()
    yield server
    await server.stop()


def fake_engine(urls: list[str], **overrides: object) -> RemoteEngine:
    # A path that is no model: no tokenizer, so prompts go as messages; the context length comes from settings.
    values: dict[str, object] = {"context_length": 2048}
    values.update(overrides)
    return RemoteEngine(remote_settings("/nonexistent/fake-model", urls, **values), api_key="sk-test", retry=FAST)


def dead_url() -> str:
    return f"http://127.0.0.1:{free_port()}"  # nothing listens there: connection refused


# --- the real server ---------------------------------------------------------------------------------------


@pytest.mark.real_model
async def test_streamed_chat_answer_names_paris_and_matches_the_non_streamed_one(
    server: RunningServer, smollm2_dir: Path
) -> None:
    async with RemoteEngine(remote_settings(smollm2_dir, [server.base_url]), api_key=None, retry=FAST) as engine:
        assert engine.accepts_messages  # SmolLM2 has a chat template: the server applies it
        assert engine.tokenizer is not None
        assert engine.context_length == 8192  # from the model's config beside the tokenizer
        deltas = await collect(engine.generate(chat_request()))
        assert engine.running == 0
        assert engine.stats.requests == 1
    streamed = "".join(deltas)
    assert len(deltas) > 1
    assert "Paris" in streamed
    body = {
        "model": str(smollm2_dir),
        "messages": [{"role": "user", "content": FRANCE}],
        "max_tokens": 24,
        "temperature": 0.0,
        "stream": False,
    }
    url = f"{server.base_url}/v1/chat/completions"
    async with aiohttp.ClientSession() as session, session.post(url, json=body) as r:
        whole = (await r.json())["choices"][0]["message"]["content"]
    assert streamed == whole


async def test_llama2_prompt_reaches_the_server_token_for_token(server: RunningServer, tiny_llama_dir: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_dir)
    history = [Exchange("Hi there", "Hello! How can I help?"), Exchange("Count: 1 2 3", "4 5 6")]
    ids = Llama2Format(tokenizer).encode("You are terse.", history, "And then?")
    settings = remote_settings(tiny_llama_dir, [server.base_url], prompt_format="llama2", max_new_tokens=12)
    request = GenerationRequest(TokenPrompt(tuple(ids)), sampling=SamplingParams(max_new_tokens=12))
    async with RemoteEngine(settings, api_key=None, retry=FAST) as engine:
        answer = "".join(await collect(engine.generate(request)))
        # transformers serve takes only text prompts: the engine learned that and fell back to exact text.
        assert engine.pool.replicas[0].accepts_token_ids is False
        assert "".join(await collect(engine.generate(request))) == answer
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), max_new_tokens=12, do_sample=False)
    expected = tokenizer.decode(out[0, len(ids) :], skip_special_tokens=True)
    # A random model answers noise: equal noise means the server ran on exactly our token IDs.
    assert answer.strip() == expected.strip()
    assert answer.strip()


# transformers serve answers 422 to min_tokens and repetition_penalty, on both endpoints.
HELD_BACK = SamplingParams(max_new_tokens=12, min_new_tokens=2, repetition_penalty=1.3)


async def test_transformers_serve_completes_token_ids_once_sent_only_the_fields_it_takes(
    server: RunningServer, tiny_llama_dir: Path
) -> None:
    ids = tuple(AutoTokenizer.from_pretrained(tiny_llama_dir)("Count: 1 2 3").input_ids)
    async with RemoteEngine(remote_settings(tiny_llama_dir, [server.base_url]), api_key=None, retry=FAST) as engine:
        for _ in range(2):
            assert "".join(await collect(engine.generate(GenerationRequest(TokenPrompt(ids), HELD_BACK))))
        replica = engine.pool.replicas[0]
        assert replica.refused_fields == {"min_tokens", "repetition_penalty"}
        assert replica.accepts_token_ids is False


@pytest.mark.real_model
async def test_transformers_serve_chats_once_sent_only_the_fields_it_takes(
    server: RunningServer, smollm2_dir: Path
) -> None:
    chat = GenerationRequest(MessagePrompt((ChatMessage("user", FRANCE),)), HELD_BACK)
    async with RemoteEngine(remote_settings(smollm2_dir, [server.base_url]), api_key=None, retry=FAST) as engine:
        assert "Paris" in "".join(await collect(engine.generate(chat)))
        assert engine.pool.replicas[0].refused_fields == {"min_tokens", "repetition_penalty"}


@pytest.mark.real_model
async def test_a_whole_turn_with_the_openai_backend(server: RunningServer, smollm2_dir: Path, tmp_path: Path) -> None:
    raw = {
        "model": {
            "name": str(smollm2_dir),
            "backend": "openai",
            "base_url": [server.base_url],
            "temperature": 0.0,
            "max_new_tokens": 24,
        },
        "storage": {"data_dir": str(tmp_path / "data")},
        "chat": {"system_prompt": ""},  # the 135M model answers this one best without a system prompt
    }
    settings = settings_from_mapping(raw)
    async with open_core(settings) as core:
        assert isinstance(core.engine, RemoteEngine)
        place = Place(kind="dm", user_id=7)
        async with core.chat.turn(TurnInput(place=place, author_id=7, text=FRANCE)) as turn:
            answer = "".join([d async for d in turn.stream()])
        assert "Paris" in answer
        assert turn.session.exchanges()[-1] == (FRANCE, answer.strip())


# --- prompts as text ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("adds_bos", [False, True], ids=["tokenizer-without-bos", "tokenizer-adds-bos"])
def test_prompt_text_retokenizes_to_the_same_ids(adds_bos: bool) -> None:
    # The same re-tokenization a text-only server does: tokenizer(text) with its default special tokens.
    tokenizer = AutoTokenizer.from_pretrained(llama2_tokenizer_dir(), add_bos_token=adds_bos)
    fmt = Llama2Format(tokenizer)
    history = [Exchange("héllo 日本", "code:\n```py\nx=1\n```"), Exchange("  spaced  ", "ok ")]
    ids = fmt.encode("Be brief.", history, "emoji 🙂 and [INST] tags")
    text = prompt_text(tokenizer, ids, tokenizer_adds_bos=adds_bos)
    assert tokenizer(text)["input_ids"] == ids
    assert text.startswith("[INST]" if adds_bos else "<s>[INST]")
    assert text.count("</s><s>[INST]") == 2


def test_retry_after_reads_seconds_and_dates() -> None:
    from datetime import UTC, datetime

    now = datetime(2026, 1, 1, 12, 0, 0, tzinfo=UTC)
    assert retry_after_seconds("2") == 2.0
    assert retry_after_seconds("Thu, 01 Jan 2026 12:00:30 GMT", now=now) == 30.0
    assert retry_after_seconds("soon") is None
    assert retry_after_seconds(None) is None


# --- the scripted fake: faults ------------------------------------------------------------------------------


async def test_token_ids_go_as_a_list_when_the_server_takes_them(fake: FakeOpenAIServer) -> None:
    settings = remote_settings(
        "llama-2-test", [fake.base_url], tokenizer=str(llama2_tokenizer_dir()), context_length=4096
    )
    ids = (1, 518, 25580, 29962, 22172, 518, 29914, 25580, 29962)
    async with RemoteEngine(settings, api_key="sk-test", retry=FAST) as engine:
        request = GenerationRequest(TokenPrompt(ids), sampling=SamplingParams(max_new_tokens=8))
        assert "".join(await collect(engine.generate(request))) == "Hello there!"
        held = SamplingParams(max_new_tokens=8, min_new_tokens=5, repetition_penalty=1.2)
        await collect(engine.generate(GenerationRequest(TokenPrompt(ids), sampling=held)))
    assert fake.paths == ["/v1/completions"] * 2
    assert fake.bodies[0]["prompt"] == list(ids)
    assert fake.bodies[0]["stream"] is True
    assert fake.bodies[0]["max_tokens"] == 8
    assert "min_tokens" not in fake.bodies[0] and "repetition_penalty" not in fake.bodies[0]
    # vLLM's names for what transformers calls min_new_tokens and repetition_penalty.
    assert (fake.bodies[1]["min_tokens"], fake.bodies[1]["repetition_penalty"]) == (5, 1.2)


async def test_the_prompt_type_picks_the_endpoint(fake: FakeOpenAIServer) -> None:
    ids = GenerationRequest(TokenPrompt((1, 22172)), sampling=SamplingParams(max_new_tokens=8))
    async with fake_engine([fake.base_url]) as engine:
        assert engine.accepts_messages
        assert "".join(await collect(engine.generate(ids))) == "Hello there!"
        assert "".join(await collect(engine.generate(chat_request()))) == "Hello there!"
        for empty in (TokenPrompt(()), MessagePrompt(())):
            with pytest.raises(InvalidPromptError, match="empty"):
                await anext(engine.generate(GenerationRequest(empty, SamplingParams(max_new_tokens=8))))
    assert fake.paths == ["/v1/completions", "/v1/chat/completions"]
    assert fake.bodies[0]["prompt"] == [1, 22172]
    assert fake.bodies[1]["messages"] == [{"role": "user", "content": FRANCE}]


HELD = SamplingParams(max_new_tokens=8, min_new_tokens=2, repetition_penalty=1.2)


async def test_fields_a_server_refuses_are_left_out_after_its_first_422(
    fake: FakeOpenAIServer, caplog: pytest.LogCaptureFixture
) -> None:
    fake.refuses = frozenset({"min_tokens", "repetition_penalty"})
    caplog.set_level(logging.INFO, logger="bot.engine")
    async with fake_engine([fake.base_url]) as engine:
        caplog.clear()  # start-up's own lines (no tokenizer for the fake model)
        for _ in range(2):
            request = GenerationRequest(MessagePrompt((ChatMessage("user", "hi"),)), HELD)
            assert "".join(await collect(engine.generate(request))) == "Hello there!"
        assert engine.pool.replicas[0].refused_fields == {"min_tokens", "repetition_penalty"}
    # The first try named both fields; every request after it leaves them out.
    assert [("min_tokens" in body, "repetition_penalty" in body) for body in fake.bodies] == [
        (True, True),
        (False, False),
        (False, False),
    ]
    learned = [r for r in caplog.records if "does not take" in r.getMessage()]
    assert [r.levelno for r in learned] == [logging.INFO]
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


async def test_llama_cpp_gets_its_own_name_for_the_repetition_penalty(fake: FakeOpenAIServer) -> None:
    fake.models = [{"id": "some.gguf", "object": "model", "owned_by": "llamacpp", "meta": {"n_ctx_train": 4096}}]
    async with fake_engine([fake.base_url]) as engine:
        assert engine.pool.replicas[0].llama_cpp
        await collect(engine.generate(GenerationRequest(TokenPrompt((1, 22172)), HELD)))
    assert fake.bodies[0]["repeat_penalty"] == 1.2
    assert "repetition_penalty" not in fake.bodies[0]


async def test_a_pooled_connection_the_server_closed_is_retried_at_once_and_quietly(
    fake: FakeOpenAIServer, caplog: pytest.LogCaptureFixture
) -> None:
    engine = fake_engine([fake.base_url])
    engine.retry = dataclasses.replace(FAST, base_delay=5.0, max_delay=5.0)  # a backoff would show in the time
    async with engine:
        assert await collect(engine.generate(chat_request())) == ["Hello", " there", "!"]  # its connection is pooled
        fake.script.append(HangUp())
        caplog.clear()
        loop = asyncio.get_running_loop()
        began = loop.time()
        assert await collect(engine.generate(chat_request())) == ["Hello", " there", "!"]
        assert loop.time() - began < 2.0
        assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(fake.bodies) == 3


async def test_the_quiet_resend_is_once_then_a_hang_up_is_an_ordinary_retry_with_its_warning(
    fake: FakeOpenAIServer, caplog: pytest.LogCaptureFixture
) -> None:
    async with fake_engine([fake.base_url]) as engine:  # start-up's GET /v1/models leaves a pooled connection
        fake.script.extend([HangUp(), HangUp()])  # the pooled connection's, then the fresh one's
        assert await collect(engine.generate(chat_request())) == ["Hello", " there", "!"]
    assert len(fake.bodies) == 3
    retried = [r for r in caplog.records if r.levelno == logging.WARNING and "try 2" in r.getMessage()]
    assert len(retried) == 1


def llama_cpp_overflow(prompt_tokens: int, n_ctx: int) -> Status:
    error = {
        "code": 400,
        "message": "the request exceeds the available context size, try increasing it",
        "type": "exceed_context_size_error",
        "n_prompt_tokens": prompt_tokens,
        "n_ctx": n_ctx,
    }
    return Status(400, body=json.dumps({"error": error}))


async def test_a_llama_cpp_slot_smaller_than_the_prompt_is_a_prompt_too_long(
    fake: FakeOpenAIServer, caplog: pytest.LogCaptureFixture
) -> None:
    fake.script.extend([llama_cpp_overflow(1500, 1024), llama_cpp_overflow(1600, 1024)])
    async with fake_engine([fake.base_url]) as engine:
        caplog.clear()
        for prompt_tokens in (1500, 1600):
            with pytest.raises(PromptTooLongError) as caught:
                await collect(engine.generate(chat_request(max_new_tokens=24)))
            assert (caught.value.message_tokens, caught.value.limit_tokens) == (prompt_tokens, 1024 - 24)
            assert "too long" in caught.value.user_message
    assert len(fake.bodies) == 2  # not retried
    warned = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warned) == 1 and "1024" in warned[0].getMessage()


async def test_a_refused_replica_fails_over_to_the_live_one(fake: FakeOpenAIServer) -> None:
    dead = dead_url()
    async with fake_engine([dead, fake.base_url]) as engine:
        assert engine.tokenizer is None
        for _ in range(3):
            assert "".join(await collect(engine.generate(chat_request()))) == "Hello there!"
        dead_replica = engine.pool.replicas[0]
        assert not engine.pool.is_live(dead_replica)
    assert len(fake.bodies) == 3
    assert fake.bodies[0]["messages"] == [{"role": "user", "content": FRANCE}]
    assert fake.auth == ["Bearer sk-test"] * 3


async def test_429_and_5xx_are_retried_before_the_first_token(fake: FakeOpenAIServer) -> None:
    fake.script.extend([Status(429, {"Retry-After": "0"}), Status(503), Status(500), Reply(("ok",))])
    async with fake_engine([fake.base_url]) as engine:
        assert await collect(engine.generate(chat_request())) == ["ok"]
    assert len(fake.bodies) == 4


async def test_retries_give_up_with_one_sentence_and_the_engine_keeps_working(fake: FakeOpenAIServer) -> None:
    fake.script.extend([Status(503)] * FAST.attempts)
    async with fake_engine([fake.base_url]) as engine:
        with pytest.raises(ServerUnreachableError):
            await collect(engine.generate(chat_request()))
        assert len(fake.bodies) == FAST.attempts
        assert await collect(engine.generate(chat_request())) == ["Hello", " there", "!"]


async def test_a_client_error_is_not_retried(fake: FakeOpenAIServer) -> None:
    fake.script.append(Status(401, body='{"error": "bad key"}'))
    async with fake_engine([fake.base_url]) as engine:
        with pytest.raises(ServerRefusedError, match="401"):
            await collect(engine.generate(chat_request()))
    assert len(fake.bodies) == 1


async def test_a_server_dying_mid_stream_fails_the_answer_then_another_replica_serves(
    fake: FakeOpenAIServer,
) -> None:
    spare = FakeOpenAIServer()
    await spare.start()
    try:
        fake.script.append(DieAfter(("Half", " an")))
        async with fake_engine([fake.base_url, spare.base_url]) as engine:
            received: list[str] = []
            with pytest.raises(ServerBrokeOffError):
                async for delta in engine.generate(chat_request()):
                    received.append(delta)
            assert received == ["Half", " an"]  # no retry once text has reached the user
            assert len(fake.bodies) == 1
            await fake.stop()  # the crashed server stays down: its port now refuses
            answers = [await collect(engine.generate(chat_request())) for _ in range(2)]
            assert answers == [["Hello", " there", "!"]] * 2
            assert len(spare.bodies) == 2
            assert engine.running == 0
    finally:
        await spare.stop()


async def test_a_restarted_server_is_used_again_after_its_cool_down(fake: FakeOpenAIServer) -> None:
    port = int(fake.base_url.rsplit(":", 1)[1])
    await fake.stop()
    engine = fake_engine([fake.base_url])
    engine.retry = dataclasses.replace(FAST, attempts=1)
    async with engine:
        with pytest.raises(ServerUnreachableError):
            await collect(engine.generate(chat_request()))
        await fake.start(port)
        # Even within the cool-down, a pool whose only replica is down still probes it.
        assert await collect(engine.generate(chat_request())) == ["Hello", " there", "!"]
        assert engine.pool.is_live(engine.pool.replicas[0])


async def test_leaving_the_stream_early_closes_the_connection(fake: FakeOpenAIServer) -> None:
    fake.script.append(Endless())
    async with fake_engine([fake.base_url]) as engine:
        stream = engine.generate(chat_request())
        assert await anext(stream) == "x"
        assert engine.running == 1
        await stream.aclose()
        assert engine.running == 0
        await asyncio.wait_for(fake.client_left.wait(), timeout=10)


async def test_least_loaded_replica_gets_the_next_request(fake: FakeOpenAIServer) -> None:
    other = FakeOpenAIServer()
    await other.start()
    try:
        fake.script.append(Endless())
        other.script.append(Endless())
        async with fake_engine([fake.base_url, other.base_url]) as engine:
            first = engine.generate(chat_request())
            await anext(first)
            busy, idle = (fake, other) if fake.bodies else (other, fake)
            idle.script.clear()  # the idle replica answers the next request normally
            assert await collect(engine.generate(chat_request())) == ["Hello", " there", "!"]
            assert len(idle.bodies) == 1 and len(busy.bodies) == 1
            await first.aclose()
    finally:
        await other.stop()


async def test_queue_full_past_max_queue_in_flight(fake: FakeOpenAIServer) -> None:
    fake.script.append(Endless())
    async with fake_engine([fake.base_url], max_queue=1) as engine:
        first = engine.generate(chat_request())
        await anext(first)
        with pytest.raises(QueueFullError):
            await anext(engine.generate(chat_request()))
        await first.aclose()
        assert await collect(engine.generate(chat_request())) == ["Hello", " there", "!"]


async def test_close_ends_open_streams_with_engine_dead(fake: FakeOpenAIServer) -> None:
    fake.script.append(Endless())
    engine = fake_engine([fake.base_url])
    await engine.start()
    stream = engine.generate(chat_request())
    await anext(stream)
    await engine.close()
    with pytest.raises(EngineDeadError):
        await collect(stream)
    with pytest.raises(EngineDeadError):
        await anext(engine.generate(chat_request()))


async def test_context_length_comes_from_the_server_listing(fake: FakeOpenAIServer) -> None:
    fake.models = [{"id": "/nonexistent/fake-model", "object": "model", "max_model_len": 1024}]
    async with fake_engine([fake.base_url], context_length=None) as engine:
        assert engine.context_length == 1024
        too_long = GenerationRequest(TokenPrompt((1,) * 1010), sampling=SamplingParams(max_new_tokens=24))
        with pytest.raises(PromptTooLongError):
            await anext(engine.generate(too_long))


async def test_no_tokenizer_and_no_context_length_is_a_clear_start_up_error(fake: FakeOpenAIServer) -> None:
    with pytest.raises(ConfigError, match=r"model\.context_length"):
        async with fake_engine([fake.base_url], context_length=None):
            pass


async def test_a_turn_without_a_tokenizer_sends_the_conversation_as_messages(
    fake: FakeOpenAIServer, tmp_path: Path
) -> None:
    raw = {
        "model": {"name": "/nonexistent/fake-model", "backend": "openai", "base_url": fake.base_url},
        "storage": {"data_dir": str(tmp_path / "data")},
        "chat": {"system_prompt": "Be kind."},
    }
    fake.models = [{"id": "/nonexistent/fake-model", "max_model_len": 4096}]
    async with open_core(settings_from_mapping(raw)) as core:
        assert core.renderer.format is None
        place = Place(kind="dm", user_id=8)
        for text in ("first", "second"):
            async with core.chat.turn(TurnInput(place=place, author_id=7, text=text)) as turn:
                assert "".join([d async for d in turn.stream()]) == "Hello there!"
    assert fake.bodies[1]["messages"] == [
        {"role": "system", "content": "Be kind."},
        {"role": "user", "content": "first"},
        {"role": "assistant", "content": "Hello there!"},
        {"role": "user", "content": "second"},
    ]
