from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

from bot.config import ModelSettings, Settings, load_settings
from bot.errors import ConfigError
from bot.secrets import require_secret

REPO = Path(__file__).resolve().parents[1]


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "config.toml"
    path.write_text(text, encoding="utf-8")
    return path


def test_example_config_loads_with_defaults() -> None:
    settings = load_settings(REPO / "config.example.toml")
    assert settings.model == ModelSettings()
    assert settings.discord.api_base == "https://discord.com/api/v10"
    assert settings.chat.system_prompt == Settings().chat.system_prompt


def test_example_config_names_every_key() -> None:
    text = (REPO / "config.example.toml").read_text()
    defaults = Settings()
    for section in ("discord", "model", "chat", "storage", "metrics"):
        for name in vars(getattr(defaults, section)):
            assert f"{name} =" in text, f"config.example.toml does not document {section}.{name}"


def test_values_are_typed_and_frozen(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        '[discord]\nguild_ids = [123, 456]\n[model]\nname = "some/model"\ntemperature = 0\n'
        'context_length = 2048\n[storage]\ndata_dir = "store"\n',
    )
    settings = load_settings(path)
    assert settings.discord.guild_ids == (123, 456)
    assert settings.model.temperature == 0.0 and isinstance(settings.model.temperature, float)
    assert settings.model.context_length == 2048
    assert settings.storage.data_dir == tmp_path / "store"
    with pytest.raises(AttributeError):
        settings.model.name = "other"  # type: ignore[misc]


@pytest.mark.parametrize(
    ("text", "key", "words"),
    [
        ("[model]\nnmae = 'x'\n", "model.nmae", "unknown key"),
        ("[modle]\nname = 'x'\n", "modle", "unknown section"),
        ("[model]\nmax_new_tokens = 'many'\n", "model.max_new_tokens", "integer"),
        ("[model]\nmax_new_tokens = true\n", "model.max_new_tokens", "integer"),
        ("[model]\ntemperature = 'hot'\n", "model.temperature", "number"),
        ("[model]\ndtype = 'float8'\n", "model.dtype", "one of"),
        ("[discord]\nguild_ids = 5\n", "discord.guild_ids", "list"),
        ("[discord]\nguild_ids = ['a']\n", "discord.guild_ids[0]", "integer"),
        ("[discord]\nallow_dms = 'yes'\n", "discord.allow_dms", "true or false"),
        ("[discord]\ntoken = 'abc'\n", "discord.token", "secrets are not read"),
        ("[model]\nhf_token = 'abc'\n", "model.hf_token", "secrets are not read"),
        ("[model]\ntop_p = 1.5\n", "model.top_p", "(0, 1]"),
        ("[model]\ncontext_length = 100\nmax_new_tokens = 200\n", "model.max_new_tokens", "smaller"),
        ("[discord]\napi_base = 'ftp://x'\n", "discord.api_base", "http"),
        ("[model]\nname = ''\n", "model.name", "empty"),
        ("model = 3\n", "model", "table"),
        ("[model\n", "-", "not valid TOML"),
        ("[model]\nquantization = '3bit'\n", "model.quantization", "one of"),
        ("[model]\nmax_memory = ['20GiB']\n", "model.max_memory", "table"),
        ("[model]\nmax_memory = { cpu = 20 }\n", "model.max_memory.cpu", "string"),
        ("[model]\nmax_memory = { cuda = '2GiB' }\n", "model.max_memory.cuda", "GPU index"),
        ("[discord]\nshard_ids = [0]\n", "discord.shard_ids", "shard_count"),
        ("[metrics]\nprometheus_port = 70000\n", "metrics.prometheus_port", "TCP port"),
        ("[metrics]\nport = 9000\n", "metrics.port", "unknown key"),
    ],
)
def test_every_error_names_file_and_key(tmp_path: Path, text: str, key: str, words: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_settings(path)
    message = str(info.value)
    assert str(path) in message
    assert f"[{key}]" in message
    assert words in message


def test_missing_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="file not found") as info:
        load_settings(tmp_path / "nope.toml")
    assert "nope.toml" in str(info.value)


