"""The engine interface: a prompt in (token IDs, or chat messages for a server that templates them), a stream of
text deltas out. Knows nothing of sessions or Discord; bot/render.py builds the prompt and fits it to the context."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import AsyncGenerator, Callable
from dataclasses import dataclass, field
from types import TracebackType
from typing import TYPE_CHECKING, ClassVar, Literal, Self

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from bot.config import ModelSettings


@dataclass(frozen=True)
class SamplingParams:
    """How one request picks its tokens; temperature 0 means greedy."""

    max_new_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    # End-of-sequence is not picked before this many tokens (generate()'s min_new_tokens, vLLM's min_tokens): the
    # benchmark times answers of equal length with it, so one that stops early does not skew a comparison.
    min_new_tokens: int = 0

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be at least 1, not {self.max_new_tokens}")
        if not 0 <= self.min_new_tokens <= self.max_new_tokens:
            raise ValueError(f"min_new_tokens must be in [0, max_new_tokens], not {self.min_new_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must not be negative, not {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], not {self.top_p}")
        if self.repetition_penalty <= 0:
            raise ValueError(f"repetition_penalty must be positive, not {self.repetition_penalty}")

    @classmethod
    def from_settings(cls, s: ModelSettings) -> SamplingParams:
        return cls(
            max_new_tokens=s.max_new_tokens,
            temperature=s.temperature,
            top_p=s.top_p,
            repetition_penalty=s.repetition_penalty,
        )

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


@dataclass(frozen=True)
class ChatMessage:
    role: Literal["system", "user", "assistant"]
    content: str


@dataclass(frozen=True)
class TokenPrompt:
    """Token IDs ready for the model: the answer is generated right after them."""

    ids: tuple[int, ...]
    # The IDs end inside the answer (its start, for Continue): the new text goes on from their last tokens, so
    # its first word keeps the space before it.
    continues_answer: bool = False


@dataclass(frozen=True)
class MessagePrompt:
    """A conversation for a server that applies the model's chat template itself (an OpenAI chat endpoint)."""

    messages: tuple[ChatMessage, ...]

    @property
    def continues_answer(self) -> bool:
        """A last assistant message is the start of the answer, to be continued (vLLM's continue_final_message)."""
        return bool(self.messages) and self.messages[-1].role == "assistant"


Prompt = TokenPrompt | MessagePrompt
# How an answer ended: "stop" (the model ended it, or a stop sequence) or "length" (it reached max_new_tokens).
FinishReason = Literal["stop", "length"]


@dataclass(frozen=True)
class GenerationRequest:
    prompt: Prompt
    sampling: SamplingParams
    # A hint for reusing a conversation's KV cache later; engines may ignore it.
    session_id: str | None = None
    # Called once, on the event loop, when the stream ends normally: how the answer ended (Continue is offered
    # for an answer cut at max_new_tokens).
    on_finish: Callable[[FinishReason], None] | None = field(default=None, compare=False, repr=False)


@dataclass(frozen=True)
class EngineStats:
    """Counters of the work an engine has done since it started."""

    batches: int = 0  # groups of requests admitted together (one prefill each)
    requests: int = 0
    largest_batch: int = 0  # most requests running at once
    steps: int = 0  # decode steps
    prefilled_tokens: int = 0  # prompt tokens run through the model
    reused_tokens: int = 0  # prompt tokens taken from a session's cached KV instead
    cached_sessions: int = 0
    cache_bytes: int = 0
    tokens_generated: int = 0  # answer tokens streamed


class Engine(ABC):
    """A model server shaped like vLLM's async engine: a request queue and one async stream per request."""

    model_name: str
    context_length: int
    # None only for a remote engine without a local tokenizer: prompts then go to the server as messages.
    tokenizer: PreTrainedTokenizerBase | None
    # Whether generate() takes a MessagePrompt (a server that applies the chat template); every engine takes a
    # TokenPrompt. bot/render.py asks this once, to pick the prompt's shape.
    accepts_messages: ClassVar[bool] = False

    @abstractmethod
    async def start(self) -> None:
        """Load the model and start serving; raises whatever loading raised."""

    @abstractmethod
    async def close(self) -> None:
        """Stop serving; open streams end with EngineDeadError."""

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    @abstractmethod
    def generate(self, request: GenerationRequest) -> AsyncGenerator[str, None]:
        """Stream the answer's text deltas.

        Raises QueueFullError at once when the queue is full, EngineDeadError when the engine is closed or its
        worker died, GenerationFailedError when the model raised, PromptTooLongError when the prompt and
        max_new_tokens do not fit the context. Leaving the stream early (break, task cancelled) drops the request.
        """

    @property
    @abstractmethod
    def waiting(self) -> int:
        """Requests queued, not yet running."""

    @property
    @abstractmethod
    def running(self) -> int:
        """Requests being generated now."""

    @property
    @abstractmethod
    def stats(self) -> EngineStats: ...
