"""Per-session KV reuse: later turns start from the session's cached prefix and answer exactly as without it."""

from __future__ import annotations

import asyncio
from pathlib import Path

import torch

from bot.config import ModelSettings
from bot.engine import GenerationRequest, LocalEngine, SamplingParams, TokenPrompt
from bot.engine.local.kv_store import SlotBatch, common_prefix
from bot.engine.local.session_cache import MIN_SHARED_TOKENS, SessionKVCache
from bot.render import Exchange, Llama2Format

USER_TURNS = (
    "Hello there, who are you?",
    "Tell me about castles.",
    "And dragons?",
    "Summarise all of that in one line.",
)
SYSTEM = "You are a helpful assistant."


def settings(model_dir: Path, budget_mb: int) -> ModelSettings:
    return ModelSettings(name=str(model_dir), dtype="float32", device_map="cpu", kv_cache_budget_mb=budget_mb)


async def converse(engine: LocalEngine, session_id: str, turns: tuple[str, ...], max_new_tokens: int) -> list[str]:
    """Run a chat turn by turn, each prompt re-encoding the history with the answers as text (as bot/chat.py does)."""
    fmt = Llama2Format(engine.tokenizer)
    history: list[Exchange] = []
    answers: list[str] = []
    for user in turns:
        ids = fmt.encode(SYSTEM, history, user)
        request = GenerationRequest(
            TokenPrompt(tuple(ids)), SamplingParams(max_new_tokens=max_new_tokens), session_id=session_id
        )
        answer = "".join([delta async for delta in engine.generate(request)])
        answers.append(answer)
        history.append(Exchange(user=user, assistant=answer.strip()))
    return answers


async def run_sessions(model_dir: Path, budget_mb: int) -> tuple[list[list[str]], LocalEngine]:
    async with LocalEngine(settings(model_dir, budget_mb)) as engine:
        # Three conversations at once, so turns join and leave a running batch while others decode.
        answers = await asyncio.gather(
            converse(engine, "a", USER_TURNS, 20),
            converse(engine, "b", USER_TURNS[1:], 9),
            converse(engine, "c", USER_TURNS[::-1], 14),
        )
    return list(answers), engine


async def test_reused_turns_match_turns_without_reuse(tiny_llama_dir: Path) -> None:
    plain, plain_engine = await run_sessions(tiny_llama_dir, budget_mb=0)
    reused, reuse_engine = await run_sessions(tiny_llama_dir, budget_mb=64)

    assert reused == plain
    assert all(answer for answers in plain for answer in answers)
    assert plain_engine.stats.reused_tokens == 0
    # Every turn after a session's first reused (at least) the previous prompt.
    assert reuse_engine.stats.reused_tokens > 0
    assert reuse_engine.stats.prefilled_tokens < plain_engine.stats.prefilled_tokens / 2


async def test_a_prompt_that_does_not_extend_the_cache_gets_a_fresh_prefill(tiny_llama_dir: Path) -> None:
    async with LocalEngine(settings(tiny_llama_dir, budget_mb=64)) as engine:
        fmt = Llama2Format(engine.tokenizer)
        first = tuple(fmt.encode(SYSTEM, [], "Tell me about castles."))
        other = tuple(fmt.encode(None, [], "Something else entirely"))

        async def answer(ids: tuple[int, ...], session_id: str | None) -> str:
            request = GenerationRequest(TokenPrompt(ids), SamplingParams(max_new_tokens=10), session_id=session_id)
            return "".join([d async for d in engine.generate(request)])

        await answer(first, "s")
        assert engine.stats.cached_sessions == 1
        reused_before = engine.stats.reused_tokens
        shared = common_prefix(first, other)  # BOS and "[INST]"
        assert 0 < shared < 6
        # Same session, a prompt that leaves the cached one after its first tokens: only those are reused.
        assert await answer(other, "s") == await answer(other, None)
        assert engine.stats.reused_tokens == reused_before + shared


def fake_layers(tokens: int, layers: int = 2) -> list[tuple[torch.Tensor, torch.Tensor]]:
    # Value of slot i is i, so a crop can be checked by content.
    slots = torch.arange(tokens, dtype=torch.float32).reshape(1, 1, tokens, 1)
    return [(slots.clone(), slots.clone()) for _ in range(layers)]


def test_session_cache_crops_to_the_common_prefix_and_drops_on_mismatch() -> None:
    cache = SessionKVCache(budget_bytes=10_000)
    cache.put("s", [1, 2, 3, 4, 5], fake_layers(5))
    assert cache.reusable("s", [1, 2, 3, 9, 9, 9]) == 3
    # A prompt equal to the cached tokens still leaves its last token to feed.
    assert cache.reusable("s", [1, 2, 3, 4, 5]) == 4
    taken = cache.take("s", [1, 2, 3, 9])
    assert taken is not None
    assert taken[0][0].flatten().tolist() == [0.0, 1.0, 2.0]
    assert len(cache) == 0  # the running turn owns it now

    cache.put("s", [1, 2, 3], fake_layers(3))
    assert cache.take("s", [7, 2, 3, 4]) is None
    assert len(cache) == 0 and cache.nbytes == 0


