"""End-to-end checks of the Discord emulator with a real discord.py AutoShardedBot."""

from __future__ import annotations

import asyncio
import io
from collections.abc import AsyncIterator
from dataclasses import dataclass

import discord
import pytest
from discord import app_commands
from discord.ext import commands

from discord_emulator import (
    EPHEMERAL,
    Channel,
    DiscordEmulator,
    Guild,
    User,
    fail_on_logged_errors,
    run_bot,
    running_emulator,
)

FRUITS = ("apple", "apricot", "banana")


class Panel(discord.ui.View):
    def __init__(self, clicks: list[str]) -> None:
        super().__init__(timeout=None)
        self.clicks = clicks

    @discord.ui.button(label="OK", custom_id="panel:ok")
    async def ok(self, interaction: discord.Interaction, button: discord.ui.Button[Panel]) -> None:
        self.clicks.append(interaction.user.name)
        await interaction.response.edit_message(content=f"pressed by {interaction.user.name}", view=None)


class Probe(commands.Cog):
    """Listeners and commands that exercise one emulator feature each."""

    def __init__(self, bot: ProbeBot) -> None:
        self.bot = bot

    @commands.Cog.listener()
    async def on_message(self, message: discord.Message) -> None:
        bot = self.bot
        if message.author == bot.user:
            return
        bot.seen.append(message)
        text = message.content
        if text == "boom":
            raise RuntimeError("boom in on_message")
        if text.endswith("thread please"):
            thread = await message.create_thread(name="from message")
            await thread.send("inside the thread")
        elif text.endswith("channel thread"):
            assert isinstance(message.channel, discord.TextChannel)
            thread = await message.channel.create_thread(name="in channel", type=discord.ChannelType.public_thread)
            await thread.send("first post")
        elif text.endswith("file please"):
            async with message.channel.typing():
                sent = await message.channel.send("here", file=discord.File(io.BytesIO(b"hello"), "a.txt"))
            fetched = await message.channel.fetch_message(sent.id)
            bot.downloads.append(await fetched.attachments[0].read())
            temp = await message.channel.send("temporary")
            await temp.delete()
        elif text.endswith("edit me"):
            sent = await message.channel.send("draft")
            await sent.edit(content="final")
        elif bot.user in message.mentions or isinstance(message.channel, discord.DMChannel):
            await message.reply(f"echo: {text}", allowed_mentions=discord.AllowedMentions.none())

    @commands.Cog.listener()
    async def on_raw_message_delete(self, payload: discord.RawMessageDeleteEvent) -> None:
        self.bot.deleted.append(payload.message_id)

    @commands.Cog.listener()
    async def on_thread_create(self, thread: discord.Thread) -> None:
        self.bot.threads.append(thread)

    @app_commands.command(name="ask")
    @app_commands.describe(topic="What to ask about")
    async def ask(self, interaction: discord.Interaction, topic: str) -> None:
        """Defers, then answers with a followup."""
        await interaction.response.defer(thinking=True)
        await interaction.followup.send(f"answer about {topic}")

    @app_commands.command(name="hello")
    async def hello(self, interaction: discord.Interaction) -> None:
        """Ephemeral answer, then an edit of it."""
        await interaction.response.send_message("hi", ephemeral=True)
        await interaction.edit_original_response(content="hi, edited")

    @app_commands.command(name="pick")
    async def pick(self, interaction: discord.Interaction, fruit: str) -> None:
        """Autocompleted option."""
        await interaction.response.send_message(f"picked {fruit}")

    @pick.autocomplete("fruit")
    async def fruit_choices(self, interaction: discord.Interaction, current: str) -> list[app_commands.Choice[str]]:
        return [app_commands.Choice(name=f, value=f) for f in FRUITS if f.startswith(current)]

    @app_commands.command(name="panel")
    async def panel(self, interaction: discord.Interaction) -> None:
        """A message with a button."""
        await interaction.response.send_message("panel", view=Panel(self.bot.clicks))


