"""One conversation turn, from a user's text to a stored answer; shared by Discord and the terminal chat.

The flow: the place's current session → the renderer's prompt (bot/render/) → the engine's stream → the exchange
appended to history. A turn holds its session's lock from start to end, so two messages that
arrive at once in one session are answered one after the other, each seeing the one before.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncGenerator, AsyncIterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass

from bot.config import Settings
from bot.engine import Engine, GenerationRequest, SamplingParams
from bot.errors import BotError, MessageRejectedError, StorageError
from bot.history import HeldSession, HistoryStore
from bot.render import Renderer
from bot.sessions import MessageStatus, Place, Session, StoredMessage, utc_now_iso

log = logging.getLogger(__name__)

TITLE_CHARS = 60


@dataclass(frozen=True)
class TurnInput:
    place: Place
    author_id: int | None
    text: str
    message_id: int | None = None


@dataclass
class Turn:
    """A turn in progress: the session it belongs to and the answer's text as it streams."""

    session: Session
    queued_ahead: int
    # The place's session file could not be read, so this turn starts a new session: the user should know.
    history_lost: bool
    _deltas: AsyncIterator[str]
    answer: str = ""
    finished: bool = False

    async def stream(self) -> AsyncIterator[str]:
        async for delta in self._deltas:
            self.answer += delta
            yield delta
        self.finished = True


class ChatService:
    """Sessions, prompts and the engine put together; knows nothing of Discord."""

    def __init__(self, *, settings: Settings, store: HistoryStore, engine: Engine, renderer: Renderer) -> None:
        self.settings = settings
        self.store = store
        self.engine = engine
        self.renderer = renderer

    async def current_session(self, place: Place, *, owner_id: int | None) -> Session:
        """The place's current session, made on first use (or when the old file was broken and set aside)."""
        async with self._hold(place, owner_id) as held:
            return held.session

    def _hold(self, place: Place, owner_id: int | None) -> AbstractAsyncContextManager[HeldSession]:
        prompt = self.settings.chat.system_prompt
        return self.store.hold_current(place, owner_id=owner_id, system_prompt=prompt or None)

    async def new_session(
        self,
        place: Place,
        *,
        owner_id: int | None,
        title: str | None = None,
        system_prompt: str | None = None,
    ) -> Session:
        prompt = self.settings.chat.system_prompt if system_prompt is None else system_prompt
        return await self.store.create(
            place, owner_id=owner_id, title=title or "New chat", system_prompt=prompt or None
        )

    def check_length(self, text: str) -> None:
        limit = self.settings.chat.max_message_chars
        if len(text) > limit:
            raise MessageRejectedError(
                "message too long",
                user_message=f"Your message is {len(text)} characters; the limit is {limit}. Please shorten it.",
            )

    @asynccontextmanager
    async def turn(self, request: TurnInput, *, session_id: str | None = None) -> AsyncIterator[Turn]:
        """Run one turn in the place's current session (or `session_id`). The session is held under its one lock
        from the prompt to the end, so two messages at once in one session are answered one after the other, each
        seeing the one before. Whatever happens inside, history ends consistent: the exchange, or the user's
        message marked failed/cancelled (never a half-written answer)."""
        text = request.text.strip()
        if not text:
            # Nothing to keep: an empty message (or only a mention) is not a turn at all.
            raise MessageRejectedError("empty message", user_message="Send me some text and I'll answer it.")
        holding = self.store.hold(session_id) if session_id else self._hold(request.place, request.author_id)
        async with contextlib.AsyncExitStack() as stack:
            try:
                held = await stack.enter_async_context(holding)
            except LookupError as exc:
                raise StorageError(f"session {session_id} cannot be read: {exc}") from exc
            yield await stack.enter_async_context(self._turn_in(held, request, text))

    @asynccontextmanager
    async def _turn_in(self, held: HeldSession, request: TurnInput, text: str) -> AsyncIterator[Turn]:
        session = held.session
        user_message = StoredMessage(
            role="user",
            content=text,
            author_id=request.author_id,
            created_at=utc_now_iso(),
            discord_message_id=request.message_id,
        )
        deltas: AsyncGenerator[str, None] | None = None
        try:
            # Too long is checked here, not earlier, so the refused text is kept (marked failed), not lost.
            self.check_length(text)
            # Tokenizing a long history takes milliseconds: off the event loop.
            rendered = await asyncio.to_thread(self.renderer.render, session, text)
            queued_ahead = self.engine.waiting
            deltas = self.engine.generate(
                GenerationRequest(
                    prompt=rendered.prompt,
                    sampling=SamplingParams.from_settings(self.settings.model),
                    session_id=session.id,
                )
            )
            turn = Turn(session=session, queued_ahead=queued_ahead, history_lost=held.replaced_broken, _deltas=deltas)
            yield turn
        except BaseException as exc:
            # Errors fail the turn; CancelledError and GeneratorExit (the caller went away) cancel it.
            status: MessageStatus = "failed" if isinstance(exc, Exception) else "cancelled"
            await self._record_unanswered(held, user_message, status, exc)
            raise
        finally:
            if deltas is not None:
                # Takes the request out of the engine's batch if the stream was left early.
                await deltas.aclose()
        if not turn.finished:
            # The caller left the stream early (message deleted, shutdown): the turn has no answer.
            await self._record_unanswered(held, user_message, "cancelled", None)
            return
        answer = StoredMessage(
            role="assistant",
            content=turn.answer.strip(),
            author_id=None,
            created_at=utc_now_iso(),
        )
        title = _title_from(text) if session.turns == 0 and session.title == "New chat" else None
        turn.session = await held.commit([user_message, answer], title=title)

    async def _record_unanswered(
        self, held: HeldSession, message: StoredMessage, status: MessageStatus, exc: BaseException | None
    ) -> None:
        session = held.session
        log.info("session %s: turn ended without an answer (%s: %r)", session.id, status, exc)
        marked = StoredMessage(
            role=message.role,
            content=message.content,
            author_id=message.author_id,
            created_at=message.created_at,
            discord_message_id=message.discord_message_id,
            status=status,
        )
        try:
            await held.commit([marked])
        except BotError:
            log.warning("session %s: could not record the unanswered turn", session.id, exc_info=True)


def _title_from(text: str) -> str:
    first_line = " ".join(text.split())
    return first_line if len(first_line) <= TITLE_CHARS else first_line[: TITLE_CHARS - 1] + "…"
