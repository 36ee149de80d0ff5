"""Settings: one TOML file read once into frozen, typed dataclasses; secrets only from the environment.

Every problem stops start-up with a `ConfigError` that names the file and the key, so an operator can fix it
without reading a stack trace.
"""

from __future__ import annotations

import dataclasses
import os
import re
import tomllib
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any, Literal, get_args, get_origin, get_type_hints

from bot.errors import ConfigError
from bot.secrets import ENV_FILE_NAME, check_env_names, read_env_file

DISCORD_API_BASE = "https://discord.com/api/v10"

Dtype = Literal["auto", "float16", "bfloat16", "float32"]
PromptFormatName = Literal["auto", "llama2", "template"]
Backend = Literal["local", "openai"]
# "4bit"/"8bit": bitsandbytes (NVIDIA GPUs); "int8": torchao's int8 weight-only (CPU or GPU).
Quantization = Literal["none", "4bit", "8bit", "int8"]
# "decode": the local engine runs its decode steps through torch.compile (bot/engine/local/compiled.py); "all":
# its prefill steps too.
CompileMode = Literal["off", "decode", "all"]


@dataclass(frozen=True)
class DiscordSettings:
    api_base: str = DISCORD_API_BASE
    guild_ids: tuple[int, ...] = ()
    token_env: str = "DISCORD_TOKEN"
    allow_dms: bool = True
    ping_author: bool = False
    stream_edit_interval: float = 1.0
    shutdown_grace: float = 10.0
    allowed_guild_ids: tuple[int, ...] = ()
    allowed_channel_ids: tuple[int, ...] = ()
    allowed_role_ids: tuple[int, ...] = ()
    blocked_user_ids: tuple[int, ...] = ()
    newchat_system_prompt_role_ids: tuple[int, ...] = ()
    shard_count: int | None = None
    shard_ids: tuple[int, ...] = ()
    # Start-up: tries at reaching Discord and logging in before giving up; the wait doubles from this many seconds.
    login_attempts: int = 6
    login_retry_delay: float = 2.0


@dataclass(frozen=True)
class ModelSettings:
    name: str = "meta-llama/Llama-2-7b-chat-hf"
    gguf_file: str | None = None
    dtype: Dtype = "auto"
    device_map: str = "auto"
    context_length: int | None = None
    max_new_tokens: int = 512
    temperature: float = 0.7
    top_p: float = 0.9
    repetition_penalty: float = 1.0
    prompt_format: PromptFormatName = "auto"
    max_batch_size: int = 8
    max_batch_tokens: int = 4096
    kv_cache_budget_mb: int = 1024
    max_queue: int = 64
    hf_token_env: str = "HF_TOKEN"
    backend: Backend = "local"
    base_url: tuple[str, ...] = ()
    api_key_env: str = "OPENAI_API_KEY"
    tokenizer: str | None = None
    request_timeout: float = 120.0
    # backend = "openai": a thinking model's reasoning is shown as a spoiler before its answer, not left out.
    show_reasoning: bool = False
    quantization: Quantization = "none"
    compile: CompileMode = "off"
    # accelerate's per-device budget: GPU index ("0") or "cpu"/"disk" -> size such as "20GiB".
    max_memory: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))


@dataclass(frozen=True)
class ChatSettings:
    system_prompt: str = (
        "You are a helpful, respectful and honest assistant. Always answer as helpfully as possible, while being safe."
    )
    max_message_chars: int = 4000
    rate_limit_per_minute: int = 0
    newchat_per_minute: int = 3
    # Text files attached to a message are read into the turn (bot/attachments.py): at most this many, each at most
    # this many bytes; the rest get a sentence.
    max_attachments: int = 3
    max_attachment_bytes: int = 100_000
    # Characters of someone else's message quoted into the turn when a user replies to it mentioning the bot.
    reply_quote_chars: int = 1000


@dataclass(frozen=True)
class StorageSettings:
    data_dir: Path = Path("data")


@dataclass(frozen=True)
class MetricsSettings:
    prometheus_port: int = 0
    prometheus_addr: str = "127.0.0.1"


@dataclass(frozen=True)
class Settings:
    discord: DiscordSettings = field(default_factory=DiscordSettings)
    model: ModelSettings = field(default_factory=ModelSettings)
    chat: ChatSettings = field(default_factory=ChatSettings)
    storage: StorageSettings = field(default_factory=StorageSettings)
    metrics: MetricsSettings = field(default_factory=MetricsSettings)
    source: Path | None = None
    # The `.env` file beside the config (variable -> value): secrets only, never shown, never compared.
    env_file: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}), repr=False, compare=False)

    def secret(self, env_name: str) -> str | None:
        """The value of a secret: the environment, else the `.env` file beside the config; never the TOML."""
        value = os.environ.get(env_name, "").strip() or self.env_file.get(env_name, "").strip()
        return value or None

    @property
    def discord_token(self) -> str | None:
        return self.secret(self.discord.token_env)

    @property
    def hf_token(self) -> str | None:
        return self.secret(self.model.hf_token_env)