def test_secrets_come_from_the_named_environment_variable(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = write(tmp_path, "[discord]\ntoken_env = 'MY_BOT_TOKEN'\n")
    settings = load_settings(path)
    monkeypatch.delenv("MY_BOT_TOKEN", raising=False)
    with pytest.raises(ConfigError) as info:
        require_secret(settings, "discord.token_env")
    assert "[discord.token_env]" in str(info.value) and "MY_BOT_TOKEN" in str(info.value)
    monkeypatch.setenv("MY_BOT_TOKEN", "s3cret-value")
    assert require_secret(settings, "discord.token_env") == "s3cret-value"
    assert settings.discord_token == "s3cret-value"
    assert "s3cret-value" not in repr(settings)


def test_secrets_come_from_the_env_file_beside_the_config_and_the_environment_wins(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    path = write(tmp_path, "[discord]\ntoken_env = 'MY_BOT_TOKEN'\n")
    (tmp_path / ".env").write_text("# the bot's secrets\nMY_BOT_TOKEN=from.the.file\nexport HF_TOKEN='hf-from-file'\n")
    monkeypatch.delenv("MY_BOT_TOKEN", raising=False)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    with caplog.at_level("DEBUG"):
        settings = load_settings(path)
    assert require_secret(settings, "discord.token_env") == "from.the.file"
    assert settings.hf_token == "hf-from-file"
    assert "MY_BOT_TOKEN" not in os.environ, "the file's values stay out of the environment (and child processes)"
    monkeypatch.setenv("MY_BOT_TOKEN", "from.the.environment")
    assert settings.discord_token == "from.the.environment"
    assert "from.the.file" not in repr(settings) and "from.the.file" not in caplog.text


def test_an_unset_secret_names_the_env_file_it_looked_in(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("DISCORD_TOKEN", raising=False)
    settings = load_settings(write(tmp_path, ""))
    with pytest.raises(ConfigError, match=r"DISCORD_TOKEN is not set, nor in .*\.env"):
        require_secret(settings, "discord.token_env")


TOKEN = "MTIzNDU2Nzg5MDEyMzQ1Njc4.GabcDE.abcdefghijklmnopqrstuvwxyz0123456789AB"


@pytest.mark.parametrize(
    ("section", "key", "value"),
    [
        ("discord", "token_env", TOKEN),
        ("model", "hf_token_env", "hf_abcdefghijklmnopqrstuvwxyzABCDEFGH"),
        ("model", "api_key_env", "sk-proj-abcdefghijklmnop"),
        ("discord", "token_env", "MY TOKEN"),
    ],
)
def test_a_secret_pasted_into_an_env_key_is_refused_without_being_shown(
    tmp_path: Path, section: str, key: str, value: str
) -> None:
    path = write(tmp_path, f"[{section}]\n{key} = '{value}'\n")
    with pytest.raises(ConfigError) as info:
        load_settings(path)
    message = str(info.value)
    assert f"[{section}.{key}] must be the name of an environment variable" in message
    assert value not in message and value[:12] not in message


@pytest.mark.parametrize("name", ["DISCORD_TOKEN", "my_bot_token", "_X1", "HF_TOKEN"])
def test_variable_names_pass(tmp_path: Path, name: str) -> None:
    assert load_settings(write(tmp_path, f"[discord]\ntoken_env = '{name}'\n")).discord.token_env == name


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ("[discord]\nlogin_attempts = 0\n", "discord.login_attempts"),
        ("[discord]\nlogin_retry_delay = -1\n", "discord.login_retry_delay"),
    ],
)
def test_login_retries_are_checked(tmp_path: Path, text: str, key: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(f"[{key}]")):
        load_settings(write(tmp_path, text))