class ProbeBot(commands.AutoShardedBot):
    def __init__(self) -> None:
        intents = discord.Intents.default()
        intents.message_content = True
        intents.members = True
        super().__init__(command_prefix="!", intents=intents, guild_ready_timeout=0.1, help_command=None)
        self.seen: list[discord.Message] = []
        self.threads: list[discord.Thread] = []
        self.clicks: list[str] = []
        self.downloads: list[bytes] = []
        self.deleted: list[int] = []

    async def setup_hook(self) -> None:
        await self.add_cog(Probe(self))

    async def before_identify_hook(self, shard_id: int | None, *, initial: bool = False) -> None:
        # The default waits 5 s between shards to respect Discord's identify rate limit.
        return None


@dataclass
class World:
    emu: DiscordEmulator
    guild: Guild
    general: Channel
    secret: Channel
    alice: User


@pytest.fixture
async def world() -> AsyncIterator[World]:
    async with running_emulator() as emu:
        guild = emu.add_guild("test guild")
        alice = emu.add_user("alice")
        emu.add_member(guild, alice)
        general = emu.add_text_channel(guild, "general")
        secret = emu.add_text_channel(guild, "secret", hidden_from=[alice])
        yield World(emu, guild, general, secret, alice)


@pytest.fixture
async def bot(world: World) -> AsyncIterator[ProbeBot]:
    client = ProbeBot()
    with fail_on_logged_errors():
        async with run_bot(client, world.emu):
            await client.tree.sync()
            yield client


async def test_bot_connects_and_sees_guild(world: World, bot: ProbeBot) -> None:
    await world.emu.wait_ready()
    guild = bot.get_guild(world.guild.id)
    assert guild is not None
    assert {c.name for c in guild.text_channels} == {"general", "secret"}
    assert bot.user is not None and bot.user.id == world.emu.bot_user.id
    alice = guild.get_member(world.alice.id)
    assert alice is not None
    secret = guild.get_channel(world.secret.id)
    general = guild.get_channel(world.general.id)
    assert isinstance(secret, discord.TextChannel) and isinstance(general, discord.TextChannel)
    assert not secret.permissions_for(alice).view_channel
    assert general.permissions_for(alice).view_channel
    assert secret.permissions_for(guild.me).send_messages
    assert world.emu.calls("GET", "/gateway/bot")


async def test_command_sync_is_recorded(world: World, bot: ProbeBot) -> None:
    emu = world.emu
    (global_sync,) = emu.calls("PUT", rf"/applications/{emu.application_id}/commands")
    assert {c["name"] for c in global_sync.json} == {"ask", "hello", "pick", "panel"}
    bot.tree.copy_global_to(guild=discord.Object(world.guild.id))
    synced = await bot.tree.sync(guild=discord.Object(world.guild.id))
    assert {c.name for c in synced} == {"ask", "hello", "pick", "panel"}
    assert all(c.id for c in synced)
    assert emu.calls("PUT", rf"/applications/\d+/guilds/{world.guild.id}/commands")


async def test_reply_records_reference_and_allowed_mentions(world: World, bot: ProbeBot) -> None:
    emu = world.emu
    sent = await emu.send_message(world.general, world.alice, f"{emu.bot_user.mention} hello there")
    assert [m["id"] for m in sent["mentions"]] == [str(emu.bot_user.id)]
    reply = await emu.wait_for_message(world.general, after=sent)
    assert reply["content"] == f"echo: {emu.bot_user.mention} hello there"
    assert reply["message_reference"]["message_id"] == sent["id"]
    (call,) = emu.calls("POST", rf"/channels/{world.general.id}/messages")
    assert call.json["message_reference"]["message_id"] == int(sent["id"])
    assert call.json["allowed_mentions"] == {"parse": []}
    assert reply["mentions"] == []


async def test_edit_is_recorded_and_stored(world: World, bot: ProbeBot) -> None:
    emu = world.emu
    sent = await emu.send_message(world.general, world.alice, "please edit me")
    call = await emu.wait_for_call("PATCH", rf"/channels/{world.general.id}/messages/\d+")
    assert call.json["content"] == "final"
    (message,) = emu.bot_messages_in(world.general)
    assert message["content"] == "final" and message["edited_timestamp"] is not None
    assert int(message["id"]) > int(sent["id"])