_SECTIONS: dict[str, type] = {
    "discord": DiscordSettings,
    "model": ModelSettings,
    "chat": ChatSettings,
    "storage": StorageSettings,
    "metrics": MetricsSettings,
}

# The [discord] lists of IDs that say who may use the bot where (bot/admission.py reads them).
ACCESS_LISTS = (
    "allowed_guild_ids",
    "allowed_channel_ids",
    "allowed_role_ids",
    "blocked_user_ids",
    "newchat_system_prompt_role_ids",
)

# accelerate's max_memory: GPU indices and these device names, sizes such as "20GiB" or "1.5 GB".
MAX_MEMORY_DEVICES = frozenset({"cpu", "disk", "mps"})
_SIZE = re.compile(r"^\d+(\.\d+)?\s*([KMGT]i?B|B)$", re.IGNORECASE)
ACCELERATE_DEVICE_MAPS = frozenset({"auto", "balanced", "balanced_low_0", "sequential"})

# Keys that look like secrets are refused in the file itself: a token in a TOML ends up in backups.
_SECRET_KEYS = frozenset({"token", "discord_token", "hf_token", "api_key"})


def load_settings(path: Path | str) -> Settings:
    """Read and validate `path`; raise ConfigError naming the file and the key on any problem."""
    path = Path(path)
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(path, "-", "file not found (copy config.example.toml to start)") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(path, "-", f"not valid TOML: {exc}") from None
    return settings_from_mapping(raw, source=path, env_file=read_env_file(path.parent / ENV_FILE_NAME))


def settings_from_mapping(
    raw: Mapping[str, Any], *, source: Path | str = "<config>", env_file: Mapping[str, str] | None = None
) -> Settings:
    """Validate an already parsed TOML document (tests and `load_settings` use it)."""
    unknown = sorted(set(raw) - set(_SECTIONS))
    if unknown:
        raise ConfigError(source, unknown[0], f"unknown section; expected one of {', '.join(_SECTIONS)}")
    sections: dict[str, Any] = {}
    for name, cls in _SECTIONS.items():
        table = raw.get(name, {})
        if not isinstance(table, Mapping):
            raise ConfigError(source, name, "must be a table")
        sections[name] = _build_section(cls, name, table, source)
    storage = sections["storage"]
    if not storage.data_dir.is_absolute() and isinstance(source, Path):
        # Relative to the config file, so the bot finds its data whatever folder it is started from.
        sections["storage"] = dataclasses.replace(storage, data_dir=source.parent / storage.data_dir)
    settings = Settings(**sections, source=Path(source), env_file=MappingProxyType(dict(env_file or {})))
    _check_values(settings, source)
    return settings


def _build_section(cls: type, section: str, table: Mapping[str, Any], source: Path | str) -> Any:
    hints = get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    values: dict[str, Any] = {}
    for key, value in table.items():
        dotted = f"{section}.{key}"
        if key in _SECRET_KEYS:
            raise ConfigError(
                source,
                dotted,
                "secrets are not read from the config file; set the environment "
                "variable named by the *_env key instead",
            )
        if key not in names:
            raise ConfigError(source, dotted, f"unknown key; known keys: {', '.join(sorted(names))}")
        values[key] = _coerce(hints[key], value, source, dotted)
    return cls(**values)


def _coerce(hint: Any, value: Any, source: Path | str, key: str) -> Any:
    """Check `value` against the field's type; TOML has no null, so optional fields are simply left out."""
    origin = get_origin(hint)
    args = get_args(hint)
    if origin in (typing.Union, types.UnionType):
        inner = [a for a in args if a is not type(None)]
        return _coerce(inner[0], value, source, key)
    if origin is Literal:
        if value not in args:
            choices = ", ".join(repr(a) for a in args)
            raise ConfigError(source, key, f"must be one of {choices}, got {value!r}")
        return value
    if origin is tuple:
        if isinstance(value, str) and args[0] is str:
            value = [value]  # one URL where a list of them is allowed
        if not isinstance(value, list):
            raise ConfigError(source, key, f"must be a list, got {type(value).__name__}")
        return tuple(_coerce(args[0], item, source, f"{key}[{i}]") for i, item in enumerate(value))
    if origin is Mapping:
        if not isinstance(value, Mapping):
            raise ConfigError(source, key, f"must be a table such as {{ a = 1 }}, got {type(value).__name__}")
        return MappingProxyType({k: _coerce(args[1], v, source, f"{key}.{k}") for k, v in value.items()})
    if hint is Path:
        if not isinstance(value, str) or not value:
            raise ConfigError(source, key, "must be a non-empty path string")
        return Path(value).expanduser()
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(source, key, f"must be a number, got {type(value).__name__}")
        return float(value)
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(source, key, f"must be an integer, got {type(value).__name__}")
        return value
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(source, key, f"must be true or false, got {type(value).__name__}")
        return value
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(source, key, f"must be a string, got {type(value).__name__}")
        return value
    raise ConfigError(source, key, f"unsupported setting type {hint!r}")


