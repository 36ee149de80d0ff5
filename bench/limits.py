"""The machine's physical limits for a decode step: how fast it reads the model's weights, and how fast it multiplies.

A decode step multiplies every weight matrix by one vector per running row. With few rows it is bound by reading
the weights from memory: `torch.mv` over a matrix of the same bytes, on the same threads, gives the floor of one
row's step. With many rows the arithmetic may take longer than the reads: a step of `rows` rows takes at least
2 x weights x rows operations at the machine's matmul rate (a 1024^3 `torch.mm`, which runs from cache). The floor
of a step is the larger of the two (a roofline); figures are printed as a share of it.

(One `torch.mm` of the weights-sized matrix by 16 vectors is no floor: on this CPU it ran 10x slower than the
model's own 16-row step, as the library packs a matrix that size before multiplying.)

The probe runs in a process of its own: torch's CPU thread pool is per calling thread, and a second thread running
torch in the engine's process slows the engine for the rest of the run (see baseline.py).
"""

from __future__ import annotations

import multiprocessing
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, cast

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel

# Width of the probe matrix; its height makes up the bytes. Wide enough that a row is many cache lines.
PROBE_COLUMNS = 4096
# Side of the square matmul that measures the arithmetic rate: its three matrices (12 MiB in fp32) stay in cache.
FLOPS_SIDE = 1024


@dataclass(frozen=True)
class Limits:
    bytes_per_step: int  # weights one decode step reads (int8 weights and their scales, when quantized)
    weights: int  # how many weights those bytes hold: each is one multiply-add per row
    read_gb_s: float  # torch.mv over a matrix of those bytes (best of the reps)
    gflops: float  # a square torch.mm (best of the reps)

    def step_s(self, rows: int) -> float:
        """The least time a decode step of `rows` rows could take: reading the weights, or multiplying by them."""
        reads = self.bytes_per_step / (self.read_gb_s * 1e9)
        multiplies = 2 * self.weights * rows / (self.gflops * 1e9)
        return max(reads, multiplies)

    def tokens_per_s(self, rows: int) -> float:
        """The most tokens/s a batch of `rows` rows could decode if a step did nothing but its weight matmuls."""
        return rows / self.step_s(rows)

    def share(self, tokens_per_s: float, rows: int) -> str:
        return f"{100 * tokens_per_s / self.tokens_per_s(rows):.0f}%"


def weight_bytes(model: PreTrainedModel) -> tuple[int, int]:
    """Bytes of the weights a decode step reads, and how many weights they are: every parameter once, but of the
    input embedding only the rows looked up (nothing, at this scale), unless it is tied to the output layer, which
    reads all of it. A quantized weight (torchao's tensor subclasses) counts the bytes of its parts."""
    params = {_parts(p)[0].data_ptr(): p for p in model.parameters()}
    # Typed nn.Module, whose __getattr__ gives Tensor | Module: an embedding's and a linear layer's weight is a Tensor.
    embedding = cast("torch.Tensor", model.get_input_embeddings().weight)
    output = model.get_output_embeddings()
    tied = output is not None and _parts(output.weight)[0].data_ptr() == _parts(embedding)[0].data_ptr()
    if not tied:
        params.pop(_parts(embedding)[0].data_ptr(), None)
    nbytes = sum(part.numel() * part.element_size() for p in params.values() for part in _parts(p))
    return nbytes, sum(p.numel() for p in params.values())


def _parts(tensor: object) -> list[torch.Tensor]:
    """The plain tensors holding a parameter's data: itself, or a tensor subclass's inner tensors."""
    flatten = getattr(tensor, "__tensor_flatten__", None)
    if flatten is None:
        return [cast("torch.Tensor", tensor)]
    names, _ = flatten()
    return [part for name in names for part in _parts(getattr(tensor, name))]


def measure_limits(nbytes: int, weights: int, *, dtype: str = "float32", threads: int = 2) -> Limits:
    """Run the probe in a spawned process (a fork would copy this process's torch thread state)."""
    context = multiprocessing.get_context("spawn")
    with context.Pool(1) as pool:
        limits: Limits = pool.apply(probe, (nbytes, dtype, threads))
    return Limits(limits.bytes_per_step, weights, limits.read_gb_s, limits.gflops)


def probe(nbytes: int, dtype: str, threads: int, reps: int = 7) -> Limits:
    import torch

    torch.set_num_threads(threads)
    kind = getattr(torch, dtype)
    size = torch.tensor([], dtype=kind).element_size()
    with torch.inference_mode():
        matrix = torch.randn(max(1, nbytes // (PROBE_COLUMNS * size)), PROBE_COLUMNS).to(kind)
        vector = torch.randn(PROBE_COLUMNS).to(kind)
        read_s = _best(lambda: torch.mv(matrix, vector), reps)
        read_gb_s = matrix.numel() * size / read_s / 1e9
        a = torch.randn(FLOPS_SIDE, FLOPS_SIDE).to(kind)
        b = torch.randn(FLOPS_SIDE, FLOPS_SIDE).to(kind)
        gflops = 2 * FLOPS_SIDE**3 / _best(lambda: torch.mm(a, b), reps) / 1e9
    return Limits(bytes_per_step=nbytes, weights=nbytes // size, read_gb_s=read_gb_s, gflops=gflops)


def _best(run: Callable[[], object], reps: int) -> float:
    run()  # first touch
    best = float("inf")
    for _ in range(reps):
        start = time.perf_counter()
        run()
        best = min(best, time.perf_counter() - start)
    return best
