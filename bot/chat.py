"""One conversation turn, from a user's text to a stored answer; shared by Discord and the terminal chat.

The flow: the place's current session → its history → prompt token IDs within the budget → the engine's stream
→ the exchange appended to history. A turn holds its session's lock from start to end, so two messages that
arrive at once in one session are answered one after the other, each seeing the one before.
"""

from __future__ import annotations

import asyncio
import logging
import weakref
from collections.abc import AsyncGenerator, AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

from bot.config import Settings
from bot.engine import ChatMessage, Engine, GenerationRequest, SamplingParams
from bot.errors import BotError, MessageRejectedError, PromptTooLongError
from bot.history import HistoryStore
from bot.prompt import Exchange, PromptFormat, build_prompt, neutralise_control_tags
from bot.sessions import MessageStatus, Place, Session, StoredMessage, utc_now_iso

log = logging.getLogger(__name__)

TITLE_CHARS = 60
# Without a tokenizer the budget is guessed from characters; 3 per token errs on the short side for most text.
CHARS_PER_TOKEN_GUESS = 3


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

    def __init__(
        self, *, settings: Settings, store: HistoryStore, engine: Engine, prompt_format: PromptFormat | None
    ) -> None:
        self.settings = settings
        self.store = store
        self.engine = engine
        # None when the engine has no tokenizer (a remote server): prompts then go as messages alone.
        self.prompt_format = prompt_format
        # Entries vanish when no coroutine holds the lock, so this stays as small as the places in use now.
        self._place_locks: weakref.WeakValueDictionary[str, asyncio.Lock] = weakref.WeakValueDictionary()

    async def current_session(self, place: Place, *, owner_id: int | None, title: str | None = None) -> Session:
        """The place's current session, made on first use (or when the old file was broken and set aside)."""
        lock = self._place_locks.setdefault(place.key, asyncio.Lock())
        # Two first messages at once in a new place must land in one session, not make two.
        async with lock:
            session = await self.store.current(place)
            if session is None:
                session = await self.new_session(place, owner_id=owner_id, title=title)
            return session

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
    async def turn(self, request: TurnInput, *, session: Session | None = None) -> AsyncIterator[Turn]:
        """Run one turn. Whatever happens inside, history ends consistent: the exchange, or the user's
        message marked failed/cancelled (never a half-written answer)."""
        text = request.text.strip()
        if not text:
            # Nothing to keep: an empty message (or only a mention) is not a turn at all.
            raise MessageRejectedError("empty message", user_message="Send me some text and I'll answer it.")
        if session is None:
            session = await self.current_session(request.place, owner_id=request.author_id)
        async with self.store.session_lock(session.id):
            # Re-read under the lock: a turn that finished while we waited is part of this prompt.
            session = await self.store.get(session.id) or session
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
                token_ids, messages = await asyncio.to_thread(self._prompt, session, text)
                queued_ahead = self.engine.waiting
                deltas = self.engine.generate(
                    GenerationRequest(
                        prompt_ids=tuple(token_ids),
                        sampling=SamplingParams.from_settings(self.settings.model),
                        session_id=session.id,
                        messages=messages,
                    )
                )
                turn = Turn(session=session, queued_ahead=queued_ahead, _deltas=deltas)
                yield turn
            except BaseException as exc:
                # Errors fail the turn; CancelledError and GeneratorExit (the caller went away) cancel it.
                status: MessageStatus = "failed" if isinstance(exc, Exception) else "cancelled"
                await self._record_unanswered(session, user_message, status, exc)
                raise
            finally:
                if deltas is not None:
                    # Takes the request out of the engine's batch if the stream was left early.
                    await deltas.aclose()
            if not turn.finished:
                # The caller left the stream early (message deleted, shutdown): the turn has no answer.
                await self._record_unanswered(session, user_message, "cancelled", None)
                return
            answer = StoredMessage(
                role="assistant",
                content=turn.answer.strip(),
                author_id=None,
                created_at=utc_now_iso(),
            )
            title = _title_from(text) if session.turns == 0 and session.title == "New chat" else None
            turn.session = await self.store.append(session.id, [user_message, answer], title=title)

    def _prompt_ids(self, session: Session, text: str) -> list[int]:
        return self._prompt(session, text)[0]

    def _prompt(self, session: Session, text: str) -> tuple[list[int], tuple[ChatMessage, ...]]:
        """The prompt's token IDs and the same conversation as messages (for servers that template it).

        History keeps what users typed; only the prompt gets their text with LLaMA-2's markers defused."""
        text = neutralise_control_tags(text)
        system_prompt = neutralise_control_tags(session.system_prompt) if session.system_prompt else None
        history = [Exchange(user=neutralise_control_tags(u), assistant=a) for u, a in session.exchanges()]
        if self.prompt_format is None:
            kept = self._fit_by_chars(system_prompt, history, text)
            return [], _messages(system_prompt, kept, text)
        built = build_prompt(
            self.prompt_format,
            system_prompt,
            history,
            text,
            context_length=self.engine.context_length,
            max_new_tokens=self.settings.model.max_new_tokens,
        )
        if built.dropped_exchanges:
            log.info(
                "session %s: %d oldest exchanges left out of the prompt to fit the context window",
                session.id,
                built.dropped_exchanges,
            )
        kept = history[built.dropped_exchanges :]
        return built.token_ids, _messages(system_prompt, kept, text)

    def _fit_by_chars(self, system_prompt: str | None, history: list[Exchange], text: str) -> list[Exchange]:
        """The newest exchanges whose guessed token count fits the budget (no tokenizer to count with)."""
        budget = self.engine.context_length - self.settings.model.max_new_tokens

        def guess(chars: int) -> int:
            return -(-chars // CHARS_PER_TOKEN_GUESS)

        used = guess(len(system_prompt or "") + len(text))
        if used > budget:
            raise PromptTooLongError(guess(len(text)), max(0, budget - guess(len(system_prompt or ""))))
        keep = len(history)
        while keep > 0:
            cost = guess(len(history[keep - 1].user) + len(history[keep - 1].assistant))
            if used + cost > budget:
                break
            used += cost
            keep -= 1
        return history[keep:]

    async def _record_unanswered(
        self, session: Session, message: StoredMessage, status: MessageStatus, exc: BaseException | None
    ) -> None:
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
            await self.store.append(session.id, [marked])
        except BotError:
            log.warning("session %s: could not record the unanswered turn", session.id, exc_info=True)


def _messages(system_prompt: str | None, history: list[Exchange], text: str) -> tuple[ChatMessage, ...]:
    messages = [ChatMessage("system", system_prompt)] if system_prompt else []
    for exchange in history:
        messages += [ChatMessage("user", exchange.user), ChatMessage("assistant", exchange.assistant)]
    messages.append(ChatMessage("user", text))
    return tuple(messages)


def _title_from(text: str) -> str:
    first_line = " ".join(text.split())
    return first_line if len(first_line) <= TITLE_CHARS else first_line[: TITLE_CHARS - 1] + "…"
