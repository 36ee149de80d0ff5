"""A load test through the Discord API emulator: many users in many channels and threads send messages in bursts
to the real bot (our ChatBot, the real engine on a tiny LLaMA); every message must get exactly one answer or one
clear refusal, and every answer must be in history, in order.

    python -m tests.load_test --users 200 --places 50 --messages 1000      # from the repository root
    python -m tests.load_test --messages 5000 --max-queue 64 --model /path/to/model

tests/test_load.py runs it at the size the issue asks for and asserts the invariants.
"""

from __future__ import annotations

import sys
from pathlib import Path

if __package__:
    # Run as `python -m tests.load_test`: the test helpers import each other by their bare names.
    sys.path.insert(0, str(Path(__file__).resolve().parent))

import argparse
import asyncio
import logging
import random
import statistics
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from discord_harness import bot_settings, running_chat_bot

from bot.client import ChatBot
from bot.sessions import Place
from discord_emulator import Channel, DiscordEmulator, running_emulator

log = logging.getLogger("load_test")


@dataclass(frozen=True)
class LoadShape:
    users: int = 200
    places: int = 50  # a fifth of them threads
    messages: int = 1000
    bursts: int = 10
    max_new_tokens: int = 8
    max_queue: int = 16
    max_batch_size: int = 8
    seed: int = 1
    settle_timeout: float = 600.0


@dataclass
class LoadFigures:
    messages: int
    answered: int
    refused: int
    lost: int
    refusals: Counter[str]
    first_reply_p50: float
    first_reply_p95: float
    answer_p50: float
    answer_p95: float
    wall: float
    rss_before_mib: float
    peak_rss_mib: float
    problems: list[str] = field(default_factory=list)

    def table(self) -> str:
        rows = [
            ("messages", f"{self.messages}"),
            ("answered", f"{self.answered}"),
            ("refused", f"{self.refused}"),
            ("lost", f"{self.lost}"),
            ("first reply p50 / p95", f"{self.first_reply_p50:.2f} s / {self.first_reply_p95:.2f} s"),
            ("whole answer p50 / p95", f"{self.answer_p50:.2f} s / {self.answer_p95:.2f} s"),
            ("wall time", f"{self.wall:.1f} s"),
            ("RSS before / peak", f"{self.rss_before_mib:.0f} MiB / {self.peak_rss_mib:.0f} MiB"),
        ]
        rows += [(f"  refused: {text[:40]}…", f"{count}") for text, count in self.refusals.most_common()]
        width = max(len(name) for name, _ in rows)
        return "\n".join(f"{name.ljust(width)}  {value}" for name, value in rows)

    def properties(self) -> dict[str, Any]:
        return {
            "answered": self.answered,
            "refused": self.refused,
            "lost": self.lost,
            "first_reply_p50_s": round(self.first_reply_p50, 3),
            "first_reply_p95_s": round(self.first_reply_p95, 3),
            "answer_p50_s": round(self.answer_p50, 3),
            "answer_p95_s": round(self.answer_p95, 3),
            "peak_rss_mib": round(self.peak_rss_mib),
        }


@dataclass
class Sent:
    message: dict[str, Any]
    channel: Channel
    at: float


def _status_kib(field_name: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field_name + ":"):
            return int(line.split()[1])
    return 0