async def test_files_typing_fetch_and_delete(world: World, bot: ProbeBot) -> None:
    emu = world.emu
    await emu.send_message(world.general, world.alice, "file please")
    await emu.wait_for(lambda: bot.downloads, what="the attachment download")
    assert bot.downloads == [b"hello"]
    assert emu.calls("POST", rf"/channels/{world.general.id}/typing")
    upload = emu.calls("POST", rf"/channels/{world.general.id}/messages")[0]
    assert upload.json["content"] == "here" and [(f.filename, f.data) for f in upload.files] == [("a.txt", b"hello")]
    await emu.wait_for_call("DELETE", rf"/channels/{world.general.id}/messages/\d+")
    assert [m["content"] for m in emu.bot_messages_in(world.general)] == ["here"]
    assert emu.bot_messages_in(world.general)[0]["attachments"][0]["filename"] == "a.txt"

    user_message = await emu.send_message(world.general, world.alice, "soon gone")
    await emu.delete_message(user_message)
    await emu.wait_for(lambda: int(user_message["id"]) in bot.deleted, what="MESSAGE_DELETE")
    channel = await bot.fetch_channel(world.general.id)
    assert channel.name == "general"


async def test_threads_from_message_and_in_channel(world: World, bot: ProbeBot) -> None:
    emu = world.emu
    starter = await emu.send_message(world.general, world.alice, "thread please")
    await emu.wait_for(lambda: len(bot.threads) == 1, what="THREAD_CREATE")
    (thread,) = emu.threads_of(world.general)
    assert thread.id == int(starter["id"]) and bot.threads[0].id == thread.id
    await emu.wait_for_message(thread, check=lambda m: m["content"] == "inside the thread")

    await emu.send_message(world.general, world.alice, "channel thread")
    await emu.wait_for(lambda: len(bot.threads) == 2, what="second THREAD_CREATE")
    created = bot.threads[1]
    assert created.parent_id == world.general.id and created.name == "in channel"
    (call,) = emu.calls("POST", rf"/channels/{world.general.id}/threads")
    assert call.json["type"] == discord.ChannelType.public_thread.value

    incoming = await emu.send_message(created.id, world.alice, "message in the thread")
    seen = await emu.wait_for(lambda: [m for m in bot.seen if m.id == int(incoming["id"])], what="thread message")
    assert isinstance(seen[0].channel, discord.Thread) and seen[0].channel.parent_id == world.general.id


async def test_slash_command_defer_and_followup(world: World, bot: ProbeBot) -> None:
    emu = world.emu
    itx = await emu.invoke_command(world.general, world.alice, "ask", {"topic": "llamas"})
    await emu.wait_for(lambda: not itx.is_loading() and itx.original(), what="the followup")
    assert itx.response_type == 5 and not itx.ephemeral
    original = itx.original()
    assert original is not None and original["content"] == "answer about llamas"
    assert emu.calls("POST", rf"/webhooks/{emu.application_id}/{itx.token}")


async def test_slash_command_ephemeral_send_and_edit(world: World, bot: ProbeBot) -> None:
    emu = world.emu
    itx = await emu.invoke_command(world.general, world.alice, "hello")
    await emu.wait_for_call("PATCH", rf"/webhooks/\d+/{itx.token}/messages/@original")
    assert itx.response_type == 4 and itx.ephemeral
    (callback,) = emu.calls("POST", rf"/interactions/{itx.id}/{itx.token}/callback")
    assert callback.json["data"]["flags"] & EPHEMERAL
    original = itx.original()
    assert original is not None and original["content"] == "hi, edited"
    assert original not in emu.messages_in(world.general, include_ephemeral=False)


async def test_autocomplete_returns_choices(world: World, bot: ProbeBot) -> None:
    emu = world.emu
    itx = await emu.autocomplete(world.general, world.alice, "pick", {"fruit": "ap"}, focused="fruit")
    await emu.wait_for_response(itx)
    assert [c["value"] for c in itx.choices] == ["apple", "apricot"]


async def test_button_click_reaches_view(world: World, bot: ProbeBot) -> None:
    emu = world.emu
    itx = await emu.invoke_command(world.general, world.alice, "panel")
    await emu.wait_for_response(itx)
    panel = itx.original()
    assert panel is not None and panel["components"]
    click = await emu.click_button(panel, world.alice, "panel:ok")
    await emu.wait_for_response(click)
    assert bot.clicks == ["alice"]
    updated = emu.message(world.general, panel["id"])
    assert updated["content"] == "pressed by alice" and updated["components"] == []