def test_session_cache_evicts_least_recently_used_within_budget() -> None:
    one = 2 * 2 * 10 * 4  # 2 layers, keys and values, 10 float32 slots
    cache = SessionKVCache(budget_bytes=3 * one)
    for name in "abc":
        cache.put(name, list(range(10)), fake_layers(10))
    assert cache.take("a", list(range(11))) is not None  # a is used again ...
    cache.put("a", list(range(10)), fake_layers(10))  # ... and handed back as the most recent
    cache.put("d", list(range(10)), fake_layers(10))
    assert len(cache) == 3
    assert cache.nbytes == 3 * one
    assert cache.reusable("b", list(range(11))) == 0  # b was the least recently used
    assert cache.reusable("a", list(range(11))) == 10
    cache.put("huge", list(range(40)), fake_layers(40))  # larger than the whole budget: not kept
    assert cache.reusable("huge", list(range(41))) == 0
    assert len(cache) == 3


def row_cache(values: list[float], layers: int = 2) -> list[tuple[torch.Tensor, torch.Tensor]]:
    slots = torch.tensor(values).reshape(1, 1, len(values), 1)
    return [(slots.clone(), -slots.clone()) for _ in range(layers)]


def test_slot_batch_keeps_each_rows_tokens_through_joins_steps_removals_and_growth() -> None:
    batch = SlotBatch(row_cache([0.0]))
    batch.add([row_cache([1.0, 2.0]), row_cache([3.0])])
    # A longer row joins: the running rows get a hole instead of being moved.
    batch.add([row_cache([4.0, 5.0, 6.0, 7.0])])
    assert (batch.rows, batch.end - batch.start) == (3, 4)
    expected = [[1.0, 2.0], [3.0], [4.0, 5.0, 6.0, 7.0]]
    for step in range(100):  # past the first capacity, so the buffers grow and compact
        batch.step_mask()
        value = 10.0 + step
        for layer in batch.cache.layers:
            layer.update(torch.full((batch.rows, 1, 1, 1), value), torch.full((batch.rows, 1, 1, 1), -value))
        batch.advance(1)
        for row in expected:
            row.append(value)
        if step == 50:
            assert batch.row_layers(0)[1][0].flatten().tolist() == expected[0]
            batch.remove(0)  # the last row moves into its place
            expected = [expected[2], expected[1]]
    for i, row in enumerate(expected):
        keys, values = batch.row_layers(i)[0]
        assert keys.flatten().tolist() == row
        assert values.flatten().tolist() == [-x for x in row]
    assert int(batch.step_mask().sum()) == sum(len(row) + 1 for row in expected)


def test_shared_prefix_is_reused_across_sessions_and_never_handed_out() -> None:
    cache = SessionKVCache(budget_bytes=100_000)
    head = list(range(100, 100 + MIN_SHARED_TOKENS + 4))
    cache.share(head, fake_layers(len(head)))
    assert len(cache) == 0  # not a session
    prompt = [*head[:-2], 7, 8]
    assert cache.reusable("new", prompt) == len(head) - 2
    taken = cache.take("new", prompt)
    assert taken is not None and taken[0][0].flatten().tolist() == [float(i) for i in range(len(head) - 2)]
    assert cache.reusable("other", prompt) == len(head) - 2  # still there for the next one
    assert cache.reusable("short", [*head[: MIN_SHARED_TOKENS - 1], 1]) == 0  # too short a match to bother


async def test_prompts_with_a_common_head_share_its_prefill_and_answer_as_alone(tiny_llama_dir: Path) -> None:
    fmt_system = SYSTEM * 4  # a long shared system prompt
    async with LocalEngine(settings(tiny_llama_dir, budget_mb=64)) as engine:
        fmt = Llama2Format(engine.tokenizer)
        prompts = [tuple(fmt.encode(fmt_system, [], user)) for user in USER_TURNS]

        async def answer(ids: tuple[int, ...]) -> str:
            request = GenerationRequest(TokenPrompt(ids), SamplingParams(max_new_tokens=12))
            return "".join([d async for d in engine.generate(request)])

        together = await asyncio.gather(*(answer(p) for p in prompts))
        assert engine.stats.reused_tokens >= (len(prompts) - 1) * MIN_SHARED_TOKENS
    async with LocalEngine(settings(tiny_llama_dir, budget_mb=0)) as plain:
        alone = [
            "".join(
                [d async for d in plain.generate(GenerationRequest(TokenPrompt(p), SamplingParams(max_new_tokens=12)))]
            )
            for p in prompts
        ]
        assert plain.stats.reused_tokens == 0
    assert together == alone
