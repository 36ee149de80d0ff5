"""Start-up as an operator meets it: `python -m bot` in a process of its own. Every problem is one line on stderr
with exit status 2 (a setting to change) or 1 (an outage that may pass), never a traceback; Discord is reached
and the token checked before the model loads; the log is one timestamped format, each line once."""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import itertools
import os
import re
import socket
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import discord
import pytest
from aiohttp import web
from discord_harness import bot_config

from bot.client import BOT_PERMISSIONS, MESSAGE_CONTENT_OFF, check_token
from bot.config import DiscordSettings
from bot.discord_api import use_api_base
from bot.errors import StartUpError
from discord_emulator import DiscordEmulator, running_emulator

REPO = Path(__file__).resolve().parents[1]
# A line of our log: "2026-01-31 12:00:00,123 WARNING  name: message".
LOG_LINE = re.compile(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} (DEBUG|INFO|WARNING|ERROR|CRITICAL) +\S+: ")


async def python_m_bot(
    config: Path,
    *args: str,
    env: dict[str, str] | None = None,
    timeout: float = 180,  # noqa: ASYNC109
) -> tuple[int, list[str]]:
    """Exit status and stderr lines of `python -m bot --config CONFIG ARGS`."""
    process = await asyncio.create_subprocess_exec(
        *(sys.executable, "-m", "bot", "--config", str(config), *args),
        cwd=REPO,
        env={**os.environ, "DISCORD_TOKEN": "not.a.real-token", **(env or {})},
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
        preexec_fn=_without_root_overrides,
    )
    try:
        _, err = await asyncio.wait_for(process.communicate(), timeout)
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    assert process.returncode is not None
    return process.returncode, err.decode().splitlines()


def the_one_line(stderr: list[str]) -> str:
    """The line that is not a log record; there must be exactly one, and no traceback anywhere."""
    assert not any("Traceback" in line for line in stderr), "\n".join(stderr)
    (line,) = [line for line in stderr if not LOG_LINE.match(line)]
    return line


def closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


# --- Discord ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("host", ["127.0.0.1:{port}", "no-such-host.invalid"])
async def test_discord_unreachable_is_retried_then_one_line_before_the_model_loads(tmp_path: Path, host: str) -> None:
    api_base = f"http://{host.format(port=closed_port())}/api/v10"
    config = write(
        tmp_path / "config.toml",
        f'[discord]\napi_base = "{api_base}"\nlogin_attempts = 3\nlogin_retry_delay = 0.01\n'
        f'[model]\nname = "{tmp_path / "no-such-model"}"\n',  # never reached: Discord comes first
    )
    status, stderr = await python_m_bot(config)
    assert status == 1
    line = the_one_line(stderr)
    assert line.startswith("Error: cannot reach Discord, tried 3 times: no Discord API answered GET ")
    assert "check the network" in line
    assert sum("cannot reach Discord" in line for line in stderr if LOG_LINE.match(line)) == 2, "two retries"


async def test_discord_going_away_before_the_login_is_retried_then_one_error(caplog: pytest.LogCaptureFixture) -> None:
    """Discord's own API base has no gateway lookup to fail: its outage shows at the login, retried the same way."""
    emu = DiscordEmulator()
    await emu.start()
    async with use_api_base(emu.api_base):
        await emu.close()
        settings = DiscordSettings(login_attempts=3, login_retry_delay=0)
        with pytest.raises(StartUpError, match=r"^cannot reach Discord, tried 3 times: Cannot connect to host"):
            await check_token(settings, emu.token, asyncio.Event())
    assert [r.getMessage().split(";")[1] for r in caplog.records if r.name == "bot.client"] == [
        " try 2 of 3 in 0s",
        " try 3 of 3 in 0s",
    ]


async def test_a_stop_while_waiting_to_retry_ends_quietly() -> None:
    emu = DiscordEmulator()
    await emu.start()
    async with use_api_base(emu.api_base):
        await emu.close()
        stop = asyncio.Event()
        stop.set()
        assert not await check_token(DiscordSettings(login_attempts=5, login_retry_delay=3600), "t", stop)


