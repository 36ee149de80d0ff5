"""LocalEngine on a tiny random-weight LLaMA: streaming, batching, per-row stops, cancellation, failures
(out-of-memory splits included) and the fair order of waiting requests."""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from script_model import build_script_llama
from transformers import AutoModelForCausalLM, AutoTokenizer

from bot.config import ModelSettings
from bot.engine import ChatMessage, GenerationRequest, LocalEngine, MessagePrompt, SamplingParams, TokenPrompt
from bot.engine.local.output import RequestStream
from bot.engine.local.queue import FairQueue
from bot.engine.local.source import ModelNotFoundError
from bot.errors import (
    EngineDeadError,
    GenerationFailedError,
    InvalidPromptError,
    ModelOutOfMemoryError,
    PromptTooLongError,
    QueueFullError,
)

PROMPTS = (
    "Hello, how are you?",
    "Tell me a long story about dragons and castles.",
    "a",
    "The capital of France is",
)
WAIT_S = 30.0


def model_settings(model_dir: Path, **overrides: Any) -> ModelSettings:
    return ModelSettings(name=str(model_dir), dtype="float32", device_map="cpu", **overrides)


@pytest.fixture
async def engine(tiny_llama_dir: Path) -> AsyncIterator[LocalEngine]:
    async with LocalEngine(model_settings(tiny_llama_dir)) as engine:
        yield engine


@pytest.fixture(scope="module")
def reference(tiny_llama_dir: Path) -> Callable[[tuple[int, ...], int], str]:
    """Greedy text of one prompt run alone through model.generate, without the engine."""
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32).eval()

    def run(prompt_ids: tuple[int, ...], max_new_tokens: int) -> str:
        out = model.generate(torch.tensor([prompt_ids]), max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=0)
        return tokenizer.decode(out[0, len(prompt_ids) :], skip_special_tokens=True)

    return run


@pytest.fixture(scope="module")
def prompt_ids(tiny_llama_dir: Path) -> list[tuple[int, ...]]:
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_dir)
    return [tuple(tokenizer(text).input_ids) for text in PROMPTS]


def request(ids: tuple[int, ...], max_new_tokens: int = 12, **sampling: float) -> GenerationRequest:
    return GenerationRequest(TokenPrompt(ids), sampling=SamplingParams(max_new_tokens=max_new_tokens, **sampling))


async def collect(engine: LocalEngine, req: GenerationRequest) -> list[str]:
    return [delta async for delta in engine.generate(req)]


async def until(condition: Callable[[], bool]) -> None:
    """Wait for the worker thread to reach a state; the deadline only keeps a broken engine from hanging."""
    async with asyncio.timeout(WAIT_S):
        # The state lives on the worker thread, which has no asyncio.Event to set: poll it.
        while not condition():  # noqa: ASYNC110
            await asyncio.sleep(0.005)


class Gate:
    """A forward pre-hook that counts the model's forward calls and holds the worker on call `at`."""

    def __init__(self, model: torch.nn.Module, at: int = 1) -> None:
        self.calls = 0
        self.at = at
        self.entered = threading.Event()
        self.opened = threading.Event()
        self._handle = model.register_forward_pre_hook(self._hook)

    def _hook(self, module: torch.nn.Module, args: object) -> None:
        self.calls += 1
        if self.calls == self.at:
            self.entered.set()
            self.opened.wait(WAIT_S)

    async def wait_entered(self) -> None:
        assert await asyncio.to_thread(self.entered.wait, WAIT_S)

    def open(self) -> None:
        self.opened.set()

    def remove(self) -> None:
        self.opened.set()
        self._handle.remove()


@contextlib.contextmanager
def raising_hook(model: torch.nn.Module, error: BaseException, on_call: int) -> Iterator[None]:
    calls = 0

    def hook(module: torch.nn.Module, args: object) -> None:
        nonlocal calls
        calls += 1
        if calls == on_call:
            raise error

    handle = model.register_forward_pre_hook(hook)
    try:
        yield
    finally:
        handle.remove()


