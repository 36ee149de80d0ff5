"""The benchmark's workloads: each runs ours and the baseline on the same prompts and returns table rows."""

from __future__ import annotations

import asyncio
import json
import statistics
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from bench.baseline import BaselineProcess
from bot.engine import GenerationRequest, LocalEngine, SamplingParams, TokenPrompt
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


@dataclass
class Row:
    workload: str
    metric: str
    ours: str
    baseline: str
    ratio: str


@dataclass
class Results:
    rows: list[Row] = field(default_factory=list)

    def add(self, workload: str, metric: str, ours: str, baseline: str = "", ratio: str = "") -> None:
        self.rows.append(Row(workload, metric, ours, baseline, ratio))


@dataclass(frozen=True)
class Answer:
    text: str
    tokens: int
    seconds: float
    first_token_s: float


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
        tokens = len(await asyncio.to_thread(self.engine.tokenizer.encode, text, add_special_tokens=False))
        return Answer(text, tokens, time.perf_counter() - start, first)


async def encode(fmt: PromptFormat, history: Sequence[Exchange], user: str) -> list[int]:
    # Off the event loop, as bot/chat.py does: a long history's chat template takes milliseconds.
    return await asyncio.to_thread(fmt.encode, None, history, user)


def _same(ours: Sequence[str], theirs: Sequence[str]) -> str:
    return f"{sum(a.strip() == b.strip() for a, b in zip(ours, theirs, strict=True))}/{len(ours)}"


async def workload1(
    res: Results, ours: Ours, base: BaselineProcess, fmt: PromptFormat, *, chats: int, max_new_tokens: int
) -> None:
    """`chats` chats send one message each at the same time."""
    prompts = [await encode(fmt, [], FOLLOW_UPS[0].format(t=TOPICS[i % len(TOPICS)])) for i in range(chats)]
    start = time.perf_counter()
    answers = await asyncio.gather(*(ours.answer(p, max_new_tokens) for p in prompts))
    ours_s = time.perf_counter() - start
    base_answers = [await asyncio.to_thread(base.answer, p, max_new_tokens) for p in prompts]
    base_s = sum(a.seconds for a in base_answers)
    ours_tps = sum(a.tokens for a in answers) / ours_s
    base_tps = sum(a.tokens for a in base_answers) / base_s
    name = f"1: {chats} chats at once"
    res.add(name, "tokens/s", f"{ours_tps:.1f}", f"{base_tps:.1f}", f"{ours_tps / base_tps:.2f}x")
    res.add(name, "same answers as baseline", _same([a.text for a in answers], [a.text for a in base_answers]))


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
) -> None:
    """`sessions` sessions × `turns` turns each, history growing; then turns at ~100 and ~2,000 tokens."""

    async def session(i: int) -> list[str]:
        history: list[Exchange] = []
        texts: list[str] = []
        for turn in range(turns):
            user = FOLLOW_UPS[turn % len(FOLLOW_UPS)].format(t=TOPICS[i % len(TOPICS)])
            answer = await ours.answer(await encode(fmt, history, user), max_new_tokens, session_id=f"w2-{i}")
            texts.append(answer.text)
            history.append(Exchange(user, answer.text.strip()))
        return texts

    start = time.perf_counter()
    ours_texts = await asyncio.gather(*(session(i) for i in range(sessions)))
    ours_s = time.perf_counter() - start

    base_s = 0.0
    base_texts: list[list[str]] = []
    for i in range(sessions):
        history: list[Exchange] = []
        texts: list[str] = []
        for turn in range(turns):
            user = FOLLOW_UPS[turn % len(FOLLOW_UPS)].format(t=TOPICS[i % len(TOPICS)])
            answer = await asyncio.to_thread(base.answer, await encode(fmt, history, user), max_new_tokens)
            base_s += answer.seconds
            texts.append(answer.text)
            history.append(Exchange(user, answer.text.strip()))
        base_texts.append(texts)
    name = f"2: {sessions} sessions x {turns} turns"
    res.add(name, "total time (s)", f"{ours_s:.1f}", f"{base_s:.1f}", f"{base_s / ours_s:.2f}x faster")
    flat_ours = [t for texts in ours_texts for t in texts]
    flat_base = [t for texts in base_texts for t in texts]
    res.add(name, "same answers as baseline", _same(flat_ours, flat_base))

    await long_turn(res, name, ours, base, fmt, pairs=pairs, max_new_tokens=max_new_tokens, tokens=long_history_tokens)


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
) -> None:
    """A turn after a long history against one after a short history, in `pairs` pairs of sessions, each session
    warmed by its previous turn (as in a chat). Every timed answer is held to exactly `max_new_tokens` tokens: an
    answer that ends early would spread the turn's fixed cost (its prompt's prefill) over fewer tokens."""
    ratios: dict[str, list[float]] = {"ours": [], "baseline": [], "first token": []}
    lengths: dict[str, int] = {}
    for pair in range(pairs):
        topic = TOPICS[pair % len(TOPICS)]
        timed: dict[str, tuple[Answer, float]] = {}
        for label in ("short", "long"):
            history = [Exchange(f"Hello! Let's talk about {topic}.", "Hello! How can I help you today?")]
            if label == "long":
                while len(await encode(fmt, history, "x")) < tokens:
                    history.append(Exchange(FILLER, "Noted, I will keep that in mind."))
            sid = f"w2-{label}-{pair}"
            first = await encode(fmt, history[:-1], history[-1].user)
            warm = await ours.answer(first, max_new_tokens, session_id=sid)
            history[-1] = Exchange(history[-1].user, warm.text.strip())
            prompt = await encode(fmt, history, FOLLOW_UPS[1].format(t=topic))
            lengths[label] = len(prompt)
            answer = await ours.answer(prompt, max_new_tokens, session_id=sid, min_new_tokens=max_new_tokens)
            base_answer = await asyncio.to_thread(base.answer, prompt, max_new_tokens, max_new_tokens)
            timed[label] = (answer, base_answer.seconds)
        (short, short_base), (long, long_base) = timed["short"], timed["long"]
        ratios["ours"].append(long.seconds / short.seconds)
        ratios["baseline"].append(long_base / short_base)
        ratios["first token"].append(long.first_token_s / short.first_token_s)
    over = f"at {lengths['long']} over {lengths['short']} history tokens"
    res.add(
        name,
        f"turn {over}, {max_new_tokens} tokens each (median of {pairs})",
        f"{statistics.median(ratios['ours']):.2f}x",
        f"{statistics.median(ratios['baseline']):.2f}x",
    )
    res.add(name, f"first token {over} (median of {pairs})", f"{statistics.median(ratios['first token']):.2f}x")


