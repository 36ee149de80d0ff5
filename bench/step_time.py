"""`python -m bench.step_time`: one decode step's time, eager against compiled (`[model] compile = "decode"`).

Runs the engine's own pieces (SlotBatch, the eager forward over `SlotBatch.select`, CompiledSteps over
`SlotBatch.step_cache`) on SmolLM2-135M-Instruct (or --model), for 1 row and for 16, the two paths taking turns step
by step so that a change in the machine's load hits both alike; prints each path's median step time, the ratio,
the largest difference of their logits on the same step, and how long compiling took and how many graphs it
made.
"""

from __future__ import annotations

import argparse
import logging
import resource
import statistics
import time
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from bench.models import ModelChoice, load_model
from bot.engine.local.compiled import CompiledSteps
from bot.engine.local.kv_store import SlotBatch
from bot.engine.local.loading import use_grouped_attention

if TYPE_CHECKING:
    from transformers import PreTrainedModel


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench.step_time", description=__doc__)
    p.add_argument("--model", type=Path, help="a Hugging Face model folder (default: SmolLM2-135M-Instruct)")
    p.add_argument("--rows", default="1,16", help="batch sizes to time, e.g. 1,4,16")
    p.add_argument("--context", type=int, default=100, help="tokens of history per row")
    p.add_argument("--steps", type=int, default=30, help="timed steps per path and batch size")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"), help="the model's dtype")
    p.add_argument("--plain", action="store_true", help="inductor's default options (no freezing, no autotuning)")
    p.add_argument(
        "--int8",
        action="store_true",
        help='int8 weight-only quantization of both paths ([model] quantization = "int8", torchao)',
    )
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.set_num_threads(args.threads)
    model, _ = load_model(ModelChoice(args.model, False, args.dtype, "cpu", "int8" if args.int8 else "none"))
    use_grouped_attention(model)  # as the engine's loading does
    with torch.inference_mode():
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10
        compiled = CompiledSteps(model, tuned=not args.plain)
        compiled.warm_up()
        after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10
        print(
            f"peak resident memory: {before:.0f} MiB before compiling, {after:.0f} MiB after; now {rss_mib():.0f} MiB"
        )
        if not compiled.enabled:
            raise SystemExit("compiling failed (see the log)")
        print(f"compiled both buckets in {compiled.compile_s:.1f} s")
        for rows in (int(r) for r in args.rows.split(",")):
            time_rows(model, compiled, rows, args.context, args.steps)
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    print(f"graphs compiled in all: {graphs} (2 expected: 1 row, 2+ rows)")


def rss_mib() -> float:
    line = next(x for x in Path("/proc/self/status").read_text().splitlines() if x.startswith("VmRSS:"))
    return int(line.split()[1]) / 1024


def time_rows(model: PreTrainedModel, compiled: CompiledSteps, rows: int, context: int, steps: int) -> None:
    batch = SlotBatch.for_model(model.config, model.dtype, torch.device("cpu"))
    batch.reserve(rows, context + 2 * steps + 2)
    batch.add([None] * rows)
    ids = torch.randint(100, 1000, (rows, context))
    mask = batch.prefill_mask(torch.ones((rows, context), dtype=torch.long))
    model(
        input_ids=ids, attention_mask=mask, position_ids=torch.arange(context).expand(rows, context), cache=batch.cache
    )
    batch.advance(context)
    token = torch.full((rows, 1), 42, dtype=torch.long)
    times: dict[str, list[float]] = {"eager": [], "compiled": []}
    diff = 0.0
    for step in range(steps + 1):
        # Both paths on the same slot, token and position: the second writes the same keys and values again.
        positions = torch.full((rows, 1), batch.end, dtype=torch.long)
        mask = batch.step_mask(spare=1)
        logits = {}
        for path in times:
            start = time.perf_counter()
            if path == "eager":
                out = model(
                    input_ids=token,
                    attention_mask=mask,
                    position_ids=positions,
                    cache=batch.select(0, rows),
                    logits_to_keep=1,
                ).logits[:, -1, :]
            else:
                got = compiled.decode(token, positions, mask, batch, 0, rows)
                if got is None:
                    raise SystemExit("the compiled step failed (see the log)")
                out = got
            if step > 0:  # the first step of each size warms caches
                times[path].append(time.perf_counter() - start)
            logits[path] = out
        batch.advance(1)
        diff = max(diff, float((logits["eager"] - logits["compiled"]).abs().max()))
    eager, fast = (statistics.median(times[k]) * 1000 for k in ("eager", "compiled"))
    print(
        f"{rows:>3} rows, {context} tokens of history: eager {eager:.1f} ms, compiled {fast:.1f} ms per step "
        f"({eager / fast:.2f}x); tokens/s {1000 * rows / eager:.1f} -> {1000 * rows / fast:.1f}; "
        f"largest logit difference {diff:.1e}"
    )


if __name__ == "__main__":
    main()
