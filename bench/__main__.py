"""`python -m bench`: run workloads 1-4 against the Gradio-like baseline and print one table of ratios."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

from bench.baseline import BaselineProcess
from bench.models import ModelChoice, load_model
from bench.workloads import Ours, Results, workload1, workload2, workload3, workload4
from bot.config import ModelSettings
from bot.engine import LocalEngine
from bot.render import select_format

log = logging.getLogger(__name__)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    p.add_argument("--model", type=Path, help="a Hugging Face model folder (default: SmolLM2-135M-Instruct)")
    p.add_argument("--llama2-7b-shape", action="store_true", help="random weights with LLaMA-2-7B's shapes (GPU)")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:0 ...")
    p.add_argument("--dtype", default="float32", choices=("float32", "float16", "bfloat16"))
    p.add_argument("--quick", action="store_true", help="small sizes: a check that everything runs")
    p.add_argument("--repeat", type=int, default=1, help="run workloads 1-3 this many times; medians are printed")
    p.add_argument("--skip", default="", help="workloads to leave out, e.g. 4 or 2,4")
    return p.parse_args(argv)


class LagMonitor:
    """The event loop's lateness per phase while the engine generates: a sleep that wakes later than asked means
    the loop was blocked. Ticks while only the baseline runs are left out: its process has the CPU then."""

    def __init__(self, generating: Callable[[], bool], tick: float = 0.005) -> None:
        self.generating = generating
        self.tick = tick
        self.phase = "start"
        self.lags: dict[str, list[float]] = {}
        self._stop = asyncio.Event()

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        while not self._stop.is_set():
            start = loop.time()
            before = self.generating()
            await asyncio.sleep(self.tick)
            if before or self.generating():
                self.lags.setdefault(self.phase, []).append(loop.time() - start - self.tick)

    def stop(self) -> None:
        self._stop.set()

    def worst(self) -> tuple[float, str]:
        return max(((max(v), k) for k, v in self.lags.items() if v), default=(0.0, "-"))

    def p99(self) -> float:
        lags = sorted(x for v in self.lags.values() for x in v)
        return lags[int(0.99 * (len(lags) - 1))] if lags else 0.0


def median_rows(runs: list[Results]) -> Results:
    """Per cell, the median of the numbers the runs printed (text cells from the first run); ratios also show the
    lowest and highest run."""
    if len(runs) == 1:
        return runs[0]
    out = Results()
    for cells in zip(*(r.rows for r in runs), strict=True):
        first = cells[0]
        values = [_median_text([getattr(c, attr) for c in cells]) for attr in ("ours", "baseline", "ratio")]
        out.add(first.workload, first.metric, *values)
    return out


def _median_text(texts: list[str]) -> str:
    head = texts[0]
    for suffix in ("x faster", "x", ""):
        if head.endswith(suffix):
            try:
                nums = [float(t[: len(t) - len(suffix)] if suffix else t) for t in texts]
            except ValueError:
                return head
            value = f"{statistics.median(nums):.2f}{suffix}"
            return f"{value} ({min(nums):.2f}-{max(nums):.2f})" if suffix else value
    return head


def print_table(res: Results, title: str) -> None:
    headers = ("workload", "metric", "ours", "baseline", "ratio")
    rows = [headers] + [(r.workload, r.metric, r.ours, r.baseline, r.ratio) for r in res.rows]
    widths = [max(len(row[i]) for row in rows) for i in range(len(headers))]
    print(f"\n{title}")
    for i, row in enumerate(rows):
        print("| " + " | ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)) + " |")
        if i == 0:
            print("|" + "|".join("-" * (w + 2) for w in widths) + "|")


async def run(args: argparse.Namespace) -> None:
    quick = args.quick
    skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    choice = ModelChoice(args.model, args.llama2_7b_shape, args.dtype, args.device)
    name = choice.name
    settings = ModelSettings(
        name=name,
        dtype=args.dtype,
        device_map=args.device,
        max_batch_size=16,
        max_queue=256,
        kv_cache_budget_mb=4096,
    )
    # Loaded on the engine's worker thread, as the bot loads it: no other thread of this process runs torch.
    engine = LocalEngine(settings, loader=lambda: load_model(choice))
    # Started first: its process fetches and converts SmolLM2 on a machine that has not yet.
    base = await asyncio.to_thread(BaselineProcess, choice)
    try:
        lag = LagMonitor(lambda: engine.running + engine.waiting > 0)
        runs: list[Results] = []
        started = time.perf_counter()
        chats = 8 if quick else 16
        async with engine:
            fmt = select_format(engine.tokenizer, name, "auto")
            ours = Ours(engine)
            hello = await asyncio.to_thread(fmt.encode, None, [], "Hello")  # the chat template's first use compiles it
            await ours.answer(hello, 4)  # warm-up, both sides
            await asyncio.to_thread(base.answer, hello, 4)
            # Watched from here on: loading the model holds the interpreter now and then, as when the bot starts.
            monitor = asyncio.create_task(lag.run())
            for _ in range(args.repeat):
                res = Results()
                if "1" not in skip:
                    lag.phase = "workload 1"
                    await workload1(res, ours, base, fmt, chats=chats, max_new_tokens=16 if quick else 64)
                if "2" not in skip:
                    lag.phase = "workload 2"
                    await workload2(
                        res,
                        ours,
                        base,
                        fmt,
                        sessions=4 if quick else 16,
                        turns=3 if quick else 6,
                        max_new_tokens=8 if quick else 24,
                        long_history_tokens=400 if quick else 2000,
                        pairs=2 if quick else 5,
                    )
                if "3" not in skip:
                    lag.phase = "workload 3"
                    await workload3(res, ours, fmt, requests=chats, every_s=0.5, max_new_tokens=16 if quick else 64)
                runs.append(res)
            lag.stop()
            await monitor
    finally:
        await asyncio.to_thread(base.close)
    res = median_rows(runs)
    if "4" not in skip:
        await workload4(res, few=10, many=1000 if quick else 10_000, appends=40 if quick else 200)
    worst, where = lag.worst()
    res.add("event loop", f"worst lag while generating in 1-3 (ms), in {where}", f"{worst * 1000:.1f}")
    res.add("event loop", "p99 lag while generating in 1-3 (ms)", f"{lag.p99() * 1000:.1f}")
    if torch.cuda.is_available() and args.device.startswith("cuda"):
        peak = torch.cuda.max_memory_allocated() / 2**30
        res.add("GPU", torch.cuda.get_device_name(), f"peak {peak:.1f} GiB")
    title = (
        f"{name} on {args.device} ({args.dtype}), {torch.get_num_threads()} threads, {platform.processor() or '?'}, "
        f"repeat {args.repeat}{', quick' if quick else ''}, {time.perf_counter() - started:.0f} s"
    )
    print_table(res, title)


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=os.environ.get("LOG_LEVEL", "WARNING"))
    asyncio.run(run(parse_args(argv)))


if __name__ == "__main__":
    main()
