"""Decode steps (and prefill steps) through torch.compile (`[model] compile = "decode"` or `"all"`), with the eager
step as the fallback.

A step runs the whole model over each row's new tokens (one in a decode step). Eagerly, every one of its few
hundred small operations is a Python call into transformers and a dispatch into torch, and each matrix product a
call into the BLAS library, which on a small CPU ran the products of a few rows on one core. Compiled (inductor: C++
on the CPU, Triton on a GPU), the step is one graph: the elementwise work (norms, rotary embedding, activations,
residuals) fused, and the matrix products run by inductor's own C++ GEMM over weights packed at compile time
(INDUCTOR_OPTIONS). On the 2-core CPU, SmolLM2-135M: a one-row decode step over 100 slots of history went from 65
to 25 ms, a 16-row step over 200 slots from 144 to 70 ms; a one-row prefill of 35 tokens from 154 to 81 ms, of 69
tokens over 2,000 cached from 345 to 271 ms, while 16 rows of 35 (compute-bound) only went from 1,047 to 971 ms.
The costs: minutes of compiling at every start (twice as many with prefill), the weights packed again for each
graph (memory), and kernels that each split their work between the cores, which slow down much more than the eager
step when another process takes a core.

The graph is traced over SlotBatch.step_cache, whose layers hold views of the batch's buffers ending in the step's
new slots: every position the step needs is in the shapes of its tensors (the attention mask is built in the graph
from them), so nothing Python-side changes between steps. Rows, slots and a prefill's new tokens are dynamic
dimensions; torch specializes sizes 0 and 1, so a 1-row step is a graph of its own, and a decode step (1 new token)
another than a prefill's: two buckets per kind, 1 row and 2+ rows, all compiled at start-up (warm_up) so that no
user's turn waits for a compilation. A call that no graph takes (another shape than the buckets', which should not
happen) runs eagerly, logged once, rather than compile during a turn. (On a GPU the same buckets would be CUDA
graphs, `mode="reduce-overhead"`, which need fixed shapes: a fixed slot capacity per bucket; not built, as this
project has no GPU to test it on.)

Anything else that goes wrong while compiling or in a compiled step (other than running out of memory, which the
model runner handles by splitting the batch) turns compiling off for the rest of the run, logged once, and the step
runs eagerly: a slower answer, never a failed one.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Any

import torch

from bot.engine.local.kv_store import SlotBatch
from bot.errors import first_line

if TYPE_CHECKING:
    from transformers import PreTrainedModel
    from transformers.cache_utils import Cache

log = logging.getLogger(__name__)

# Slots of history in the warm-up steps' rows, and new tokens in a warm-up prefill: sizes above 1 (a size of 1
# would be specialized) that no other dimension of the step has, as torch takes equal sizes to be the same symbol.
WARM_UP_SLOTS = 37
WARM_UP_NEW = 5

# Inductor's options for the decode graph. `freezing` takes the weights as constants, which lets `max_autotune` use
# its C++ GEMM template (weights packed once at compile time, vectorized micro-kernels, both cores) for the matrix
# products: for one row's step on this project's 2-core CPU, the BLAS library's small matrix-vector products ran on
# one core at a third of the template's speed. Only the template's variants are autotuned, not the BLAS call: a
# timing disturbed by another process once made the BLAS call win for most layers, and inductor's autotuning cache
# kept that choice for every later start (a one-row step of 37 ms instead of 26). `cpp_wrapper` runs the whole
# step as one C++ call that lets go of the GIL (the default Python wrapper holds it through each kernel, and the
# event loop's thread waited up to a step: worst lag 43 ms, p99 19 ms, where the eager step gave 6 and 4).
# `cpp.enable_concat_linear` joins the frozen products of one input (query, key and value; gate and up) into one
# GEMM each: fewer, larger kernels, and fewer waits for the other core (one row over 100 slots: 28.4 -> 25.1 ms).
INDUCTOR_OPTIONS: dict[str, Any] = {
    "freezing": True,
    "max_autotune": True,
    "max_autotune_gemm_backends": "CPP",
    "cpp.enable_concat_linear": True,
    "cpp_wrapper": True,
}
# For a model with a matrix product the template cannot take (compiling it fails: no choices), a second try lets
# the BLAS library's call take part.
WITH_BLAS = {**INDUCTOR_OPTIONS, "max_autotune_gemm_backends": "CPP,ATEN"}


class CompiledSteps:
    """The model's forward for decode steps (and, with `prefill`, prefill steps), compiled once per bucket; called
    from the engine's worker thread only."""

    def __init__(self, model: PreTrainedModel, *, prefill: bool = False, tuned: bool = True) -> None:
        """`prefill`: prefill steps too (twice the graphs to compile); `tuned`: inductor's freezing and GEMM
        autotuning (INDUCTOR_OPTIONS); False: its defaults."""
        self._model = model
        # A module, not a function over the model: inductor freezes (takes as constants) the parameters of the module
        # it compiles, which its C++ GEMM needs to pack the weights once.
        # Without guards on the modules' attributes: nothing changes the model once it is loaded (a new load makes a
        # new CompiledSteps), and checking them before every step took about 1 ms of a 29 ms step. The guards on
        # the inputs' shapes, which pick the bucket, stay. So a graph compiled for one model would take another's
        # steps (with the first one's frozen weights): the graphs compiled before, for an earlier model in this
        # process, are dropped first. One compiled model per process, then; a second CompiledSteps ends the first.
        torch.compiler.reset()
        self._compiled: Any = torch.compile(
            _StepForward(model),
            fullgraph=True,
            options={"guard_filter_fn": torch.compiler.skip_guard_on_all_nn_modules_unsafe},
        )
        self._options = INDUCTOR_OPTIONS if tuned else {}
        self._buckets = [(rows, new) for new in ((1, WARM_UP_NEW) if prefill else (1,)) for rows in (1, 2)]
        self.enabled = True
        self.compiles_prefill = prefill
        self.compile_s = 0.0
        self._warned: set[str] = set()

    def warm_up(self) -> None:
        """Compile every bucket now, on dummy rows, logging progress; on failure, log and turn compiling off."""
        start = time.perf_counter()
        try:
            for rows, new in self._buckets:
                step = "decode" if new == 1 else "prefill"
                log.info("compiling the %s step for %s (once, at start-up)", step, "1 row" if rows == 1 else "2+ rows")
                self._compile_bucket(rows, new)
        except torch.OutOfMemoryError:
            raise
        except Exception as exc:
            self._give_up("compiling it failed", exc)
            return
        self.compile_s = time.perf_counter() - start
        log.info(
            "%s compiled in %.0f s",
            "prefill and decode steps" if self.compiles_prefill else "decode step",
            self.compile_s,
        )

    def _compile_bucket(self, rows: int, new: int) -> None:
        try:
            self._warm_up(rows, new)
        except torch.OutOfMemoryError:
            raise
        except Exception as exc:
            if self._options is not INDUCTOR_OPTIONS:
                raise
            log.info("compiling it with inductor's own GEMMs only failed (%s); trying with BLAS calls", first_line(exc))
            self._options = WITH_BLAS
            self._warm_up(rows, new)

    def _warm_up(self, rows: int, new: int) -> None:
        model = self._model
        batch = SlotBatch.for_model(model.config, model.dtype, model.device)
        batch.reserve(rows, WARM_UP_SLOTS + new + 1)
        batch.add([None] * rows)
        # Zero keys and values stand for a history: the step's result is thrown away, only its shapes count.
        batch.prefill_mask(torch.ones((rows, WARM_UP_SLOTS), dtype=torch.long, device=model.device))
        batch.advance(WARM_UP_SLOTS)
        ids = torch.zeros((rows, new), dtype=torch.long)
        positions = (torch.arange(new) + WARM_UP_SLOTS).expand(rows, new).contiguous()
        if new == 1:
            mask = batch.step_mask(spare=1)
        else:
            mask = batch.prefill_mask(torch.ones((rows, new), dtype=torch.long, device=model.device))
        self._call(ids, positions, mask, batch, 0, rows, mark=True)

    def decode(
        self, input_ids: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor, batch: SlotBatch, lo: int, hi: int
    ) -> torch.Tensor | None:
        """Logits of rows [lo, hi) (after batch.step_mask(spare=1); `mask` is theirs); None when compiling is off,
        or the compiled step failed just now (the caller runs the eager step instead)."""
        return self._try(input_ids, positions, mask, batch, lo, hi)

    def prefill(
        self, input_ids: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor, batch: SlotBatch
    ) -> torch.Tensor | None:
        """Logits of the last column of every row of `batch`, whose new tokens `input_ids` are (after
        batch.prefill_mask, with a spare slot reserved beyond them; `mask` its result); None as for decode."""
        if not self.compiles_prefill:
            return None
        return self._try(input_ids, positions, mask, batch, 0, batch.rows)

    def _try(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        mask: torch.Tensor,
        batch: SlotBatch,
        lo: int,
        hi: int,
    ) -> torch.Tensor | None:
        if not self.enabled:
            return None
        try:
            # A shape that no bucket's graph takes would compile another graph, minutes during a user's turn: that
            # one call runs eagerly instead.
            with torch.compiler.set_stance("fail_on_recompile"):
                return self._call(input_ids, positions, mask, batch, lo, hi)
        except torch.OutOfMemoryError:
            raise
        except Exception as exc:
            if _NOT_COMPILED in str(exc):
                self._note_uncompiled(f"{hi - lo} rows of {input_ids.shape[1]} new tokens", exc)
                return None
            self._give_up("a compiled step failed", exc)
            return None

    def _call(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        mask: torch.Tensor,
        batch: SlotBatch,
        lo: int,
        hi: int,
        *,
        mark: bool = False,
    ) -> torch.Tensor:
        device = self._model.device
        new = input_ids.shape[1]
        # The mask contiguous, always: torch specializes a graph on whether an input is (see step_mask's spare).
        input_ids, positions, mask = input_ids.to(device), positions.to(device), mask.contiguous()
        cache = batch.step_cache(lo, hi, new)
        if mark:
            _mark_dynamic(input_ids, positions, mask, batch.step_views(), rows=hi - lo > 1, new=new > 1)
        # Set around every call, not passed to torch.compile: given as torch.compile(options=...), freezing and
        # autotuning were not applied (torch 2.13; the generated code called the BLAS library for every matmul).
        with torch.inference_mode(), torch._inductor.config.patch(self._options):
            logits: torch.Tensor = self._compiled(input_ids, positions, mask, cache)
        return logits

    def _note_uncompiled(self, shape: str, exc: Exception) -> None:
        if shape not in self._warned:
            self._warned.add(shape)
            log.warning("no compiled graph takes a step of %s; such steps run eagerly (%s)", shape, exc)

    def _give_up(self, what: str, exc: Exception) -> None:
        self.enabled = False
        log.warning("%s; steps run eagerly from now on", what, exc_info=exc)