async def hold_worker(engine: LocalEngine) -> tuple[Gate, asyncio.Task[list[str]]]:
    """Occupy the worker with a one-token request, so the requests that follow queue up behind it."""
    gate = Gate(engine.model)
    blocker = asyncio.create_task(collect(engine, request((1, 15043), max_new_tokens=1)))
    await gate.wait_entered()
    return gate, blocker


def test_sampling_params_from_settings_and_validation() -> None:
    settings = ModelSettings(max_new_tokens=64, temperature=0.5, top_p=0.8, repetition_penalty=1.1)
    assert SamplingParams.from_settings(settings) == SamplingParams(64, 0.5, 0.8, 1.1)
    assert SamplingParams(8).greedy
    with pytest.raises(ValueError, match="max_new_tokens"):
        SamplingParams(0)
    with pytest.raises(ValueError, match="top_p"):
        SamplingParams(8, top_p=0.0)
    with pytest.raises(ValueError, match="min_new_tokens"):
        SamplingParams(8, min_new_tokens=9)


async def test_min_new_tokens_holds_off_eos_as_generate_does(tmp_path: Path) -> None:
    folder = build_script_llama(tmp_path / "model", "Short answer.", then_eos=True)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    prompt = tuple(tokenizer("Hi").input_ids)

    def generate(**limits: int) -> str:
        out = model.generate(torch.tensor([prompt]), do_sample=False, **limits)
        return tokenizer.decode(out[0, len(prompt) :], skip_special_tokens=True)

    async with LocalEngine(model_settings(folder)) as engine:
        plain = "".join(await collect(engine, request(prompt, max_new_tokens=20)))
        held = "".join(await collect(engine, request(prompt, max_new_tokens=20, min_new_tokens=12)))
        # Two rows in one batch, only one of them held: the other still ends at its EOS.
        both = await asyncio.gather(
            collect(engine, request(prompt, max_new_tokens=20, min_new_tokens=12)),
            collect(engine, request(prompt, max_new_tokens=20)),
        )
    assert plain == generate(max_new_tokens=20) == "Short answer."
    assert held == generate(max_new_tokens=20, min_new_tokens=12)
    assert held.startswith("Short answer.") and len(held) > len(plain)
    assert ["".join(d) for d in both] == [held, plain]


async def test_engine_reports_model_and_context(engine: LocalEngine, tiny_llama_dir: Path) -> None:
    assert engine.model_name == str(tiny_llama_dir)
    assert engine.context_length == 512  # the config's max_position_embeddings
    assert engine.tokenizer.eos_token_id == 2
    assert (engine.waiting, engine.running) == (0, 0)


async def test_stream_equals_plain_greedy_generate(
    engine: LocalEngine, prompt_ids: list[tuple[int, ...]], reference: Callable[..., str]
) -> None:
    for ids in prompt_ids[:2]:
        deltas = await collect(engine, request(ids, max_new_tokens=40))
        assert len(deltas) > 5
        assert "".join(deltas) == reference(ids, 40)
        # A delta never ends inside a multi-byte character (the final flush excepted).
        assert not any(d.endswith("\ufffd") for d in deltas[:-1])


async def test_waiting_requests_run_as_one_batch_and_match_solo_runs(
    engine: LocalEngine, prompt_ids: list[tuple[int, ...]], reference: Callable[..., str]
) -> None:
    gate, blocker = await hold_worker(engine)
    tasks = [asyncio.create_task(collect(engine, request(ids, max_new_tokens=16))) for ids in prompt_ids]
    await until(lambda: engine.waiting == len(prompt_ids))
    gate.remove()
    results = await asyncio.gather(*tasks)
    await blocker

    # Prompts of different lengths were left-padded into one batch; each answer is what it gets alone.
    for ids, deltas in zip(prompt_ids, results, strict=True):
        assert "".join(deltas) == reference(ids, 16)
    assert engine.stats.batches == 2
    assert engine.stats.largest_batch == len(prompt_ids)
    assert engine.stats.requests == len(prompt_ids) + 1