async def test_a_wrong_token_is_refused_before_the_model_loads(tmp_path: Path) -> None:
    async with running_emulator() as emu:
        config = bot_config(tmp_path / "config.toml", emu, tmp_path / "no-such-model", tmp_path / "data")
        status, stderr = await python_m_bot(config, env={"DISCORD_TOKEN": "wrong.token.value"})
        assert not emu.gateway.identify_count
    assert status == 2
    assert the_one_line(stderr) == (
        f"Configuration error: {config}: [discord.token_env] Discord rejected the token in DISCORD_TOKEN (copy it "
        "again from the Developer Portal: Bot → Reset Token)"
    )
    assert not any("wrong.token.value" in line for line in stderr)


async def test_the_message_content_intent_switched_off_says_which_switch(tmp_path: Path, tiny_llama_dir: Path) -> None:
    async with running_emulator(message_content_intent=False) as emu:
        config = bot_config(tmp_path / "config.toml", emu, tiny_llama_dir, tmp_path / "data")
        status, stderr = await python_m_bot(config, env={"DISCORD_TOKEN": emu.token})
    assert status == 2
    assert the_one_line(stderr) == f"Error: {MESSAGE_CONTENT_OFF}"
    assert "Bot → Privileged Gateway Intents → turn on Message Content Intent" in MESSAGE_CONTENT_OFF


async def test_login_model_then_gateway_an_invite_link_and_one_log_format(tmp_path: Path, tiny_llama_dir: Path) -> None:
    async with running_emulator() as emu:
        config = bot_config(tmp_path / "config.toml", emu, tiny_llama_dir, tmp_path / "data")
        process = await asyncio.create_subprocess_exec(
            *(sys.executable, "-m", "bot", "--config", str(config)),
            cwd=REPO,
            env={**os.environ, "DISCORD_TOKEN": emu.token},
            stderr=asyncio.subprocess.PIPE,
        )
        assert process.stderr is not None
        lines: list[str] = []
        try:
            while "invite link" not in (lines[-1] if lines else ""):
                lines.append((await asyncio.wait_for(process.stderr.readline(), 120)).decode().rstrip("\n"))
                assert lines[-1] or process.returncode is None, "\n".join(lines)
        finally:
            process.terminate()
            rest = (await asyncio.wait_for(process.stderr.read(), 60)).decode().splitlines()
            await process.wait()
    log = lines + rest

    def first(text: str) -> int:
        return next(i for i, line in enumerate(log) if text in line)

    assert first("logging in using static token") < first("loaded ") < first("has connected to Gateway"), log
    assert all(LOG_LINE.match(line) for line in log), "one format, timestamped, no progress bars or raw lines"
    messages = [LOG_LINE.sub("", line) for line in log]
    assert messages.count("logging in using static token") == 2, "the token check, then the bot"
    assert not any(a == b for a, b in itertools.pairwise(messages)), "no line twice"
    assert not any("voice will NOT be supported" in m for m in messages)
    url = urlsplit(log[first("invite link")].rsplit(" ", 1)[-1])
    query = parse_qs(url.query)
    assert (url.netloc, url.path) == ("discord.com", "/oauth2/authorize")
    assert query["client_id"] == [str(emu.application_id)]
    assert query["scope"] == ["bot applications.commands"]
    assert query["permissions"] == [str(BOT_PERMISSIONS.value)]
    needed = discord.Permissions(
        view_channel=True,
        send_messages=True,
        send_messages_in_threads=True,
        create_public_threads=True,
        read_message_history=True,
        attach_files=True,
    )
    assert needed == BOT_PERMISSIONS
    assert BOT_PERMISSIONS.value == 309237746688


async def test_a_local_gateway_acks_heartbeats_like_a_network() -> None:
    """An instant ack raced discord.py's keep-alive thread, which then timed it from the heartbeat before: the
    "websocket is 41.2s behind" warning on a healthy local gateway. With a network's delay, latency is that delay."""
    async with running_emulator(heartbeat_interval_ms=200) as emu, use_api_base(emu.api_base):
        client = discord.Client(intents=discord.Intents.none())
        await client.login(emu.token)
        connect = asyncio.create_task(client.connect())
        try:
            await asyncio.wait_for(client.wait_until_ready(), 10)
            latencies = []
            for _ in range(8):
                await asyncio.sleep(0.25)  # about one heartbeat each
                latencies.append(client.latency)
        finally:
            await client.close()
            await connect
    assert max(latencies) < 0.15, latencies  # a racing ack reads as the 0.2 s interval


