"""`python -m bot chat` and `import-history` as a user runs them: a real process, stdin and stdout."""

from __future__ import annotations

import asyncio
import json
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from script_model import build_script_llama

REPO = Path(__file__).resolve().parents[1]
# One-letter tokens: 2,000 of them take the script model many seconds, so a Ctrl-C lands mid-answer.
LETTERS = "a b c d e f g h i j k l m n o p"


def write_config(tmp_path: Path, model_dir: Path) -> Path:
    config = tmp_path / "config.toml"
    config.write_text(
        f'[model]\nname = "{model_dir}"\ntemperature = 0\nmax_new_tokens = 6\ndevice_map = "cpu"\n'
        '[storage]\ndata_dir = "data"\n'
    )
    return config


def run_bot(config: Path, *args: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "bot", "--config", str(config), "--log-level", "WARNING", *args],
        input=stdin,
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=300,
        check=False,
    )


def test_terminal_chat_answers_lists_and_resumes(tiny_llama_dir: Path, tmp_path: Path) -> None:
    config = write_config(tmp_path, tiny_llama_dir)
    first = run_bot(config, "chat", stdin="hello model\n/new second topic\nanother\n/list\n/quit\n")
    assert first.returncode == 0, first.stderr
    assert "bot> " in first.stdout
    listed = re.findall(r"([ *]) ([A-Za-z0-9_-]{16})  \S+ +(\d+) turns? +(.*)", first.stdout)
    assert sorted((mark, turns, title) for mark, _, turns, title in listed) == [
        (" ", "1", "hello model"),
        ("*", "1", "second topic"),
    ], first.stdout
    old_id = next(session_id for mark, session_id, _, _ in listed if mark == " ")

    second = run_bot(config, "chat", stdin=f"/resume {old_id}\n/history\n/quit\n")
    assert second.returncode == 0, second.stderr
    assert f"Resumed {old_id}: hello model (1 turn)." in second.stdout
    assert "user: hello model" in second.stdout
    assert "assistant: " in second.stdout


def test_commands_are_not_sent_to_the_model(tiny_llama_dir: Path, tmp_path: Path) -> None:
    config = write_config(tmp_path, tiny_llama_dir)
    done = run_bot(config, "chat", stdin="/frobnicate now\n/resume\n/list\n//etc is a folder\n/history\n")
    assert done.returncode == 0, done.stderr
    assert "Session " in done.stdout and "(0 turns)" in done.stdout
    assert "Unknown command /frobnicate: /help lists them" in done.stdout
    assert "Usage: /resume ID (/list shows the IDs)." in done.stdout
    assert re.search(r"\* \S{16}  \S+ +0 turns  New chat\n", done.stdout), "neither command became a turn"
    assert "user: /etc is a folder" in done.stdout, "// sends text that begins with /"
    assert done.stdout.endswith("Bye.\n"), "Ctrl-D (end of input) leaves"