async def test_dm_reaches_bot_and_reply_goes_to_dm(world: World, bot: ProbeBot) -> None:
    emu = world.emu
    sent = await emu.send_dm(world.alice, "hi in private")
    dm = emu.dm_channel(world.alice)
    reply = await emu.wait_for_message(dm, after=sent)
    assert reply["content"] == "echo: hi in private"
    assert "guild_id" not in reply
    assert isinstance(bot.seen[-1].channel, discord.DMChannel)
    itx = await emu.invoke_command(dm, world.alice, "ask", {"topic": "privacy"})
    await emu.wait_for(lambda: not itx.is_loading() and itx.original(), what="the DM followup")
    assert "user" in itx.payload and "member" not in itx.payload
    assert emu.messages_in(dm)[-1]["content"] == "answer about privacy"


async def test_gateway_resume_replays_missed_events(world: World, bot: ProbeBot) -> None:
    emu = world.emu
    await emu.close_gateway(code=4000)
    sent = await emu.send_message(world.general, world.alice, f"{emu.bot_user.mention} after the drop")
    await emu.wait_for_message(world.general, after=sent)
    assert emu.gateway.resume_count == 1 and emu.gateway.identify_count == 1


async def test_injected_rate_limit_is_retried(world: World, bot: ProbeBot) -> None:
    emu = world.emu
    rule = emu.fail_next(rf"/channels/{world.general.id}/messages", method="POST", status=429, retry_after=0.01)
    sent = await emu.send_message(world.general, world.alice, f"{emu.bot_user.mention} limited")
    await emu.wait_for_message(world.general, after=sent)
    assert len(rule.hits) == 1
    assert [c.status for c in emu.calls("POST", rf"/channels/{world.general.id}/messages")] == [429, 200]


async def test_a_slow_response_is_carried_out_at_once_and_answered_when_the_hold_ends(
    world: World, bot: ProbeBot
) -> None:
    emu = world.emu
    messages = rf"/channels/{world.general.id}/messages"
    async with emu.slow_responses(messages, method="POST") as held:
        await emu.send_message(world.general, world.alice, "please edit me")
        await emu.wait_for(lambda: held.hits, what="the held send")
        # The draft is in the channel, but the bot's send() has not returned, so it cannot edit it yet.
        shown = [m["content"] for m in emu.bot_messages_in(world.general)]
        edits_while_held = emu.calls("PATCH", messages + r"/\d+")
    await emu.wait_for_call("PATCH", messages + r"/\d+")
    assert shown == ["draft"] and edits_while_held == []
    assert [m["content"] for m in emu.bot_messages_in(world.general)] == ["final"]


async def test_two_shards_split_guilds() -> None:
    async with running_emulator(shard_count=2) as emu:
        guilds = [emu.add_guild(f"guild {i}") for i in range(4)]
        client = ProbeBot()
        with fail_on_logged_errors():
            async with run_bot(client, emu):
                await emu.wait_ready()
                assert {g.id for g in client.guilds} == {g.id for g in guilds}
                assert sorted(s.shard_count for s in emu.gateway.active.values()) == [2, 2]
                assert client.shard_count == 2


async def test_error_log_helper_catches_handler_exceptions(world: World) -> None:
    client = ProbeBot()
    async with run_bot(client, world.emu):
        with pytest.raises(AssertionError, match="boom in on_message"), fail_on_logged_errors():
            await world.emu.send_message(world.general, world.alice, "boom")
            await world.emu.wait_for(lambda: client.seen, what="the message")
            await asyncio.sleep(0)


async def test_unknown_route_is_404_and_reported() -> None:
    with pytest.raises(AssertionError, match="unknown route GET /guilds/1/bans"):
        async with running_emulator() as emu:
            client = ProbeBot()
            async with run_bot(client, emu):
                with pytest.raises(discord.NotFound):
                    await client.http.request(discord.http.Route("GET", "/guilds/{guild_id}/bans", guild_id=1))