def test_warnings_and_library_logs_are_one_line_each() -> None:
    """huggingface_hub logged each warning twice (its own handler, then ours), transformers through its own handler
    only (no timestamp), and `warnings.warn` wrote two raw lines."""
    script = (
        "import logging, warnings\n"
        "from bot.logs import adopt_library_loggers, configure_logging\n"
        "configure_logging(logging.INFO)\n"
        "adopt_library_loggers()\n"
        "from huggingface_hub.utils import logging as hub_logging\n"
        "from transformers.utils import logging as transformers_logging\n"
        "hub_logging.get_logger('huggingface_hub.utils._http').warning('Retrying in 1s [Retry 1/5].')\n"
        "transformers_logging.get_logger('transformers.modeling_utils').warning('some weights were not used')\n"
        "warnings.warn('careful', UserWarning, stacklevel=1)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=120, check=True
    )
    lines = done.stderr.splitlines()
    assert len(lines) == 3, lines
    assert all(LOG_LINE.match(line) for line in lines), lines
    assert lines[0].endswith("WARNING  huggingface_hub.utils._http: Retrying in 1s [Retry 1/5].")
    assert lines[1].endswith("WARNING  transformers.modeling_utils: some weights were not used")
    assert " WARNING  py.warnings: UserWarning: careful (<string>:" in lines[2]


# --- the data folder -------------------------------------------------------------------------------------------

# prctl(PR_CAPBSET_DROP, cap): the capabilities by which root writes where permissions say no.
PR_CAPBSET_DROP = 24
CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH, CAP_FOWNER = 1, 2, 3


def _without_root_overrides() -> None:
    """In the child before exec: as root (CI), drop what lets root ignore `chmod a-w`, so the bot meets a
    read-only folder as any other user would."""
    if os.geteuid() != 0:
        return
    libc = ctypes.CDLL(None, use_errno=True)
    for cap in (CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH, CAP_FOWNER):
        if libc.prctl(PR_CAPBSET_DROP, cap, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP) failed")


@contextlib.contextmanager
def read_only(folder: Path) -> Iterator[Path]:
    folder.mkdir()
    folder.chmod(0o555)
    try:
        yield folder
    finally:
        folder.chmod(0o755)


@pytest.mark.parametrize("command", ["run", "chat", "import-history"])
@pytest.mark.parametrize("problem", ["a file", "a missing parent", "read-only", "read-only sessions"])
async def test_an_unusable_data_dir_is_one_line(tmp_path: Path, command: str, problem: str) -> None:
    with contextlib.ExitStack() as stack:
        if problem == "a file":
            data_dir = write(tmp_path / "data", "not a folder")
            words = "is a file, not a folder"
        elif problem == "a missing parent":
            data_dir = tmp_path / "unmounted" / "data"
            words = f"its parent folder {tmp_path / 'unmounted'} does not exist"
        elif problem == "read-only":
            data_dir = stack.enter_context(read_only(tmp_path / "data"))
            words = f"cannot write in {data_dir}: Permission denied"
        else:
            (tmp_path / "data").mkdir()
            data_dir = stack.enter_context(read_only(tmp_path / "data" / "sessions"))
            words = f"cannot write in {data_dir}: Permission denied"
        config = write(tmp_path / "config.toml", f'[storage]\ndata_dir = "{data_dir}"\n')
        args = [command, str(write(tmp_path / "history.json", "{}"))] if command == "import-history" else [command]
        status, stderr = await python_m_bot(config, *args)
    assert status == 2
    line = the_one_line(stderr)
    assert line.startswith(f"Configuration error: {config}: [storage.data_dir] "), line
    assert words in line
    assert not (tmp_path / "unmounted").exists(), "no folder is made above data_dir"


# --- the model -------------------------------------------------------------------------------------------------


def model_config(tmp_path: Path, name: Path | str, *extra: str) -> Path:
    return write(
        tmp_path / "config.toml",
        f'[model]\nname = "{name}"\ndevice_map = "cpu"\n{"".join(e + chr(10) for e in extra)}'
        f'[storage]\ndata_dir = "{tmp_path / "data"}"\n',
    )


def folder(path: Path, *files: str) -> Path:
    path.mkdir()
    for name in files:
        (path / name).write_bytes(b"x")
    return path


