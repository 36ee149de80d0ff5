"""Workload 4: the history store, appending a turn with 10 vs 10,000 sessions stored, against one JSON file."""

from __future__ import annotations

import asyncio
import json
import statistics
import tempfile
import time
from pathlib import Path

from bench.results import Results


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