async def test_ctrl_c_stops_the_answer_and_a_second_at_the_prompt_quits(tmp_path: Path) -> None:
    model = build_script_llama(tmp_path / "letters", LETTERS)
    config = tmp_path / "config.toml"
    config.write_text(
        f'[model]\nname = "{model}"\ntemperature = 0\nmax_new_tokens = 2000\ndevice_map = "cpu"\n'
        'context_length = 4096\n[storage]\ndata_dir = "data"\n'
    )
    chat = await asyncio.create_subprocess_exec(
        *(sys.executable, "-m", "bot", "--config", str(config), "--log-level", "WARNING", "chat"),
        cwd=REPO,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    assert chat.stdin is not None and chat.stdout is not None
    try:
        seen = await read_until(chat.stdout, "you> ")
        chat.stdin.write(b"write the alphabet\n")
        await chat.stdin.drain()
        seen += await read_until(chat.stdout, "bot> a b c")  # the answer is streaming
        chat.send_signal(signal.SIGINT)
        seen += await read_until(chat.stdout, "you> ")
        assert " [stopped]\n" in seen, seen
        chat.stdin.write(b"/history\n")
        await chat.stdin.drain()
        seen += await read_until(chat.stdout, "you> ")
        chat.send_signal(signal.SIGINT)  # at the prompt: leaves
        out, err = await asyncio.wait_for(chat.communicate(), 60)
    finally:
        if chat.returncode is None:
            chat.kill()
            await chat.wait()
    seen += out.decode()
    assert chat.returncode == 0, err.decode()
    assert "assistant [stopped]: a b c" in seen, "the part written is kept, marked stopped"
    assert "user: write the alphabet" in seen
    assert seen.endswith("Bye.\n")
    assert "Traceback" not in err.decode()


async def read_until(stream: asyncio.StreamReader, text: str, timeout: float = 120) -> str:  # noqa: ASYNC109
    """What the chat prints up to and including the next `text`."""
    return (await asyncio.wait_for(stream.readuntil(text.encode()), timeout)).decode()


def test_import_history_command(tiny_llama_dir: Path, tmp_path: Path) -> None:
    config = write_config(tmp_path, tiny_llama_dir)
    exported = tmp_path / "chat_history.json"
    exported.write_text(json.dumps({"s1": [["Hi", "Hello"]], "s2": [["A", "B"], ["C", "D"]]}))
    result = run_bot(config, "import-history", str(exported))
    assert result.returncode == 0, result.stderr
    assert "Imported 2 sessions (6 messages)" in result.stdout
    assert len(list((tmp_path / "data" / "sessions").glob("*.json"))) == 2

    # The same file again, with one session more: only that one is new.
    exported.write_text(json.dumps({"s1": [["Hi", "Hello"]], "s2": [["A", "B"], ["C", "D"]], "s3": [["E", "F"]]}))
    again = run_bot(config, "import-history", str(exported))
    assert again.returncode == 0, again.stderr
    assert "Imported 1 session (2 messages)" in again.stdout
    assert "Skipped 2 sessions imported before: s1, s2" in again.stdout
    assert len(list((tmp_path / "data" / "sessions").glob("*.json"))) == 3


@pytest.mark.parametrize(
    ("content", "words"),
    [
        (None, "no such file"),
        ("{not json", "not valid JSON"),
        ("[]", "expected a JSON object of session id → messages, not an array"),
        ('{"s1": [["a", "b", "c"]]}', "session 's1', message 0: expected [user, assistant]"),
        ('{"s1": [["a", 5]]}', "a [user, assistant] pair holds text (or null), not a number"),
        ('{"s1": {"a": "b"}}', "session 's1': expected a list of messages"),
    ],
)
def test_a_file_that_cannot_be_imported_is_one_line(tmp_path: Path, content: str | None, words: str) -> None:
    exported = tmp_path / "chat_history.json"
    if content is not None:
        exported.write_text(content, encoding="utf-8")
    config = tmp_path / "config.toml"
    config.write_text('[storage]\ndata_dir = "data"\n')
    result = run_bot(config, "import-history", str(exported))
    assert result.returncode == 2
    (line,) = result.stderr.splitlines()
    assert line.startswith(f"Error: cannot import {exported}: ")
    assert words in result.stderr
    assert not list((tmp_path / "data" / "sessions").glob("*.json")), "a bad file imports nothing"


def test_a_config_error_names_file_and_key(tmp_path: Path) -> None:
    config = tmp_path / "config.toml"
    config.write_text("[model]\nmax_new_tokens = 'lots'\n")
    result = run_bot(config, "chat")
    assert result.returncode == 2
    assert str(config) in result.stderr and "[model.max_new_tokens]" in result.stderr
    assert "Traceback" not in result.stderr


def test_running_the_bot_without_a_token_says_which_variable(tmp_path: Path) -> None:
    config = tmp_path / "config.toml"
    config.write_text("[discord]\ntoken_env = 'LLAMA_DISCORD_TEST_TOKEN'\n")
    result = run_bot(config)
    assert result.returncode == 2
    assert "LLAMA_DISCORD_TEST_TOKEN" in result.stderr and "[discord.token_env]" in result.stderr


def test_a_model_that_cannot_be_loaded_is_a_clear_error(tmp_path: Path) -> None:
    config = tmp_path / "config.toml"
    config.write_text(f'[model]\nname = "{tmp_path / "no-such-model"}"\n')
    result = run_bot(config, "chat")
    assert result.returncode == 2
    assert result.stderr.splitlines() == [
        f"Configuration error: {config}: [model.name] there is no folder {tmp_path / 'no-such-model'} (name is a "
        "local model folder or a Hugging Face id such as meta-llama/Llama-2-7b-chat-hf)"
    ]
