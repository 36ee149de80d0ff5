"""`python -m bot chat`: the terminal chat, on the very same sessions, history, prompts and engine.

Terminal sessions are sessions of their own kind ("console"), listed and resumable like the others. Ctrl-C while
an answer is being written stops that answer, as Discord's Stop button does (the part written is kept, marked
stopped; a second Ctrl-C drops it); Ctrl-C at the prompt, Ctrl-D or /quit leave.
"""

from __future__ import annotations

import asyncio
import codecs
import contextlib
import itertools
import logging
import os
import signal
import sys
import threading
from collections.abc import Iterator
from typing import TextIO

from bot.chat import Turn, TurnInput
from bot.core import Core
from bot.errors import BotError
from bot.importer import plural
from bot.sessions import Place, Session

log = logging.getLogger(__name__)

CONSOLE_USER_ID = 0
HELP = """Commands:
  /new [title]     start a new session
  /list            list terminal sessions, newest first
  /resume ID       continue an earlier session
  /history         show this session's transcript
  /quit            leave (Ctrl-D, or Ctrl-C at the prompt, works too)
Anything else is a message to the model (start it with // to send text that begins with /).
Ctrl-C while an answer is being written stops it."""
RESUME_USAGE = "Usage: /resume ID (/list shows the IDs)."