async def test_rows_of_one_batch_stop_at_their_own_max_new_tokens(
    engine: LocalEngine, prompt_ids: list[tuple[int, ...]], reference: Callable[..., str]
) -> None:
    limits = (3, 25, 9, 14)
    gate, blocker = await hold_worker(engine)
    tasks = [
        asyncio.create_task(collect(engine, request(ids, max_new_tokens=n)))
        for ids, n in zip(prompt_ids, limits, strict=True)
    ]
    await until(lambda: engine.waiting == len(limits))
    gate.remove()
    results = await asyncio.gather(*tasks)
    await blocker

    assert engine.stats.largest_batch == len(limits)
    for ids, n, deltas in zip(prompt_ids, limits, results, strict=True):
        assert "".join(deltas) == reference(ids, n)
    texts = ["".join(deltas) for deltas in results]
    assert len(texts[0]) < len(texts[1])


async def test_requests_with_other_sampling_share_the_batch_and_keep_their_own_params(
    engine: LocalEngine, prompt_ids: list[tuple[int, ...]], reference: Callable[..., str]
) -> None:
    gate, blocker = await hold_worker(engine)
    greedy_a = asyncio.create_task(collect(engine, request(prompt_ids[0])))
    sampled = asyncio.create_task(collect(engine, request(prompt_ids[1], temperature=0.8, top_p=0.9)))
    greedy_b = asyncio.create_task(collect(engine, request(prompt_ids[2])))
    await until(lambda: engine.waiting == 3)
    gate.remove()
    a, s, b = await asyncio.gather(greedy_a, sampled, greedy_b)
    await blocker

    assert engine.stats.batches == 2  # the blocker, then all three together
    assert engine.stats.largest_batch == 3
    # Sampling one row does not change the greedy rows beside it.
    assert "".join(a) == reference(prompt_ids[0], 12)
    assert "".join(b) == reference(prompt_ids[2], 12)
    assert "".join(s)


async def test_a_request_joins_the_running_batch_between_steps(
    engine: LocalEngine, prompt_ids: list[tuple[int, ...]], reference: Callable[..., str]
) -> None:
    counter = Gate(engine.model, at=6)  # holds the first request in its fifth decode step
    first = asyncio.create_task(collect(engine, request(prompt_ids[1], max_new_tokens=30)))
    await counter.wait_entered()
    second = asyncio.create_task(collect(engine, request(prompt_ids[3], max_new_tokens=10)))
    await until(lambda: engine.waiting == 1)
    counter.remove()
    a, b = await asyncio.gather(first, second)

    assert "".join(a) == reference(prompt_ids[1], 30)
    assert "".join(b) == reference(prompt_ids[3], 10)
    # The second started while the first ran: the two shared decode steps instead of running one after the other.
    assert engine.stats.largest_batch == 2
    assert engine.stats.batches == 2
    assert counter.calls < 30 + 10


async def test_breaking_out_of_a_stream_drops_the_request(
    engine: LocalEngine, prompt_ids: list[tuple[int, ...]], reference: Callable[..., str]
) -> None:
    gate, blocker = await hold_worker(engine)
    counter = Gate(engine.model, at=10)  # holds the batch mid-way until the first stream has left

    async def read_two_then_leave() -> list[str]:
        got: list[str] = []
        async with contextlib.aclosing(engine.generate(request(prompt_ids[1], max_new_tokens=400))) as stream:
            async for delta in stream:
                got.append(delta)
                if len(got) == 2:
                    break
        return got

    leaver = asyncio.create_task(read_two_then_leave())
    stayer = asyncio.create_task(collect(engine, request(prompt_ids[0], max_new_tokens=20)))
    await until(lambda: engine.waiting == 2)
    gate.remove()
    await counter.wait_entered()
    assert len(await leaver) == 2
    counter.open()
    assert "".join(await stayer) == reference(prompt_ids[0], 20)
    await blocker
    counter.remove()

    # The batch ended with the stayer's 20th token instead of running to the leaver's 400.
    assert counter.calls == 20
    assert engine.stats.largest_batch == 2
    assert (engine.waiting, engine.running) == (0, 0)


