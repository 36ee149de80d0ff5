"""Crash safety: `python -m bot` is killed (SIGKILL) at random moments while it writes history under load, and
restarted on the same data folder, round after round.

After each kill: every session file parses and nothing is quarantined when the bot starts again; every turn
the user saw answered in Discord (the bot's reply shows the final answer) is stored with that answer; no stored
answer is half-written. `CRASH_ROUNDS` (default 8) and `CRASH_SEED` (default random, printed) set the run.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from discord_harness import BotProcess, bot_config
from script_model import build_script_llama, expected_answer

from bot.history import HistoryStore
from bot.sessions import Session
from discord_emulator import Channel, DiscordEmulator, User, running_emulator

pytestmark = pytest.mark.crash

SCRIPT = "a b c d e f g h i j k l m n o p"
ANSWER_TOKENS = 16
ROUNDS = int(os.environ.get("CRASH_ROUNDS", "8"))


@dataclass
class Asked:
    message: dict[str, Any]
    channel: Channel
    round: int


@dataclass
class Load:
    """Users writing to the bot in several channels and threads, each waiting for one answer before the next."""

    emu: DiscordEmulator
    places: list[Channel]
    users: list[User]
    rng: random.Random
    asked: list[Asked] = field(default_factory=list)

    async def user_loop(self, user: User, round_number: int, final: str) -> None:
        while True:
            channel = self.rng.choice(self.places)
            sent = await self.emu.send_message(channel, user, f"{self.emu.bot_user.mention} round {round_number}")
            asked = Asked(sent, channel, round_number)
            self.asked.append(asked)
            # The next message once this one is answered or refused (a person reads, then types), or after a
            # while: an answer cut off by the kill never ends.
            for _ in range(150):
                if any(r["content"] == final or not r["content"].startswith(final[:3]) for r in self.replies(asked)):
                    break
                await asyncio.sleep(0.02)
            await asyncio.sleep(self.rng.uniform(0.0, 0.1))

    def replies(self, asked: Asked) -> list[dict[str, Any]]:
        bot_id = str(self.emu.bot_user.id)
        return [
            m
            for m in self.emu.messages_in(asked.channel)
            if m["author"]["id"] == bot_id
            and (m.get("message_reference") or {}).get("message_id") == asked.message["id"]
        ]


def sessions_on_disk(data_dir: Path) -> list[Session]:
    """Every session file, parsed; a file that does not parse fails the test (it would be quarantined)."""
    sessions = []
    for path in sorted((data_dir / "sessions").glob("*.json")):
        try:
            sessions.append(Session.from_json(json.loads(path.read_bytes())))
        except (ValueError, TypeError, KeyError) as exc:
            raise AssertionError(f"session file {path.name} does not load: {exc!r}") from exc
    return sessions


def stored_answers(sessions: list[Session]) -> dict[int, tuple[str, str | None]]:
    """Discord message id of each stored user message -> (its status, the answer stored after it or None)."""
    found: dict[int, tuple[str, str | None]] = {}
    for session in sessions:
        messages = session.messages
        for index, message in enumerate(messages):
            if message.role != "user" or message.discord_message_id is None:
                continue
            following = messages[index + 1] if index + 1 < len(messages) else None
            answer = following.content if following is not None and following.role == "assistant" else None
            found[message.discord_message_id] = (message.status, answer)
    return found


@pytest.fixture(scope="module")
def script_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_script_llama(tmp_path_factory.mktemp("crash-model"), SCRIPT)


async def test_killed_at_random_while_writing_history_nothing_acknowledged_is_lost(
    tmp_path: Path, script_model_dir: Path
) -> None:
    seed = int(os.environ.get("CRASH_SEED", random.randrange(2**32)))
    rng = random.Random(seed)
    final = expected_answer(SCRIPT, ANSWER_TOKENS).strip()
    data_dir = tmp_path / "data"
    async with running_emulator() as emu:
        guild = emu.add_guild("crash")
        users = [emu.add_user(f"user{n}") for n in range(6)]
        for user in users:
            emu.add_member(guild, user)
        channels = [emu.add_text_channel(guild, f"room-{n}") for n in range(3)]
        threads = [await emu.create_thread(channels[n], users[n], f"thread-{n}") for n in range(2)]
        load = Load(emu, [*channels, *threads], users, rng)
        config = bot_config(
            tmp_path / "config.toml",
            emu,
            script_model_dir,
            data_dir,
            model={"max_new_tokens": ANSWER_TOKENS},
            discord={"stream_edit_interval": 0.02},
        )
        acknowledged: dict[int, str] = {}
        kill_delays: list[float] = []
        for round_number in range(ROUNDS):
            async with await BotProcess.start(config, token=emu.token) as bot:
                await emu.wait_for(
                    lambda n=round_number: emu.gateway.identify_count > n and emu.gateway.ready_shards(),
                    timeout=120,
                    what="the bot to connect",
                )
                assert "quarantine" not in bot.log, bot.log
                asked_before = len(load.asked)
                writers = [asyncio.create_task(load.user_loop(user, round_number, final)) for user in users]
                # The kill comes at a random moment once this round's load is flowing (its first answer is
                # shown), not after a fixed time: a slow machine still kills mid-load, never before any.
                await emu.wait_for(
                    lambda n=asked_before: any(
                        reply["content"] == final for asked in load.asked[n:] for reply in load.replies(asked)
                    ),
                    timeout=120,
                    what="this round's first answer",
                )
                delay = rng.uniform(0.0, 1.7)
                kill_delays.append(delay)
                await asyncio.sleep(delay)
                bot.process.kill()
                await bot.wait()
                for writer in writers:
                    writer.cancel()
                await asyncio.gather(*writers, return_exceptions=True)
            assert not bot.errors(), bot.log
            # What Discord showed when the process died: a reply with the final answer is an acknowledged turn.
            for asked in load.asked:
                if any(reply["content"] == final for reply in load.replies(asked)):
                    acknowledged.setdefault(int(asked.message["id"]), final)
            stored = stored_answers(sessions_on_disk(data_dir))
            missing = [mid for mid in acknowledged if mid not in stored or stored[mid] != ("ok", final)]
            assert not missing, (
                f"round {round_number} (seed {seed}, killed after {delay:.2f}s): "
                f"{len(missing)} acknowledged turns not stored: {[stored.get(m) for m in missing]}"
            )
            assert all(answer in (None, final) for _, answer in stored.values()), "a half-written answer"

        # The restart path once more, as the bot runs it: nothing quarantined, every session indexed.
        async with HistoryStore(data_dir) as store:
            listed = store.list_sessions()
        assert not (data_dir / "quarantine").exists()
        assert len(listed) == len(sessions_on_disk(data_dir)) == len(load.places)

    stored_total = sum(1 for status, answer in stored.values() if status == "ok" and answer == final)
    print(
        f"\ncrash safety: {ROUNDS} SIGKILL rounds (seed {seed}), kills {min(kill_delays):.2f}-"
        f"{max(kill_delays):.2f}s after each round's first answer; {len(load.asked)} messages sent, "
        f"{len(acknowledged)} acknowledged answers, {stored_total} stored answers, 0 lost"
    )
    assert len(acknowledged) >= ROUNDS, "the load produced answered turns to check"