class ConsoleChat:
    def __init__(self, core: Core, *, stdin: TextIO = sys.stdin, stdout: TextIO = sys.stdout) -> None:
        self.core = core
        self.stdin = stdin
        self.stdout = stdout
        self.place = Place(kind="console", user_id=CONSOLE_USER_ID)
        self._lines: asyncio.Queue[str | None] = asyncio.Queue()
        self._quitting = False
        self._answering: asyncio.Task[Session] | None = None
        self._turn: Turn | None = None

    def say(self, text: str = "", *, end: str = "\n") -> None:
        self.stdout.write(text + end)
        self.stdout.flush()

    async def read_line(self) -> str | None:
        """The next line typed, or None when the chat should end (Ctrl-D, Ctrl-C at the prompt)."""
        self.say("you> ", end="")
        line = await self._lines.get()
        return None if self._quitting else line

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        threading.Thread(target=self._read_lines, args=(loop,), name="console-stdin", daemon=True).start()
        with self._interrupts_handled(loop):
            session = await self.core.chat.current_session(self.place, owner_id=CONSOLE_USER_ID)
            self.say(f"Session {session.id} ({plural(session.turns, 'turn')}). Type /help for commands.")
            while (line := await self.read_line()) is not None:
                text = line.strip()
                if text.startswith("//"):
                    session = await self.answer(session, text[1:])
                elif text.startswith("/"):
                    command, _, argument = text.partition(" ")
                    if command in ("/quit", "/exit"):
                        break
                    session = await self.run_command(command, argument.strip(), session)
                elif text:
                    session = await self.answer(session, line)
        self.say("\nBye.")

    async def run_command(self, command: str, argument: str, session: Session) -> Session:
        """One /command; the session the chat goes on in."""
        if command == "/help":
            self.say(HELP)
        elif command == "/new":
            session = await self.core.chat.new_session(self.place, owner_id=CONSOLE_USER_ID, title=argument or None)
            self.say(f"New session {session.id}.")
        elif command == "/list":
            self.list_sessions(session)
        elif command == "/resume":
            if argument:
                session = await self.resume(argument) or session
            else:
                self.say(RESUME_USAGE)
        elif command == "/history":
            self.show_transcript(await self.core.store.get(session.id) or session)
        else:
            # A mistyped command sent to the model would cost an answer and a turn in history.
            self.say(f"Unknown command {command}: /help lists them (start with // to send text beginning with /).")
        return session

    def list_sessions(self, current: Session) -> None:
        summaries = self.core.store.list_sessions(kinds=["console"])
        if not summaries:
            self.say("No sessions yet.")
        for summary in summaries:
            marker = "*" if summary.id == current.id else " "
            turns = "turn " if summary.turns == 1 else "turns"
            self.say(f"{marker} {summary.id}  {summary.updated_at[:16]}  {summary.turns:3d} {turns}  {summary.title}")

    async def resume(self, session_id: str) -> Session | None:
        session = await self.core.store.get(session_id)
        if session is None or session.place.kind != "console":
            self.say(f"No terminal session {session_id!r}; /list shows them.")
            return None
        await self.core.store.set_current(self.place, session.id)
        self.say(f"Resumed {session.id}: {session.title} ({plural(session.turns, 'turn')}).")
        return session

    def show_transcript(self, session: Session) -> None:
        for message in session.messages:
            note = "" if message.status == "ok" else f" [{message.status}]"
            self.say(f"{message.role}{note}: {message.content}")

    async def answer(self, session: Session, text: str) -> Session:
        """The model's answer to `text`, streamed; a Ctrl-C meanwhile stops it (see _on_interrupt)."""
        self.say("bot> ", end="")
        self._answering = asyncio.create_task(self._write_answer(session, text), name="console-answer")
        try:
            return await self._answering
        except asyncio.CancelledError:
            current = asyncio.current_task()
            if current is not None and current.cancelling():
                raise  # the chat itself is being cancelled, not only this answer
            self.say(" [cancelled]")
            return await self.core.store.get(session.id) or session
        finally:
            self._answering = None
            self._turn = None

    async def _write_answer(self, session: Session, text: str) -> Session:
        try:
            async with self.core.chat.turn(
                TurnInput(place=self.place, author_id=CONSOLE_USER_ID, text=text), session_id=session.id
            ) as turn:
                self._turn = turn
                async for delta in turn.stream():
                    self.say(delta, end="")
            self.say(" [stopped]" if turn.stopped else "")
            return turn.session
        except BotError as exc:
            self.say(f"\n[{exc.user_message}]")
            return await self.core.store.get(session.id) or session

    def _on_interrupt(self) -> None:
        """Ctrl-C: stops the answer being written (the next token ends it; a second Ctrl-C drops it at once),
        or, at the prompt, ends the chat."""
        if self._answering is not None and not self._answering.done():
            if self._turn is not None and not self._turn.stopped:
                self._turn.stop()
            else:
                self._answering.cancel()
            return
        self._quitting = True
        self._lines.put_nowait(None)

    @contextlib.contextmanager
    def _interrupts_handled(self, loop: asyncio.AbstractEventLoop) -> Iterator[None]:
        try:
            loop.add_signal_handler(signal.SIGINT, self._on_interrupt)
        except (NotImplementedError, RuntimeError):
            # Windows, or not the main thread: Ctrl-C keeps ending the whole chat.
            yield
            return
        try:
            yield
        finally:
            loop.remove_signal_handler(signal.SIGINT)

    def _read_lines(self, loop: asyncio.AbstractEventLoop) -> None:
        # A daemon thread of its own rather than asyncio.to_thread: one blocked in a read must not hold up the exit
        # (asyncio.run waits for its executor's threads). It reads the file descriptor itself, since a daemon
        # thread inside sys.stdin's buffered reader can abort the interpreter's shutdown.
        try:
            lines: Iterator[str] = _lines_of_fd(self.stdin.fileno())
        except (OSError, ValueError):  # no file descriptor: a StringIO in a test
            lines = iter(self.stdin.readline, "")
        for line in itertools.chain((line.rstrip("\r\n") for line in lines), [None]):
            try:
                loop.call_soon_threadsafe(self._lines.put_nowait, line)
            except RuntimeError:  # the loop is closed: the chat is over
                return


def _lines_of_fd(fd: int) -> Iterator[str]:
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    pending = ""
    while chunk := os.read(fd, 65536):
        pending += decoder.decode(chunk)
        *complete, pending = pending.split("\n")
        yield from (line + "\n" for line in complete)
    pending += decoder.decode(b"", final=True)
    if pending:
        yield pending
