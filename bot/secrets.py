"""Secrets: read from the environment or the `.env` file beside the config, never from the TOML, never shown.

A `*_env` key names the variable that holds a secret. The values pass through `Settings.secret` only; no error
message, log line or repr carries one, since those end up in journals and bug reports.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING

from bot.errors import ConfigError

if TYPE_CHECKING:
    from bot.config import Settings

ENV_FILE_NAME = ".env"
# What a `*_env` key holds: a variable's name. Discord tokens have dots and API keys dashes, so a pasted secret
# fails this; a Hugging Face token ("hf_" and 30-odd letters) would pass it and is caught by the second pattern.
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")
_HF_TOKEN = re.compile(r"hf_[A-Za-z0-9]{30,}\Z")


def read_env_file(path: Path) -> Mapping[str, str]:
    """The variables of a `.env` file (python-dotenv's format), or none when there is no such file.

    Nothing of it goes into os.environ or a log: the values are secrets, read only through Settings.secret."""
    from dotenv import dotenv_values

    if not path.is_file():
        return MappingProxyType({})
    try:
        with path.open(encoding="utf-8") as stream:
            values = dotenv_values(stream=stream)
    except (OSError, UnicodeDecodeError) as exc:
        # The reason only, never the content (a decoding error's message quotes bytes of it).
        reason = exc.strerror if isinstance(exc, OSError) else "not UTF-8 text"
        raise ConfigError(path, "-", f"cannot read it: {reason}") from None
    return MappingProxyType({name: value for name, value in values.items() if value is not None})


def check_env_names(settings: Settings, source: Path | str) -> None:
    """Every `*_env` key names a variable. A secret pasted there instead is refused without being repeated."""
    for section in dataclasses.fields(settings):
        values = getattr(settings, section.name)
        if not dataclasses.is_dataclass(values):
            continue
        for f in dataclasses.fields(values):
            name = getattr(values, f.name)
            if f.name.endswith("_env") and (not _ENV_NAME.match(name) or _HF_TOKEN.match(name)):
                raise ConfigError(
                    source,
                    f"{section.name}.{f.name}",
                    "must be the name of an environment variable such as DISCORD_TOKEN, and this looks like a "
                    f"secret itself (not shown): put the secret in the environment or in {ENV_FILE_NAME} beside "
                    "the config, and its variable's name here",
                )


def require_secret(settings: Settings, env_key: str) -> str:
    """The secret named by `[section] env_key`; a ConfigError naming that key (not the value) when it is unset."""
    section, _, name = env_key.partition(".")
    env_name = getattr(getattr(settings, section), name)
    value = settings.secret(env_name)
    if value is None:
        beside = settings.source.parent / ENV_FILE_NAME if settings.source else Path(ENV_FILE_NAME)
        raise ConfigError(
            settings.source or "<config>",
            env_key,
            f"environment variable {env_name} is not set, nor in {beside} (it holds a secret, never the config)",
        )
    return value
