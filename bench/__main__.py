"""`python -m bench`: run workloads 1-4 against the Gradio-like baseline (and any peer servers given with --peer),
and print one table of figures and ratios, decode figures also as a share of the machine's memory limit."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import logging
import os
import platform
import time
from collections.abc import Callable
from pathlib import Path

import aiohttp
import torch

from bench.baseline import BaselineProcess
from bench.history_workload import workload4
from bench.limits import Limits, measure_limits, weight_bytes
from bench.models import ModelChoice, load_model
from bench.peers import Peer, parse_peer
from bench.results import Results, median_rows, print_table
from bench.sessions_workload import workload2
from bench.workloads import Ours, decode_alone, workload1, workload3
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
    p.add_argument(
        "--peer",
        action="append",
        default=[],
        type=parse_peer,
        metavar="NAME=URL",
        help="an OpenAI-compatible server serving the same model (llama-server, vLLM): runs workloads 1-3 too",
    )
    p.add_argument("--no-limit", action="store_true", help="skip measuring the machine's memory read limit")
    p.add_argument(
        "--compile", default="off", choices=("off", "decode", "all"), help="our engine's [model] compile (off: eager)"
    )
    p.add_argument(
        "--quantization",
        default="none",
        choices=("none", "int8"),
        help="our engine's [model] quantization (the baseline stays unquantized: its answers are the reference)",
    )
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


async def run(args: argparse.Namespace) -> None:
    quick = args.quick
    skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    choice = ModelChoice(args.model, args.llama2_7b_shape, args.dtype, args.device, args.quantization)
    name = choice.name
    settings = ModelSettings(
        name=name,
        dtype=args.dtype,
        device_map=args.device,
        max_batch_size=16,
        max_queue=256,
        kv_cache_budget_mb=4096,
        compile=args.compile,
        quantization=args.quantization,
    )
    # Loaded on the engine's worker thread, as the bot loads it: no other thread of this process runs torch.
    engine = LocalEngine(settings, loader=lambda: load_model(choice))
    # Started first: its process fetches and converts SmolLM2 on a machine that has not yet.
    # Quantized, our answers are held against float32's: the baseline is the reference.
    reference = dataclasses.replace(choice, quantization="none", dtype=reference_dtype(args))
    base = await asyncio.to_thread(BaselineProcess, reference)
    try:
        lag = LagMonitor(lambda: engine.running + engine.waiting > 0)
        runs: list[Results] = []
        started = time.perf_counter()
        chats = 8 if quick else 16
        # A fresh connection per request: llama-server closes a streamed answer's connection as the client reuses it.
        connector = aiohttp.TCPConnector(force_close=True)
        timeout = aiohttp.ClientTimeout(total=600)
        async with engine, aiohttp.ClientSession(connector=connector, timeout=timeout) as http:
            limits = None
            if not args.no_limit and args.device == "cpu":
                nbytes, weights = weight_bytes(engine.model)
                limits = await asyncio.to_thread(measure_limits, nbytes, weights, dtype=reference_dtype(args))
            tokenizer = engine.tokenizer
            assert tokenizer is not None  # set by start()
            fmt = select_format(tokenizer, name, "auto")
            peers = [Peer(spec, tokenizer, http) for spec in args.peer]
            ours = Ours(engine)
            hello = await asyncio.to_thread(fmt.encode, None, [], "Hello")  # the chat template's first use compiles it
            await ours.answer(hello, 4)  # warm-up, every side
            await asyncio.to_thread(base.answer, hello, 4)
            for peer in peers:
                await peer.start()
                await peer.answer(hello, 4)
            # Watched from here on: loading the model holds the interpreter now and then, as when the bot starts.
            monitor = asyncio.create_task(lag.run())
            for _ in range(args.repeat):
                res = Results()
                if "1" not in skip:
                    lag.phase = "workload 1"
                    tokens = 16 if quick else 64
                    await decode_alone(res, ours, fmt, max_new_tokens=tokens, peers=peers, limits=limits)
                    await workload1(
                        res, ours, base, fmt, chats=chats, max_new_tokens=tokens, peers=peers, limits=limits
                    )
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
                        peers=peers,
                    )
                if "3" not in skip:
                    lag.phase = "workload 3"
                    await workload3(
                        res, ours, fmt, requests=chats, every_s=0.5, max_new_tokens=16 if quick else 64, peers=peers
                    )
                runs.append(res)
            lag.stop()
            await monitor
    finally:
        await asyncio.to_thread(base.close)
    res = median_rows(runs)
    if limits is not None:
        add_limit_rows(res, limits, chats)
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
        f"compile {args.compile}, quantization {args.quantization}, repeat {args.repeat}{', quick' if quick else ''}, "
        f"{time.perf_counter() - started:.0f} s"
    )
    print_table(res, title)


def reference_dtype(args: argparse.Namespace) -> str:
    """The baseline's dtype, and the memory probe's: float32 when our weights are quantized (bfloat16 arithmetic is
    emulated on CPUs without it, which would make the probe's reads look slow)."""
    return "float32" if args.quantization != "none" else args.dtype


def add_limit_rows(res: Results, limits: Limits, chats: int) -> None:
    """What the shares in the table are shares of."""
    mb = limits.bytes_per_step / 1e6
    reads = f"{mb:.0f} MB of weights per step / torch.mv's {limits.read_gb_s:.1f} GB/s"
    res.add("limit", f"1 row: {reads} (tok/s)", f"{limits.tokens_per_s(1):.1f}")
    multiplies = f"or {2 * limits.weights / 1e9 * chats:.1f} GFLOP / {limits.gflops:.0f} GFLOPS"
    res.add("limit", f"{chats} rows: the same reads, {multiplies} (tok/s)", f"{limits.tokens_per_s(chats):.1f}")


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=os.environ.get("LOG_LEVEL", "WARNING"))
    asyncio.run(run(parse_args(argv)))


if __name__ == "__main__":
    main()
