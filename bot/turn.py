"""One turn in progress, between the chat service that starts it and the cog that streams it into Discord."""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass

from bot.attachments import TextFile
from bot.engine.base import FinishReason
from bot.errors import BotError
from bot.history import HeldSession
from bot.sessions import Place, Session, StoredMessage

log = logging.getLogger(__name__)

TITLE_CHARS = 60


@dataclass(frozen=True)
class PlaceNames:
    """What a system prompt's {bot}, {server} and {channel} say; None where there is none (a DM)."""

    bot: str = "the assistant"
    server: str | None = None
    channel: str | None = None


@dataclass(frozen=True)
class TurnInput:
    place: Place
    author_id: int | None
    text: str
    message_id: int | None = None
    author_name: str | None = None  # the display name, for the prompt of a session with several speakers
    files: tuple[TextFile, ...] = ()  # text files read from the message, part of what the model sees
    names: PlaceNames | None = None  # for the system prompt of a session this turn makes


class Turn:
    """A turn in progress: the session it belongs to and the answer's text as it streams.

    The session stays held (its one lock) while the turn runs; `mark_answering` writes the user's message as
    pending with the answer's Discord message, so a restart after a crash can tell the user it was cut off."""

    def __init__(
        self,
        held: HeldSession,
        user_message: StoredMessage,
        *,
        queued_ahead: int,
        deltas: AsyncIterator[str],
        replaces: int = 0,
        ending: list[FinishReason] | None = None,
    ) -> None:
        """`ending`: filled by the engine (GenerationRequest.on_finish) with how the answer ended."""
        self.held = held
        self.user_message = user_message
        self.queued_ahead = queued_ahead
        # The place's session file could not be read, so this turn starts a new session: the user should know.
        self.history_lost = held.replaced_broken
        self.answer = ""
        self.finished = False
        self.stopped = False
        self.stopped_by: str | None = None
        # How many of the session file's last messages the turn's outcome replaces before the pending mark is
        # written: the question and answer being regenerated, or none.
        self.replaces = replaces
        self._mark: StoredMessage | None = None
        self._deltas = deltas
        self._ending = ending if ending is not None else []

    @property
    def session(self) -> Session:
        return self.held.session

    async def stream(self) -> AsyncIterator[str]:
        async for delta in self._deltas:
            self.answer += delta
            yield delta
            if self.stopped:
                return
        self.finished = True

    @property
    def cut_at_limit(self) -> bool:
        """Whether the answer ran to max_new_tokens (so it may go on: Continue), rather than ending or being
        stopped."""
        return self.finished and not self.stopped and self._ending[-1:] == ["length"]

    def stop(self, by: str | None = None) -> None:
        """End the answer where it is (the Stop button); the part written so far is kept, marked stopped."""
        self.stopped = True
        self.stopped_by = by

    @property
    def marked(self) -> bool:
        """Whether the pending mark is the session file's last message (its write landed, even if the caller
        was cancelled meanwhile: commits are shielded)."""
        messages = self.held.session.messages
        return self._mark is not None and bool(messages) and messages[-1] is self._mark

    async def mark_answering(self, answer_message_id: int) -> None:
        """Once: the answer now shows in Discord as message `answer_message_id`."""
        if self._mark is not None:
            return
        self.user_message = dataclasses.replace(self.user_message, answer_message_id=answer_message_id)
        self._mark = dataclasses.replace(self.user_message, status="pending")
        try:
            await self.held.commit([self._mark], replacing=self.replaces)
        except BotError as exc:
            # The answer goes on; only a crash before it is stored would now leave its message unmarked.
            log.warning("session %s: could not mark the answer in progress: %s", self.session.id, exc)

    async def end(self, messages: list[StoredMessage], title: str | None = None) -> None:
        """The turn's outcome, in place of the pending mark (or the regenerated answer) if there is one."""
        await self.held.settle()
        await self.held.commit(messages, title=title, replacing=1 if self.marked else self.replaces)


async def record_unanswered(
    target: Turn | HeldSession, messages: list[StoredMessage], exc: BaseException | None
) -> None:
    session = target.session
    if isinstance(target, Turn) and target.replaces and not target.marked:
        # A regenerated answer that never began: the old one stays as it was.
        log.info("session %s: the regenerated answer ended without one (%r); the old answer stays", session.id, exc)
        return
    log.info("session %s: turn ended without an answer (%s: %r)", session.id, messages[0].status, exc)
    try:
        if isinstance(target, Turn):
            await target.end(messages)
        else:
            await target.commit(messages)
    except BotError:
        log.warning("session %s: could not record the unanswered turn", session.id, exc_info=True)


def title_from(text: str) -> str:
    first_line = " ".join(text.split())
    return first_line if len(first_line) <= TITLE_CHARS else first_line[: TITLE_CHARS - 1] + "…"