async def workload3(
    res: Results, ours: Ours, fmt: PromptFormat, *, requests: int, every_s: float, max_new_tokens: int
) -> None:
    """Staggered arrivals: time to first token against a lone request's."""
    prompts = [await encode(fmt, [], FOLLOW_UPS[2].format(t=TOPICS[i % len(TOPICS)])) for i in range(requests)]
    lone = sorted([(await ours.answer(prompts[i], max_new_tokens)).first_token_s for i in range(3)])[1]

    async def arrive(i: int) -> Answer:
        await asyncio.sleep(i * every_s)
        return await ours.answer(prompts[i], max_new_tokens)

    answers = await asyncio.gather(*(arrive(i) for i in range(requests)))
    ttft = sorted(a.first_token_s for a in answers)
    p50 = statistics.median(ttft)
    p95 = ttft[min(len(ttft) - 1, round(0.95 * (len(ttft) - 1)))]
    name = f"3: {requests} arrivals, one every {every_s}s"
    res.add(name, "TTFT lone request (s)", f"{lone:.3f}")
    res.add(name, "TTFT p50 (s), ratio to lone", f"{p50:.3f}", "", f"{p50 / lone:.2f}x")
    res.add(name, "TTFT p95 (s), ratio to lone", f"{p95:.3f}", "", f"{p95 / lone:.2f}x")


async def workload4(res: Results, *, few: int, many: int, appends: int) -> None:
    """Appending a turn: 10 vs 10,000 sessions stored; and against rewriting one JSON file of all sessions."""
    from bot.history import HistoryStore
    from bot.sessions import Place, StoredMessage

    def message(role: str, text: str) -> StoredMessage:
        return StoredMessage(role=role, content=text, author_id=1, created_at="2026-01-01T00:00:00+00:00")  # type: ignore[arg-type]

    turn = [message("user", "How are you?"), message("assistant", "Fine, thank you. " * 10)]

    async def fill(store: HistoryStore, stored: int) -> list[str]:
        ids: list[str] = []
        for chunk in range(0, stored, 250):
            created = await asyncio.gather(
                *(
                    store.create(Place("dm", user_id=1000 + i), owner_id=1, title="t", system_prompt=None)
                    for i in range(chunk, min(stored, chunk + 250))
                )
            )
            ids += [s.id for s in created]
        await store.append(ids[0], turn)
        return ids

    async def append_times(a: Path, b: Path) -> tuple[float, float]:
        # Interleaved, one append to each store in turn, and the median of each: an fsync that stalls now and then
        # (the disk is shared) moves a mean, not a median, and drifts hit both sides alike.
        async with HistoryStore(a) as few_store, HistoryStore(b) as many_store:
            few_ids, many_ids = await fill(few_store, few), await fill(many_store, many)
            times: dict[int, list[float]] = {few: [], many: []}
            for i in range(appends):
                for store, ids in ((few_store, few_ids), (many_store, many_ids)):
                    start = time.perf_counter()
                    await store.append(ids[(i * 7919) % len(ids)], turn)
                    times[len(ids)].append(time.perf_counter() - start)
            return statistics.median(times[few]), statistics.median(times[many])

    def one_json_time(tmp: Path, stored: int) -> float:
        # The Gradio app kept every conversation in one JSON file and rewrote all of it on each message.
        path = tmp / "all.json"
        record = {"role": "user", "content": "How are you?"}, {"role": "assistant", "content": "Fine, thank you. " * 10}
        path.write_text(json.dumps({f"s{i}": list(record) for i in range(stored)}))
        start = time.perf_counter()
        for i in range(appends):
            data = json.loads(path.read_text())
            data[f"s{(i * 7919) % stored}"].extend(record)
            path.write_text(json.dumps(data))
        return (time.perf_counter() - start) / appends

    with tempfile.TemporaryDirectory() as a, tempfile.TemporaryDirectory() as b, tempfile.TemporaryDirectory() as c:
        few_s, many_s = await append_times(Path(a), Path(b))
        json_s = await asyncio.to_thread(one_json_time, Path(c), many)
    name = f"4: history, {many} vs {few} sessions"
    res.add(name, f"append, {few} sessions (ms, median of {appends})", f"{few_s * 1000:.2f}")
    res.add(name, f"append, {many} sessions (ms), ratio", f"{many_s * 1000:.2f}", "", f"{many_s / few_s:.2f}x")
    res.add(
        name,
        f"append vs one JSON of {many} (ms)",
        f"{many_s * 1000:.2f}",
        f"{json_s * 1000:.2f}",
        f"{json_s / many_s:.1f}x faster",
    )