def _check_values(s: Settings, source: Path | str) -> None:
    def require(ok: bool, key: str, problem: str) -> None:
        if not ok:
            raise ConfigError(source, key, problem)

    check_env_names(s, source)
    m = s.model
    require(bool(m.name.strip()), "model.name", "must not be empty")
    require(m.context_length is None or m.context_length > 0, "model.context_length", "must be positive")
    require(m.max_new_tokens > 0, "model.max_new_tokens", "must be positive")
    require(
        m.context_length is None or m.max_new_tokens < m.context_length,
        "model.max_new_tokens",
        "must be smaller than model.context_length",
    )
    require(m.temperature >= 0, "model.temperature", "must be >= 0 (0 means greedy)")
    require(0 < m.top_p <= 1, "model.top_p", "must be in (0, 1]")
    require(m.repetition_penalty > 0, "model.repetition_penalty", "must be positive")
    require(m.max_batch_size > 0, "model.max_batch_size", "must be positive")
    require(m.max_batch_tokens > 0, "model.max_batch_tokens", "must be positive")
    require(m.kv_cache_budget_mb >= 0, "model.kv_cache_budget_mb", "must be >= 0 (0 turns KV reuse off)")
    require(m.max_queue > 0, "model.max_queue", "must be positive")
    require(bool(m.hf_token_env), "model.hf_token_env", "must name an environment variable")
    require(m.backend != "openai" or bool(m.base_url), "model.base_url", 'is required when backend = "openai"')
    require(all(u.startswith(("http://", "https://")) for u in m.base_url), "model.base_url", "must be http(s) URLs")
    require(m.request_timeout > 0, "model.request_timeout", "must be positive")
    for device, size in m.max_memory.items():
        require(
            device.isdigit() or device in MAX_MEMORY_DEVICES,
            f"model.max_memory.{device}",
            'must be keyed by a GPU index ("0", "1", ...) or "cpu", "disk", "mps"',
        )
        require(bool(_SIZE.match(size.strip())), f"model.max_memory.{device}", 'must be a size such as "20GiB"')
    require(
        not m.max_memory or m.device_map in ACCELERATE_DEVICE_MAPS,
        "model.max_memory",
        f"needs model.device_map to be one of {', '.join(sorted(ACCELERATE_DEVICE_MAPS))}",
    )
    c = s.chat
    require(c.max_attachments >= 0, "chat.max_attachments", "must not be negative (0 reads no attachments)")
    require(c.max_attachment_bytes > 0, "chat.max_attachment_bytes", "must be positive")
    require(c.reply_quote_chars >= 0, "chat.reply_quote_chars", "must not be negative (0 quotes nothing)")
    d = s.discord
    require(d.api_base.startswith(("http://", "https://")), "discord.api_base", "must be an http(s) URL")
    require(bool(d.token_env), "discord.token_env", "must name an environment variable")
    require(d.stream_edit_interval > 0, "discord.stream_edit_interval", "must be positive")
    require(d.shutdown_grace >= 0, "discord.shutdown_grace", "must not be negative")
    require(d.login_attempts > 0, "discord.login_attempts", "must be positive")
    require(d.login_retry_delay >= 0, "discord.login_retry_delay", "must not be negative")
    require(all(g > 0 for g in d.guild_ids), "discord.guild_ids", "must be positive Discord IDs")
    for key in ACCESS_LISTS:
        require(all(i > 0 for i in getattr(d, key)), f"discord.{key}", "must be positive Discord IDs")
    require(d.shard_count is None or d.shard_count > 0, "discord.shard_count", "must be positive")
    require(not d.shard_ids or d.shard_count is not None, "discord.shard_ids", "needs discord.shard_count")
    require(
        all(0 <= i < (d.shard_count or 0) for i in d.shard_ids),
        "discord.shard_ids",
        "must be shard numbers from 0 to shard_count - 1",
    )
    require(len(set(d.shard_ids)) == len(d.shard_ids), "discord.shard_ids", "must not repeat a shard")
    require(0 <= s.metrics.prometheus_port < 65536, "metrics.prometheus_port", "must be a TCP port (0 = off)")
    require(bool(s.metrics.prometheus_addr.strip()), "metrics.prometheus_addr", "must not be empty")
    require(s.chat.max_message_chars > 0, "chat.max_message_chars", "must be positive")
    require(s.chat.rate_limit_per_minute >= 0, "chat.rate_limit_per_minute", "must be >= 0 (0 turns the limit off)")
    require(s.chat.newchat_per_minute >= 0, "chat.newchat_per_minute", "must be >= 0 (0 turns the limit off)")
