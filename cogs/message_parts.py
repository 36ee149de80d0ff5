"""What a Discord message brings to a turn besides its text: the message it replies to, and its text files."""

from __future__ import annotations

import logging

import discord

from bot.attachments import TextFile, decode, why_not_read
from bot.config import ChatSettings
from bot.turn import PlaceNames

log = logging.getLogger(__name__)


def place_names(channel: object, me: discord.abc.User | None) -> PlaceNames:
    """What a new session's system prompt says for {bot}, {server} and {channel} here (a thread: its name)."""
    guild = getattr(channel, "guild", None)
    bot = me.display_name if me is not None else PlaceNames.bot
    if guild is None:
        return PlaceNames(bot=bot)
    return PlaceNames(bot=bot, server=guild.name, channel=getattr(channel, "name", None))


def replied_message(message: discord.Message) -> discord.Message | None:
    """The message this one replies to, as Discord sent it along (None when it is gone or not a reply)."""
    reference = message.reference
    resolved = reference.resolved if reference is not None else None
    return resolved if isinstance(resolved, discord.Message) else None


def quoted(replied: discord.Message, text: str, *, limit: int) -> str:
    """The turn's text with the message it replies to quoted before it, with that message's author."""
    if limit <= 0 or not replied.content.strip():
        return text
    body = replied.content.strip()
    if len(body) > limit:
        body = body[: limit - 1] + "…"
    return f'[Replying to {replied.author.display_name}: "{body}"]\n{text}'


async def read_text_files(message: discord.Message, settings: ChatSettings) -> tuple[tuple[TextFile, ...], list[str]]:
    """The message's text attachments, read; and one sentence for each file that was not, naming it and why."""
    files: list[TextFile] = []
    notes: list[str] = []
    for attachment in message.attachments:
        name = discord.utils.escape_markdown(attachment.filename)
        if len(files) >= settings.max_attachments:
            notes.append(f"I did not read `{name}`: I read at most {settings.max_attachments} files per message.")
            continue
        reason = why_not_read(
            attachment.filename, attachment.content_type, attachment.size, max_bytes=settings.max_attachment_bytes
        )
        text = None
        if reason is None:
            try:
                text = decode(await attachment.read())
            except discord.HTTPException as exc:
                log.warning("could not download attachment %s: %s", attachment.id, exc)
                reason = "could not be downloaded from Discord"
            else:
                if text is None:
                    reason = "is not UTF-8 text"
        if text is None:
            notes.append(f"I did not read `{name}`: it {reason}.")
        else:
            files.append(TextFile(attachment.filename, text))
    return tuple(files), notes