@pytest.mark.parametrize(
    ("files", "extra", "expected"),
    [
        ((), (), "[model.name] {dir} is an empty folder: put a model in it"),
        (("model.Q4_K_M.gguf",), (), "[model.gguf_file] {dir} holds GGUF weights and no config.json: set gguf_file"),
        (("a.gguf",), ('gguf_file = "b.gguf"',), "[model.gguf_file] 'b.gguf' is not in {dir} (it holds a.gguf)"),
        (("config.json", "model.safetensors"), (), "[model.name] {dir} has no tokenizer files"),
        (("weights.bin",), (), "[model.name] {dir} has no config.json"),
    ],
)
async def test_a_model_folder_that_cannot_load_is_one_line(
    tmp_path: Path, files: tuple[str, ...], extra: tuple[str, ...], expected: str
) -> None:
    model = folder(tmp_path / "model", *files)
    config = model_config(tmp_path, model, *extra)
    status, stderr = await python_m_bot(config, "chat")
    assert status == 2
    assert the_one_line(stderr).startswith(f"Configuration error: {config}: {expected.format(dir=model)}")


@contextlib.asynccontextmanager
async def fake_hub(error_code: str) -> AsyncIterator[str]:
    """A Hugging Face endpoint that answers every file request 404 with `error_code`, as the hub does."""

    async def refuse(request: web.Request) -> web.Response:
        return web.Response(status=404, headers={"X-Error-Code": error_code})

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", refuse)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        yield f"http://127.0.0.1:{runner.addresses[0][1]}"
    finally:
        await runner.cleanup()


async def test_a_hub_name_that_does_not_exist_is_one_line(tmp_path: Path) -> None:
    config = model_config(tmp_path, "nobody-here/no-such-model")
    async with fake_hub("RepoNotFound") as endpoint:
        status, stderr = await python_m_bot(config, "chat", env={"HF_ENDPOINT": endpoint, "HF_HOME": str(tmp_path)})
    assert status == 2
    assert the_one_line(stderr).startswith(
        f"Configuration error: {config}: [model.name] there is no model 'nobody-here/no-such-model' on Hugging Face"
    )


async def test_a_hub_name_offline_is_one_line_at_once(tmp_path: Path) -> None:
    config = model_config(tmp_path, "nobody-here/no-such-model")
    env = {"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path)}
    status, stderr = await python_m_bot(config, "chat", env=env)
    assert status == 2
    line = the_one_line(stderr)
    assert "[model.name] 'nobody-here/no-such-model' is not in the Hugging Face cache" in line
    assert "HF_HUB_OFFLINE is set" in line


async def test_an_unreachable_hub_is_one_try_and_one_line(tmp_path: Path) -> None:
    config = model_config(tmp_path, "nobody-here/no-such-model")
    env = {"HF_ENDPOINT": f"http://127.0.0.1:{closed_port()}", "HF_HOME": str(tmp_path)}
    status, stderr = await python_m_bot(config, "chat", env=env)
    assert status == 1
    line = the_one_line(stderr)
    assert line.startswith("Error: cannot reach http://127.0.0.1:")
    assert "nobody-here/no-such-model" in line and "not in the local cache" in line
    assert not any("Retrying" in line for line in stderr), "one try, no minute of retries"


# --- the command line ------------------------------------------------------------------------------------------


async def test_a_bogus_log_level_is_one_line(tmp_path: Path) -> None:
    status, stderr = await python_m_bot(write(tmp_path / "config.toml", ""), "--log-level", "bogus", "chat")
    assert status == 2
    assert stderr == ["Error: --log-level 'bogus' is not a level; use one of DEBUG, INFO, WARNING, ERROR, CRITICAL"]


async def test_a_token_pasted_as_token_env_is_refused_and_never_shown(tmp_path: Path) -> None:
    token = "MTIzNDU2Nzg5MDEyMzQ1Njc4.GabcDE.abcdefghijklmnopqrstuvwxyz0123456789AB"
    config = write(tmp_path / "config.toml", f'[discord]\ntoken_env = "{token}"\n')
    status, stderr = await python_m_bot(config, "--log-level", "DEBUG", env={"DISCORD_TOKEN": token})
    assert status == 2
    line = the_one_line(stderr)
    assert line.startswith(f"Configuration error: {config}: [discord.token_env] must be the name of an environment")
    assert not any(token[:10] in line or token[-10:] in line for line in stderr)
