"""The baseline: what the Gradio app did, `pipeline("text-generation")` once per message, one after another.

It runs in a process of its own, as the app did: torch's CPU thread pool is per calling thread, and a second thread
running the model in the engine's process slows both (on the 2-core CPU, the engine's tokens/s fell by about a
quarter once another thread had run a forward call).
"""

from __future__ import annotations

import multiprocessing
import time
from collections.abc import Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import TYPE_CHECKING, Any, Self

from bench.models import ModelChoice, load_model

if TYPE_CHECKING:
    from multiprocessing.connection import Connection

    from transformers import PreTrainedModel, PreTrainedTokenizerBase


@dataclass(frozen=True)
class BaselineAnswer:
    text: str
    tokens: int
    seconds: float


class Baseline:
    """Re-encodes the whole conversation on every message; no batching, no cache kept between messages."""

    def __init__(self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> None:
        from transformers import pipeline

        self._tokenizer = tokenizer
        self._pipe = pipeline("text-generation", model=model, tokenizer=tokenizer)

    def answer(self, prompt_ids: Sequence[int], max_new_tokens: int, min_new_tokens: int = 0) -> BaselineAnswer:
        # The same prompt the engine gets, as the text the app would have handed the pipeline.
        text = self._tokenizer.decode(prompt_ids, skip_special_tokens=False)
        start = time.perf_counter()
        out: Any = self._pipe(
            text,
            max_new_tokens=max_new_tokens,
            min_new_tokens=min_new_tokens,
            do_sample=False,
            return_full_text=False,
            add_special_tokens=False,
        )
        seconds = time.perf_counter() - start
        answer = out[0]["generated_text"]
        return BaselineAnswer(answer, len(self._tokenizer.encode(answer, add_special_tokens=False)), seconds)


class BaselineProcess:
    """A Baseline in a child process; answer() blocks the calling thread (run it with asyncio.to_thread)."""

    def __init__(self, choice: ModelChoice) -> None:
        context = multiprocessing.get_context("spawn")  # a fork would copy this process's torch thread state
        self._conn, child = context.Pipe()
        self._process = context.Process(target=_serve, args=(child, choice), name="bench-baseline", daemon=True)
        self._process.start()
        child.close()
        self._receive()  # the model is loaded

    def answer(self, prompt_ids: Sequence[int], max_new_tokens: int, min_new_tokens: int = 0) -> BaselineAnswer:
        return self._call((tuple(prompt_ids), max_new_tokens, min_new_tokens))

    def close(self) -> None:
        if self._process.is_alive():
            self._conn.send(None)
            self._process.join(30)
        if self._process.is_alive():
            self._process.kill()
        self._conn.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def _call(self, message: object) -> Any:
        self._conn.send(message)
        return self._receive()

    def _receive(self) -> Any:
        try:
            ok, value = self._conn.recv()
        except EOFError:
            raise RuntimeError(f"the baseline process died (exit code {self._process.exitcode})") from None
        if not ok:
            raise RuntimeError(f"the baseline failed: {value}")
        return value


def _serve(conn: Connection, choice: ModelChoice) -> None:
    try:
        model, tokenizer = load_model(choice)
        baseline = Baseline(model, tokenizer)
    except Exception as exc:  # told to the parent, which raises it
        conn.send((False, repr(exc)))
        return
    conn.send((True, None))
    while (message := conn.recv()) is not None:
        try:
            conn.send((True, baseline.answer(*message)))
        except Exception as exc:
            conn.send((False, repr(exc)))
