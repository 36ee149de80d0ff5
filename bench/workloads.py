"""The benchmark's chat workloads: each runs ours, the baseline and the peers on the same prompts and adds table rows.

`Ours` and a peer (peers.py) share one signature, `answer(prompt_ids, max_new_tokens, session_id, min_new_tokens)`,
so each workload runs any of them the same way: ours first, then the baseline, then each peer in turn, never two
at once (they share the machine's cores).
"""

from __future__ import annotations

import asyncio
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from bench.results import Results, ratio
from bot.engine import GenerationRequest, LocalEngine, SamplingParams, TokenPrompt

if TYPE_CHECKING:
    from bench.baseline import BaselineProcess
    from bench.limits import Limits
    from bench.peers import Peer
    from bot.render import Exchange, PromptFormat

TOPICS = (
    "castles",
    "the ocean",
    "volcanoes",
    "bread baking",
    "chess openings",
    "honey bees",
    "the moon landing",
    "jazz music",
    "rainforests",
    "steam engines",
    "origami",
    "black holes",
    "the Roman empire",
    "coffee",
    "glaciers",
    "electric cars",
)
FOLLOW_UPS = (
    "Tell me about {t} in two sentences.",
    "What is the most surprising fact about {t}?",
    "How would you explain {t} to a child?",
    "Name three words you link with {t}.",
    "What is a common mistake people make about {t}?",
    "Give me one question to ask an expert on {t}.",
)
FILLER = (
    "Here is some background I wrote down earlier, please keep it in mind: the old mill by the river was built "
    "in stone, it had a wooden wheel, and the village grew around it over two hundred years. "
)


@dataclass(frozen=True)
class Answer:
    text: str
    tokens: int
    seconds: float
    first_token_s: float

    @property
    def decode_tokens_per_s(self) -> float:
        """The answer's tokens after its first over the time after the first: decoding alone, prefill left out."""
        return (self.tokens - 1) / (self.seconds - self.first_token_s) if self.tokens > 1 else 0.0


class Runner(Protocol):
    """Ours, or a peer: answers a token-ID prompt and measures it."""

    async def answer(
        self, prompt_ids: Sequence[int], max_new_tokens: int, session_id: str | None = None, min_new_tokens: int = 0
    ) -> Answer: ...


class Ours:
    """Runs requests through the engine and measures them."""

    def __init__(self, engine: LocalEngine) -> None:
        self.engine = engine

    async def answer(
        self, prompt_ids: Sequence[int], max_new_tokens: int, session_id: str | None = None, min_new_tokens: int = 0
    ) -> Answer:
        sampling = SamplingParams(max_new_tokens=max_new_tokens, min_new_tokens=min_new_tokens)
        request = GenerationRequest(TokenPrompt(tuple(prompt_ids)), sampling, session_id)
        start = time.perf_counter()
        first = 0.0
        parts: list[str] = []
        async for delta in self.engine.generate(request):
            if not parts:
                first = time.perf_counter() - start
            parts.append(delta)
        text = "".join(parts)
        tokenizer = self.engine.tokenizer
        assert tokenizer is not None  # set by start()
        tokens = len(await asyncio.to_thread(tokenizer.encode, text, add_special_tokens=False))
        return Answer(text, tokens, time.perf_counter() - start, first)


async def encode(fmt: PromptFormat, history: Sequence[Exchange], user: str) -> list[int]:
    # Off the event loop, as bot/chat.py does: a long history's chat template takes milliseconds.
    return await asyncio.to_thread(fmt.encode, None, history, user)


def same_answers(ours: Sequence[str], theirs: Sequence[str]) -> str:
    return f"{sum(a.strip() == b.strip() for a, b in zip(ours, theirs, strict=True))}/{len(ours)}"


def with_share(value: float, limits: Limits | None, rows: int) -> str:
    """A decode figure, with its share of the machine's limit for `rows` rows (limits.py) when measured."""
    return f"{value:.1f}" if limits is None else f"{value:.1f} ({limits.share(value, rows)})"