# What torch's "fail_on_recompile" stance says when no compiled graph takes a call's inputs.
_NOT_COMPILED = "Detected recompile"


def _mark_dynamic(
    input_ids: torch.Tensor,
    positions: torch.Tensor,
    mask: torch.Tensor,
    kv: list[torch.Tensor],
    *,
    rows: bool,
    new: bool,
) -> None:
    """Make the slots (with `rows`, the rows; with `new`, the new tokens) symbols in the graph compiled next: one
    graph then serves every length of history (and batch size, and prompt). Without a mark, torch would compile a
    graph for the first size it sees and another once the size changes."""
    torch._dynamo.mark_dynamic(mask, 1)
    for t in kv:
        torch._dynamo.mark_dynamic(t, 2)
    if new:
        torch._dynamo.mark_dynamic(input_ids, 1)
        torch._dynamo.mark_dynamic(positions, 1)
    if rows:
        for t in (input_ids, positions, mask, *kv):
            torch._dynamo.mark_dynamic(t, 0)


class _StepForward(torch.nn.Module):
    """The model's forward for one step: the logits of each row's last new token.

    The attention mask is built here, in the graph, from the rows' slot mask: each new token sees the slots its row
    uses, up to its own. (Left to transformers, the mask would start from the cache's length, a Python number the
    graph would specialize on.)"""

    def __init__(self, model: PreTrainedModel) -> None:
        super().__init__()
        self.model = model

    def forward(
        self, input_ids: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor, cache: Cache
    ) -> torch.Tensor:
        new, slots = input_ids.shape[1], mask.shape[1]
        own_slot = torch.arange(new, device=mask.device) + (slots - new)
        causal = torch.arange(slots, device=mask.device)[None, :] <= own_slot[:, None]
        attention = mask.bool()[:, None, None, :] & causal[None, None]
        out = self.model(
            input_ids=input_ids,
            attention_mask=attention,
            position_ids=positions,
            cache=cache,
            use_cache=True,
            logits_to_keep=1,
        )
        logits: torch.Tensor = out.logits
        return logits[:, -1, :]
