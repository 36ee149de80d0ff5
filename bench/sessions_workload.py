"""Workload 2: sessions whose history grows turn by turn, and one turn after a long history against a short one."""

from __future__ import annotations

import asyncio
import statistics
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING

from bench.results import Results, ratio
from bench.workloads import FILLER, FOLLOW_UPS, TOPICS, Answer, Ours, Runner, encode, same_answers
from bot.render import Exchange

if TYPE_CHECKING:
    from bench.baseline import BaselineProcess
    from bench.peers import Peer
    from bot.render import PromptFormat


async def workload2(
    res: Results,
    ours: Ours,
    base: BaselineProcess,
    fmt: PromptFormat,
    *,
    sessions: int,
    turns: int,
    max_new_tokens: int,
    long_history_tokens: int,
    pairs: int,
    peers: Sequence[Peer] = (),
) -> None:
    """`sessions` sessions × `turns` turns each, history growing; then turns at ~100 and ~2,000 tokens."""

    async def session(runner: Runner, i: int) -> list[str]:
        history: list[Exchange] = []
        texts: list[str] = []
        for turn in range(turns):
            user = FOLLOW_UPS[turn % len(FOLLOW_UPS)].format(t=TOPICS[i % len(TOPICS)])
            answer = await runner.answer(await encode(fmt, history, user), max_new_tokens, session_id=f"w2-{i}")
            texts.append(answer.text)
            history.append(Exchange(user, answer.text.strip()))
        return texts

    async def all_sessions(runner: Runner) -> tuple[list[str], float]:
        start = time.perf_counter()
        texts = await asyncio.gather(*(session(runner, i) for i in range(sessions)))
        return [t for session_texts in texts for t in session_texts], time.perf_counter() - start

    flat_ours, ours_s = await all_sessions(ours)

    base_s = 0.0
    flat_base: list[str] = []
    for i in range(sessions):
        history: list[Exchange] = []
        for turn in range(turns):
            user = FOLLOW_UPS[turn % len(FOLLOW_UPS)].format(t=TOPICS[i % len(TOPICS)])
            answer = await asyncio.to_thread(base.answer, await encode(fmt, history, user), max_new_tokens)
            base_s += answer.seconds
            flat_base.append(answer.text)
            history.append(Exchange(user, answer.text.strip()))
    times: dict[str, tuple[str, str]] = {}
    same: dict[str, tuple[str, str]] = {}
    for peer in peers:
        texts, seconds = await all_sessions(peer)
        times[peer.name] = (f"{seconds:.1f}", ratio(ours_s, seconds))
        same[peer.name] = (same_answers(flat_ours, texts), "")
    name = f"2: {sessions} sessions x {turns} turns"
    res.add(name, "total time (s)", f"{ours_s:.1f}", f"{base_s:.1f}", f"{base_s / ours_s:.2f}x faster", times)
    res.add(name, "same answers as baseline", same_answers(flat_ours, flat_base))
    if peers:
        res.add(name, "same answers as ours", "", peers=same)

    await long_turn(
        res, name, ours, base, fmt, pairs=pairs, max_new_tokens=max_new_tokens, tokens=long_history_tokens, peers=peers
    )


async def long_turn(
    res: Results,
    name: str,
    ours: Ours,
    base: BaselineProcess,
    fmt: PromptFormat,
    *,
    pairs: int,
    max_new_tokens: int,
    tokens: int,
    peers: Sequence[Peer] = (),
) -> None:
    """A turn after a long history against one after a short history, in `pairs` pairs of sessions, each session
    warmed by its previous turn (as in a chat). Every timed answer is held to exactly `max_new_tokens` tokens: an
    answer that ends early would spread the turn's fixed cost (its prompt's prefill) over fewer tokens.

    The history is built from our engine's warm-up answer, and every runner (ours, each peer) answers the same
    warm-up prompt and then the same timed prompt in its session: a server that keeps the conversation's cache
    (llama.cpp's slots, vLLM's prefix cache) finds it as ours does."""
    runners: dict[str, Runner] = {"ours": ours, **{peer.name: peer for peer in peers}}
    turn_ratio: dict[str, list[float]] = {key: [] for key in runners}
    first_ratio: dict[str, list[float]] = {key: [] for key in runners}
    first_long: dict[str, list[float]] = {key: [] for key in runners}
    base_ratio: list[float] = []
    lengths: dict[str, int] = {}
    for pair in range(pairs):
        topic = TOPICS[pair % len(TOPICS)]
        timed: dict[str, dict[str, Answer]] = {key: {} for key in runners}
        base_s: dict[str, float] = {}
        for label in ("short", "long"):
            history = [Exchange(f"Hello! Let's talk about {topic}.", "Hello! How can I help you today?")]
            if label == "long":
                while len(await encode(fmt, history, "x")) < tokens:
                    history.append(Exchange(FILLER, "Noted, I will keep that in mind."))
            sid = f"w2-{label}-{pair}"
            first = await encode(fmt, history[:-1], history[-1].user)
            warm = await ours.answer(first, max_new_tokens, session_id=sid)
            for peer in peers:
                await peer.answer(first, max_new_tokens)
            history[-1] = Exchange(history[-1].user, warm.text.strip())
            prompt = await encode(fmt, history, FOLLOW_UPS[1].format(t=topic))
            lengths[label] = len(prompt)
            for key, runner in runners.items():
                timed[key][label] = await runner.answer(
                    prompt, max_new_tokens, session_id=sid, min_new_tokens=max_new_tokens
                )
            base_s[label] = (await asyncio.to_thread(base.answer, prompt, max_new_tokens, max_new_tokens)).seconds
        for key, answers in timed.items():
            short, long = answers["short"], answers["long"]
            turn_ratio[key].append(long.seconds / short.seconds)
            first_ratio[key].append(long.first_token_s / short.first_token_s)
            first_long[key].append(long.first_token_s)
        base_ratio.append(base_s["long"] / base_s["short"])
    med = {key: statistics.median(v) for key, v in turn_ratio.items()}
    med_first = {key: statistics.median(v) for key, v in first_ratio.items()}
    med_long = {key: statistics.median(v) for key, v in first_long.items()}
    over = f"at {lengths['long']} over {lengths['short']} history tokens"
    res.add(
        name,
        f"turn {over}, {max_new_tokens} tokens each (median of {pairs})",
        f"{med['ours']:.2f}x",
        f"{statistics.median(base_ratio):.2f}x",
        peers={p.name: (f"{med[p.name]:.2f}x", "") for p in peers},
    )
    res.add(
        name,
        f"first token {over} (median of {pairs})",
        f"{med_first['ours']:.2f}x",
        peers={p.name: (f"{med_first[p.name]:.2f}x", "") for p in peers},
    )
    res.add(
        name,
        f"first token after {lengths['long']} history tokens, cached (s)",
        f"{med_long['ours']:.3f}",
        peers={p.name: (f"{med_long[p.name]:.3f}", ratio(med_long["ours"], med_long[p.name])) for p in peers},
    )