async def workload1(
    res: Results,
    ours: Ours,
    base: BaselineProcess,
    fmt: PromptFormat,
    *,
    chats: int,
    max_new_tokens: int,
    peers: Sequence[Peer] = (),
    limits: Limits | None = None,
) -> None:
    """`chats` chats send one message each at the same time."""
    prompts = [await encode(fmt, [], FOLLOW_UPS[0].format(t=TOPICS[i % len(TOPICS)])) for i in range(chats)]

    async def at_once(runner: Runner) -> tuple[list[Answer], float]:
        start = time.perf_counter()
        answers = await asyncio.gather(*(runner.answer(p, max_new_tokens) for p in prompts))
        seconds = time.perf_counter() - start
        return answers, sum(a.tokens for a in answers) / seconds

    answers, ours_tps = await at_once(ours)
    base_answers = [await asyncio.to_thread(base.answer, p, max_new_tokens) for p in prompts]
    base_tps = sum(a.tokens for a in base_answers) / sum(a.seconds for a in base_answers)
    texts = [a.text for a in answers]
    rates: dict[str, tuple[str, str]] = {}
    same: dict[str, tuple[str, str]] = {}
    for peer in peers:
        peer_answers, peer_tps = await at_once(peer)
        rates[peer.name] = (with_share(peer_tps, limits, chats), ratio(ours_tps, peer_tps))
        same[peer.name] = (same_answers(texts, [a.text for a in peer_answers]), "")
    name = f"1: {chats} chats at once"
    ours_cell = with_share(ours_tps, limits, chats)
    res.add(name, "tokens/s (share of the limit)", ours_cell, f"{base_tps:.1f}", f"{ours_tps / base_tps:.2f}x", rates)
    res.add(name, "same answers as baseline", same_answers(texts, [a.text for a in base_answers]))
    if peers:
        res.add(name, "same answers as ours", "", peers=same)


async def decode_alone(
    res: Results,
    ours: Ours,
    fmt: PromptFormat,
    *,
    max_new_tokens: int,
    tries: int = 3,
    peers: Sequence[Peer] = (),
    limits: Limits | None = None,
) -> None:
    """One chat alone: decode tokens/s after the first token, every answer held to `max_new_tokens` (median)."""
    prompt = await encode(fmt, [], FOLLOW_UPS[0].format(t=TOPICS[0]))

    async def rate(runner: Runner) -> float:
        answers = [await runner.answer(prompt, max_new_tokens, min_new_tokens=max_new_tokens) for _ in range(tries)]
        return statistics.median(a.decode_tokens_per_s for a in answers)

    ours_tps = await rate(ours)
    cells = {}
    for peer in peers:
        peer_tps = await rate(peer)
        cells[peer.name] = (with_share(peer_tps, limits, 1), ratio(ours_tps, peer_tps))
    metric = f"decode tokens/s (share of the limit), {max_new_tokens} tokens (median of {tries})"
    res.add("1: one chat alone", metric, with_share(ours_tps, limits, 1), peers=cells)


async def workload3(
    res: Results,
    ours: Ours,
    fmt: PromptFormat,
    *,
    requests: int,
    every_s: float,
    max_new_tokens: int,
    peers: Sequence[Peer] = (),
) -> None:
    """Staggered arrivals: time to first token against a lone request's."""
    prompts = [await encode(fmt, [], FOLLOW_UPS[2].format(t=TOPICS[i % len(TOPICS)])) for i in range(requests)]

    async def ttfts(runner: Runner) -> tuple[float, float, float]:
        lone = sorted([(await runner.answer(prompts[i], max_new_tokens)).first_token_s for i in range(3)])[1]

        async def arrive(i: int) -> Answer:
            await asyncio.sleep(i * every_s)
            return await runner.answer(prompts[i], max_new_tokens)

        answers = await asyncio.gather(*(arrive(i) for i in range(requests)))
        ttft = sorted(a.first_token_s for a in answers)
        return lone, statistics.median(ttft), ttft[min(len(ttft) - 1, round(0.95 * (len(ttft) - 1)))]

    lone, p50, p95 = await ttfts(ours)
    theirs = {peer.name: await ttfts(peer) for peer in peers}
    name = f"3: {requests} arrivals, one every {every_s}s"

    def cells(i: int, ours_s: float) -> dict[str, tuple[str, str]]:
        return {n: (f"{t[i]:.3f}", ratio(ours_s, t[i])) for n, t in theirs.items()}

    res.add(name, "TTFT lone request (s)", f"{lone:.3f}", peers=cells(0, lone))
    res.add(name, "TTFT p50 (s), ratio to lone", f"{p50:.3f}", "", f"{p50 / lone:.2f}x", cells(1, p50))
    res.add(name, "TTFT p95 (s), ratio to lone", f"{p95:.3f}", "", f"{p95 / lone:.2f}x", cells(2, p95))