async def test_cancelling_the_consumer_task_drops_the_request(
    engine: LocalEngine, prompt_ids: list[tuple[int, ...]], reference: Callable[..., str]
) -> None:
    gate, blocker = await hold_worker(engine)
    counter = Gate(engine.model, at=10)
    first_delta = asyncio.Event()

    async def consume() -> None:
        async for _ in engine.generate(request(prompt_ids[1], max_new_tokens=400)):
            first_delta.set()

    victim = asyncio.create_task(consume())
    other = asyncio.create_task(collect(engine, request(prompt_ids[2], max_new_tokens=20)))
    await until(lambda: engine.waiting == 2)
    gate.remove()
    await counter.wait_entered()
    await first_delta.wait()
    victim.cancel()
    with pytest.raises(asyncio.CancelledError):
        await victim
    counter.open()
    assert "".join(await other) == reference(prompt_ids[2], 20)
    await blocker
    counter.remove()
    assert counter.calls == 20


async def test_cancelling_a_waiting_request_removes_it_from_the_queue(
    engine: LocalEngine, prompt_ids: list[tuple[int, ...]]
) -> None:
    gate, blocker = await hold_worker(engine)
    waiter = asyncio.create_task(collect(engine, request(prompt_ids[0])))
    await until(lambda: engine.waiting == 1)
    waiter.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiter
    assert engine.waiting == 0
    gate.remove()
    await blocker
    assert engine.stats.batches == 1


async def test_full_queue_refuses_at_once(
    tiny_llama_dir: Path, prompt_ids: list[tuple[int, ...]], reference: Callable[..., str]
) -> None:
    async with LocalEngine(model_settings(tiny_llama_dir, max_queue=2)) as engine:
        gate, blocker = await hold_worker(engine)
        queued = [asyncio.create_task(collect(engine, request(ids))) for ids in prompt_ids[:2]]
        await until(lambda: engine.waiting == 2)
        with pytest.raises(QueueFullError):
            await anext(engine.generate(request(prompt_ids[2])))
        assert engine.waiting == 2
        gate.remove()
        results = await asyncio.gather(*queued)
        await blocker
        assert ["".join(r) for r in results] == [reference(ids, 12) for ids in prompt_ids[:2]]


async def test_prompt_too_long_is_refused_before_the_worker(
    engine: LocalEngine, prompt_ids: list[tuple[int, ...]], reference: Callable[..., str]
) -> None:
    too_long = (1,) + (15043,) * (512 - 100)
    with pytest.raises(PromptTooLongError) as info:
        await collect(engine, request(too_long, max_new_tokens=100))
    assert (info.value.message_tokens, info.value.limit_tokens) == (len(too_long), 412)
    with pytest.raises(InvalidPromptError, match="vocabulary"):
        await collect(engine, request((1, 32000)))
    with pytest.raises(InvalidPromptError, match="empty"):
        await collect(engine, request(()))
    messages = GenerationRequest(MessagePrompt((ChatMessage("user", "hi"),)), SamplingParams(max_new_tokens=4))
    assert not engine.accepts_messages
    with pytest.raises(InvalidPromptError, match="token IDs"):
        await collect(engine, messages)
    assert "".join(await collect(engine, request(prompt_ids[0]))) == reference(prompt_ids[0], 12)


async def test_model_error_fails_the_batch_and_the_engine_keeps_serving(
    engine: LocalEngine, prompt_ids: list[tuple[int, ...]], reference: Callable[..., str]
) -> None:
    got: list[str] = []
    boom = RuntimeError("boom on step 5")
    with raising_hook(engine.model, boom, on_call=5), pytest.raises(GenerationFailedError) as info:
        async for delta in engine.generate(request(prompt_ids[0], max_new_tokens=30)):
            got.append(delta)
    assert info.value.__cause__ is boom
    assert got  # the first four tokens had been streamed
    assert "".join(await collect(engine, request(prompt_ids[0]))) == reference(prompt_ids[0], 12)


class WorkerKilled(BaseException):
    """Stands in for what no batch handler catches (KeyboardInterrupt, SystemExit)."""