def reset_peak_rss() -> None:
    """Start VmHWM afresh (Linux: writing 5 to clear_refs), so the peak is this run's, not an earlier test's."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        log.info("cannot reset the peak RSS; it covers the whole process")


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[int(q) - 1]


def place_of(emu: DiscordEmulator, channel: Channel) -> Place:
    if channel.is_thread:
        return Place(kind="thread", guild_id=channel.guild_id, channel_id=channel.parent_id, thread_id=channel.id)
    return Place(kind="channel", guild_id=channel.guild_id, channel_id=channel.id)


async def send_bursts(emu: DiscordEmulator, places: list[Channel], shape: LoadShape) -> list[Sent]:
    rng = random.Random(shape.seed)
    users = [emu.store.users[uid] for uid in sorted(emu.store.users) if not emu.store.users[uid].bot]
    loop = asyncio.get_running_loop()
    sent: list[Sent] = []
    per_burst = [shape.messages // shape.bursts + (i < shape.messages % shape.bursts) for i in range(shape.bursts)]
    for number, size in enumerate(per_burst):
        for _ in range(size):
            channel, user = rng.choice(places), rng.choice(users)
            at = loop.time()
            message = await emu.send_message(channel, user, f"{emu.bot_user.mention} burst {number}: hello {user.id}")
            sent.append(Sent(message, channel, at))
        await asyncio.sleep(rng.uniform(0.2, 1.0))
    return sent


async def settle(emu: DiscordEmulator, bot: ChatBot, sent: list[Sent], timeout: float) -> None:  # noqa: ASYNC109
    """Waits until every message has a reply and the bot has no turn running."""
    cog = bot.get_cog("ChatCog")
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        replied = {int(c.json["message_reference"]["message_id"]) for c in _reply_posts(emu)}
        busy = bool(getattr(cog, "turn_tasks", None)) or bot.core.engine.running or bot.core.engine.waiting
        if not busy and all(int(s.message["id"]) in replied for s in sent):
            return
        await asyncio.sleep(0.25)
    log.warning("the load did not settle within %.0fs", timeout)


def _reply_posts(emu: DiscordEmulator) -> list[Any]:
    return [
        c
        for c in emu.calls("POST", r"/channels/\d+/messages")
        if c.status == 200 and isinstance(c.json, dict) and c.json.get("message_reference")
    ]


async def measure(emu: DiscordEmulator, bot: ChatBot, sent: list[Sent]) -> tuple[int, int, Counter[str], list[str]]:
    """(answered, refused, refusal sentences, problems): each problem is a lost or doubled message."""
    bot_id = str(emu.bot_user.id)
    replies: dict[str, list[dict[str, Any]]] = {}
    for channel in {s.channel.id: s.channel for s in sent}.values():
        for message in emu.messages_in(channel):
            reference = (message.get("message_reference") or {}).get("message_id")
            if message["author"]["id"] == bot_id and reference:
                replies.setdefault(reference, []).append(message)
    stored: dict[int, tuple[str, str | None]] = {}
    problems: list[str] = []
    for channel in {s.channel.id: s.channel for s in sent}.values():
        session = await bot.core.store.current(place_of(emu, channel))
        if session is None:
            continue
        ok_ids = []
        for index, message in enumerate(session.messages):
            if message.role != "user" or message.discord_message_id is None:
                continue
            following = session.messages[index + 1] if index + 1 < len(session.messages) else None
            answer = following.content if following is not None and following.role == "assistant" else None
            stored[message.discord_message_id] = (message.status, answer)
            if message.status == "ok":
                ok_ids.append(message.discord_message_id)
                if answer is None:
                    problems.append(f"session {session.id}: message {message.discord_message_id} has no answer")
        if ok_ids != sorted(ok_ids):
            problems.append(f"session {session.id}: answered turns out of order")
    answered = refused = 0
    refusals: Counter[str] = Counter()
    for item in sent:
        got = replies.get(item.message["id"], [])
        status, answer = stored.get(int(item.message["id"]), (None, None))
        if len(got) != 1:
            problems.append(f"message {item.message['id']}: {len(got)} replies")
        elif status == "ok" and answer is not None and got[0]["content"] == answer:
            answered += 1
        elif status != "ok" and got[0]["content"] != answer:
            refused += 1
            refusals[got[0]["content"]] += 1
        else:
            problems.append(f"message {item.message['id']}: reply {got[0]['content']!r} vs stored {answer!r}")
    return answered, refused, refusals, problems


def latencies(emu: DiscordEmulator, sent: list[Sent]) -> tuple[list[float], list[float]]:
    """Seconds from each message to the bot's first reply, and to the last write of the answer's message."""
    first_post: dict[int, Any] = {}
    for call in _reply_posts(emu):
        first_post.setdefault(int(call.json["message_reference"]["message_id"]), call)
    last_write: dict[str, float] = {}
    for call in emu.calls("PATCH", r"/channels/\d+/messages/\d+"):
        last_write[call.path.rsplit("/", 1)[1]] = call.time
    to_first, to_last = [], []
    for item in sent:
        post = first_post.get(int(item.message["id"]))
        if post is None:
            continue
        to_first.append(post.time - item.at)
        # The reply's id is in the emulator's answer, not the request: find it by its reference.
        replied = [
            m
            for m in emu.messages_in(item.channel)
            if (m.get("message_reference") or {}).get("message_id") == item.message["id"]
        ]
        if replied:
            to_last.append(last_write.get(replied[0]["id"], post.time) - item.at)
    return to_first, to_last


async def run_load(model_dir: Path, data_dir: Path, shape: LoadShape = LoadShape()) -> LoadFigures:
    async with running_emulator() as emu:
        guild = emu.add_guild("load")
        for number in range(shape.users):
            emu.add_member(guild, emu.add_user(f"user{number}"))
        users = [u for u in emu.store.users.values() if not u.bot]
        thread_count = shape.places // 5
        channels = [emu.add_text_channel(guild, f"room-{n}") for n in range(shape.places - thread_count)]
        threads = [
            emu.add_thread(channels[n % len(channels)], f"thread-{n}", owner=users[n % len(users)])
            for n in range(thread_count)
        ]
        settings = bot_settings(
            emu,
            model_dir,
            data_dir,
            discord={"stream_edit_interval": 0.5},
            model={
                "max_new_tokens": shape.max_new_tokens,
                "max_queue": shape.max_queue,
                "max_batch_size": shape.max_batch_size,
            },
        )
        async with running_chat_bot(emu, settings) as bot:
            rss_before = _status_kib("VmRSS") / 1024
            reset_peak_rss()
            started = time.monotonic()
            sent = await send_bursts(emu, [*channels, *threads], shape)
            await settle(emu, bot, sent, shape.settle_timeout)
            wall = time.monotonic() - started
            peak = _status_kib("VmHWM") / 1024
            answered, refused, refusals, problems = await measure(emu, bot, sent)
            to_first, to_last = latencies(emu, sent)
    lost = len(sent) - answered - refused
    return LoadFigures(
        messages=len(sent),
        answered=answered,
        refused=refused,
        lost=lost,
        refusals=refusals,
        first_reply_p50=percentile(to_first, 50),
        first_reply_p95=percentile(to_first, 95),
        answer_p50=percentile(to_last, 50),
        answer_p95=percentile(to_last, 95),
        wall=wall,
        rss_before_mib=rss_before,
        peak_rss_mib=peak,
        problems=problems,
    )


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m tests.load_test", description=__doc__.split("\n\n")[0])
    defaults = LoadShape()
    for name in ("users", "places", "messages", "bursts", "max_new_tokens", "max_queue", "max_batch_size", "seed"):
        parser.add_argument("--" + name.replace("_", "-"), type=int, default=getattr(defaults, name))
    parser.add_argument("--model", type=Path, help="a model folder (default: a tiny random LLaMA built now)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)-8s %(name)s: %(message)s")
    shape = LoadShape(**{k: v for k, v in vars(args).items() if k != "model"})
    with tempfile.TemporaryDirectory(prefix="load-test-") as tmp:
        model_dir = args.model
        if model_dir is None:
            from model_fixtures import build_tiny_llama

            model_dir = build_tiny_llama(Path(tmp) / "tiny-llama")
        figures = asyncio.run(run_load(model_dir, Path(tmp) / "data", shape))
    print(figures.table())
    for problem in figures.problems[:20]:
        print("problem:", problem)
    sys.exit(1 if figures.lost or figures.problems else 0)


if __name__ == "__main__":
    main()
