"""Typed errors of the core. Each one that can reach a user carries one clear sentence for them."""

from __future__ import annotations


class BotError(Exception):
    """An error a user may see: `user_message` is the sentence the bot answers with."""

    user_message = "Something went wrong; please try again."

    def __init__(self, detail: str | None = None, *, user_message: str | None = None) -> None:
        if user_message is not None:
            self.user_message = user_message
        super().__init__(detail or self.user_message)


class ConfigError(Exception):
    """The configuration cannot be used; the message names the file and the key."""

    def __init__(self, path: object, key: str, problem: str) -> None:
        self.path = str(path)
        self.key = key
        self.problem = problem
        super().__init__(f"{self.path}: [{key}] {problem}")


class StartUpError(Exception):
    """The bot cannot start, for a reason the message states with what to do about it (printed as one line).

    `exit_status` tells systemd whether a restart can help: 2 is something an operator must change first (a
    setting, a switch in the Discord Developer Portal), 1 is an outside failure (Discord or the model hub
    unreachable) that may pass."""

    def __init__(self, message: str, *, exit_status: int = 1) -> None:
        self.exit_status = exit_status
        super().__init__(message)


class ModelFetchError(Exception):
    """A model the bot fetches itself (SmolLM2-135M-Instruct, bot/smollm2.py) could not be downloaded, converted or
    cached; the message names the step and the reason."""


class PromptTooLongError(BotError):
    """The newest message alone does not fit the model's context window."""

    def __init__(self, message_tokens: int, limit_tokens: int) -> None:
        self.message_tokens = message_tokens
        self.limit_tokens = limit_tokens
        super().__init__(
            f"message of {message_tokens} tokens exceeds the limit of {limit_tokens}",
            user_message=(
                f"Your message is too long for the model: it is {message_tokens} tokens and the limit "
                f"is {limit_tokens} tokens. Please shorten it."
            ),
        )


class QueueFullError(BotError):
    user_message = "I'm busy with other requests right now; please try again in a moment."


class EngineDeadError(BotError):
    user_message = "The model is not running right now; an operator has to restart it."


class GenerationFailedError(BotError):
    user_message = "The model failed while writing an answer; please try again."


class ModelOutOfMemoryError(GenerationFailedError):
    """The answer did not fit the accelerator's memory, even alone in its batch."""

    user_message = "This answer was too big for the GPU's memory right now; please try again in a little while."


class ServerUnreachableError(GenerationFailedError):
    """The model server could not be reached (or kept failing) before the first token."""

    user_message = "The model server is not answering right now; please try again in a moment."


class ServerBrokeOffError(GenerationFailedError):
    """The model server failed after the answer had begun; half an answer cannot be taken back."""

    user_message = "The model server stopped in the middle of the answer; please try again."


class ServerRefusedError(GenerationFailedError):
    """The model server refused the request (a 4xx other than 429): a problem for its operator."""

    user_message = "The model server refused this request; an operator should check its log."


class InvalidPromptError(BotError):
    """The prompt cannot be run (empty, token IDs outside the vocabulary, a shape the engine does not take):
    a bug on our side, not the user's."""

    user_message = "I could not build a prompt the model accepts for this message; an operator should check the log."


class StorageError(BotError):
    user_message = "I could not save this conversation turn; the answer was not stored."


class MessageRejectedError(BotError):
    """The message cannot be a turn as it is (empty, too long in characters); nothing was sent to the model."""


class NotLatestAnswerError(BotError):
    """Regenerate or Continue was asked of an answer that a later turn has followed."""

    user_message = "Only the latest answer of a conversation can be regenerated."


class ThoughtWithoutAnswerError(GenerationFailedError):
    """A thinking model ended with reasoning and no answer, or its answer was empty when max_new_tokens ran out."""

    user_message = (
        "The model spent its whole answer budget thinking and wrote no answer; please try again, or ask an operator "
        "to raise max_new_tokens."
    )


def first_line(exc: BaseException) -> str:
    """The exception's first line, or its type's name when it has no text: for a one-line log or error message
    (some exceptions carry pages after it, such as inductor's IR of a failed compile)."""
    return next(iter(str(exc).strip().splitlines()), type(exc).__name__)