async def test_dead_worker_fails_open_and_future_streams(
    engine: LocalEngine, prompt_ids: list[tuple[int, ...]]
) -> None:
    with raising_hook(engine.model, WorkerKilled(), on_call=3), pytest.raises(EngineDeadError, match="died"):
        await collect(engine, request(prompt_ids[0], max_new_tokens=30))
    with pytest.raises(EngineDeadError):
        await collect(engine, request(prompt_ids[0]))


async def test_close_fails_running_and_waiting_streams(engine: LocalEngine, prompt_ids: list[tuple[int, ...]]) -> None:
    gate = Gate(engine.model, at=3)
    running = asyncio.create_task(collect(engine, request(prompt_ids[0], max_new_tokens=100)))
    await gate.wait_entered()
    waiting = asyncio.create_task(collect(engine, request(prompt_ids[1])))
    await until(lambda: engine.waiting == 1)
    closing = asyncio.create_task(engine.close())
    await asyncio.sleep(0)  # let close() mark the engine as closing before the worker moves on
    gate.remove()
    await closing
    for task in (running, waiting):
        with pytest.raises(EngineDeadError):
            await task
    with pytest.raises(EngineDeadError, match="closed"):
        await collect(engine, request(prompt_ids[0]))


async def test_generate_after_close_raises_engine_dead(engine: LocalEngine, prompt_ids: list[tuple[int, ...]]) -> None:
    assert await collect(engine, request(prompt_ids[0], max_new_tokens=2))
    await engine.close()
    with pytest.raises(EngineDeadError):
        await collect(engine, request(prompt_ids[0]))


async def test_engine_not_started_raises_engine_dead(tiny_llama_dir: Path) -> None:
    engine = LocalEngine(model_settings(tiny_llama_dir))
    with pytest.raises(EngineDeadError, match="not started"):
        await collect(engine, request((1, 2, 3)))


async def test_start_raises_what_loading_raised(tmp_path: Path) -> None:
    engine = LocalEngine(model_settings(tmp_path / "missing"))
    with pytest.raises(ModelNotFoundError) as caught:
        await engine.start()
    await engine.close()
    assert caught.value.key == "model.name" and "there is no folder" in caught.value.problem


class OutOfMemory:
    """A forward pre-hook that raises torch.OutOfMemoryError as a GPU would: on calls over more than `max_rows`
    rows from call `from_call` on, and on any call holding a position at or past `max_position`."""

    def __init__(
        self, model: torch.nn.Module, *, max_rows: int = 1 << 30, from_call: int = 1, max_position: int = 1 << 30
    ):
        self.calls = 0
        self.raised = 0
        self.max_rows = max_rows
        self.from_call = from_call
        self.max_position = max_position
        self._handle = model.register_forward_pre_hook(self._hook, with_kwargs=True)

    def _hook(self, module: torch.nn.Module, args: object, kwargs: dict[str, Any]) -> None:
        self.calls += 1
        rows = kwargs["input_ids"].shape[0]
        too_many = self.calls >= self.from_call and rows > self.max_rows
        if too_many or int(kwargs["position_ids"].max()) >= self.max_position:
            self.raised += 1
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")

    def remove(self) -> None:
        self._handle.remove()


@pytest.mark.parametrize(
    ("from_call", "max_rows"),
    [(1, 1), (3, 2)],
    ids=["prefill-split-to-single-rows", "decode-split-in-halves-mid-generation"],
)
async def test_out_of_memory_splits_the_batch_and_answers_as_without_it(
    engine: LocalEngine,
    prompt_ids: list[tuple[int, ...]],
    reference: Callable[..., str],
    from_call: int,
    max_rows: int,
) -> None:
    gate, blocker = await hold_worker(engine)
    oom = OutOfMemory(engine.model, max_rows=max_rows, from_call=from_call)
    tasks = [asyncio.create_task(collect(engine, request(ids, max_new_tokens=16))) for ids in prompt_ids]
    await until(lambda: engine.waiting == len(prompt_ids))
    gate.remove()
    results = await asyncio.gather(*tasks)
    await blocker
    oom.remove()

    assert oom.raised > 0
    for ids, deltas in zip(prompt_ids, results, strict=True):
        assert "".join(deltas) == reference(ids, 16)
    assert engine.stats.requests == len(prompt_ids) + 1  # a retried prefill is not a new request
    # Later batches run whole again.
    assert "".join(await collect(engine, request(prompt_ids[0]))) == reference(prompt_ids[0], 12)


