"""`python -m bot chat` and `import-history` as a user runs them: a real process, stdin and stdout."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


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
    listed = re.findall(r"([ *]) ([A-Za-z0-9_-]{16})  \S+ +(\d+) turns  (.*)", first.stdout)
    assert sorted((mark, turns, title) for mark, _, turns, title in listed) == [
        (" ", "1", "hello model"),
        ("*", "1", "second topic"),
    ], first.stdout
    old_id = next(session_id for mark, session_id, _, _ in listed if mark == " ")

    second = run_bot(config, "chat", stdin=f"/resume {old_id}\n/history\n/quit\n")
    assert second.returncode == 0, second.stderr
    assert f"Resumed {old_id}" in second.stdout
    assert "user: hello model" in second.stdout
    assert "assistant: " in second.stdout


def test_import_history_command(tiny_llama_dir: Path, tmp_path: Path) -> None:
    config = write_config(tmp_path, tiny_llama_dir)
    exported = tmp_path / "chat_history.json"
    exported.write_text(json.dumps({"s1": [["Hi", "Hello"]], "s2": [["A", "B"], ["C", "D"]]}))
    result = run_bot(config, "import-history", str(exported))
    assert result.returncode == 0, result.stderr
    assert "Imported 2 sessions (6 messages)" in result.stdout
    assert len(list((tmp_path / "data" / "sessions").glob("*.json"))) == 2


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
    assert "[model.name]" in result.stderr and "cannot load" in result.stderr
    assert "Traceback" not in result.stderr
