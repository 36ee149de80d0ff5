"""Discord permission bits and the overwrite algorithm, as the API documents them."""

from __future__ import annotations

from typing import TYPE_CHECKING

from .model import PRIVATE_THREAD

if TYPE_CHECKING:
    from .model import Channel, Guild

ADD_REACTIONS = 1 << 6
ADMINISTRATOR = 1 << 3
VIEW_CHANNEL = 1 << 10
SEND_MESSAGES = 1 << 11
MANAGE_MESSAGES = 1 << 13
EMBED_LINKS = 1 << 14
ATTACH_FILES = 1 << 15
READ_MESSAGE_HISTORY = 1 << 16
MENTION_EVERYONE = 1 << 17
USE_EXTERNAL_EMOJIS = 1 << 18
USE_APPLICATION_COMMANDS = 1 << 31
MANAGE_THREADS = 1 << 34
CREATE_PUBLIC_THREADS = 1 << 35
CREATE_PRIVATE_THREADS = 1 << 36
SEND_MESSAGES_IN_THREADS = 1 << 38
ALL = (1 << 51) - 1

DEFAULT_EVERYONE = (
    VIEW_CHANNEL
    | SEND_MESSAGES
    | EMBED_LINKS
    | ATTACH_FILES
    | READ_MESSAGE_HISTORY
    | ADD_REACTIONS
    | USE_EXTERNAL_EMOJIS
    | USE_APPLICATION_COMMANDS
    | CREATE_PUBLIC_THREADS
    | CREATE_PRIVATE_THREADS
    | SEND_MESSAGES_IN_THREADS
)
DEFAULT_BOT = DEFAULT_EVERYONE | MANAGE_MESSAGES | MANAGE_THREADS

ROLE_OVERWRITE = 0
MEMBER_OVERWRITE = 1


def base_permissions(guild: Guild, user_id: int) -> int:
    """Guild-wide permissions: @everyone plus the member's roles."""
    if user_id == guild.owner_id:
        return ALL
    member = guild.members.get(user_id)
    perms = guild.roles[guild.id].permissions
    for role_id in member.role_ids if member else []:
        perms |= guild.roles[role_id].permissions
    return ALL if perms & ADMINISTRATOR else perms


def channel_permissions(guild: Guild, user_id: int, channel: Channel, parent: Channel | None) -> int:
    """Permissions in a channel; a thread uses its parent's overwrites, and a private thread is seen only by its
    members and by those who may manage the parent's threads."""
    perms = base_permissions(guild, user_id)
    if perms & ADMINISTRATOR:
        return ALL
    source = parent if channel.is_thread and parent is not None else channel
    member = guild.members.get(user_id)
    role_ids = set(member.role_ids) if member else set()
    overwrites = {(o.type, o.id): o for o in source.overwrites}
    everyone = overwrites.get((ROLE_OVERWRITE, guild.id))
    if everyone:
        perms = (perms & ~everyone.deny) | everyone.allow
    allow = deny = 0
    for (kind, target), o in overwrites.items():
        if kind == ROLE_OVERWRITE and target in role_ids:
            allow |= o.allow
            deny |= o.deny
    perms = (perms & ~deny) | allow
    own = overwrites.get((MEMBER_OVERWRITE, user_id))
    if own:
        perms = (perms & ~own.deny) | own.allow
    if not perms & VIEW_CHANNEL:
        return 0
    if channel.type == PRIVATE_THREAD and user_id not in channel.thread_members and not perms & MANAGE_THREADS:
        return 0
    return perms