async def test_a_row_out_of_memory_alone_fails_with_a_clear_sentence_and_the_others_answer(
    engine: LocalEngine, prompt_ids: list[tuple[int, ...]], reference: Callable[..., str]
) -> None:
    limit = 100
    too_big_to_prefill = (1,) + (15043,) * (limit + 20)
    too_big_after_3_tokens = (1,) + (3186,) * (limit - 4)  # positions 0..96: runs out at its 4th decode step
    gate, blocker = await hold_worker(engine)
    oom = OutOfMemory(engine.model, max_position=limit)
    normal = [asyncio.create_task(collect(engine, request(ids, max_new_tokens=16))) for ids in prompt_ids[:3]]
    doomed = [
        asyncio.create_task(collect(engine, request(ids, max_new_tokens=30)))
        for ids in (too_big_to_prefill, too_big_after_3_tokens)
    ]
    await until(lambda: engine.waiting == 5)
    gate.remove()
    results = await asyncio.gather(*normal)
    await blocker
    for task in doomed:
        with pytest.raises(ModelOutOfMemoryError) as info:
            await task
        assert "too big for the GPU's memory right now" in info.value.user_message
    oom.remove()

    for ids, deltas in zip(prompt_ids[:3], results, strict=True):
        assert "".join(deltas) == reference(ids, 16)
    assert (engine.waiting, engine.running) == (0, 0)
    assert "".join(await collect(engine, request(prompt_ids[1]))) == reference(prompt_ids[1], 12)


async def test_a_burst_from_one_session_does_not_starve_another(
    tiny_llama_dir: Path, prompt_ids: list[tuple[int, ...]]
) -> None:
    async with LocalEngine(model_settings(tiny_llama_dir, max_batch_size=1)) as engine:
        gate, blocker = await hold_worker(engine)
        finished: list[str] = []

        async def run(label: str, session: str) -> None:
            req = GenerationRequest(TokenPrompt(prompt_ids[0]), SamplingParams(max_new_tokens=2), session_id=session)
            await collect(engine, req)
            finished.append(label)

        tasks = [asyncio.create_task(run(f"A{i}", "session-a")) for i in range(5)]
        await until(lambda: engine.waiting == 5)
        tasks.append(asyncio.create_task(run("B", "session-b")))
        await until(lambda: engine.waiting == 6)
        gate.remove()
        await asyncio.gather(blocker, *tasks)

    # One at a time (max_batch_size 1), so the order they finished in is the order they ran in.
    assert finished == ["A0", "B", "A1", "A2", "A3", "A4"]


async def test_fair_queue_serves_the_group_served_least_recently_first() -> None:
    loop = asyncio.get_running_loop()

    def stream(session: str | None) -> RequestStream:
        return RequestStream(
            GenerationRequest(TokenPrompt((1, 2)), SamplingParams(1), session_id=session), (1, 2), loop
        )

    queue = FairQueue()
    a1, a2, a3, anonymous, b1 = stream("a"), stream("a"), stream("a"), stream(None), stream("b")
    queue.push(a1)
    assert queue.pop() is a1  # still running: "a" counts as just served
    for s in (a2, a3, anonymous, b1):
        queue.push(s)
    assert queue.peek() is anonymous  # never served, and older than b1
    assert [queue.pop(), queue.pop()] == [anonymous, b1]
    queue.forget(a3)  # abandoned while waiting
    assert len(queue) == 1
    assert queue.pop() is a2
    with pytest.raises(IndexError):
        queue.peek()
    for s in (a1, a2, a3, anonymous):
        queue.forget(s)
    # Every "a" request has left: "a" is new again, and comes before "b", whose b1 still runs.
    b2, a4 = stream("b"), stream("a")
    queue.push(b2)
    queue.push(a4)
    assert queue.pop() is a4
