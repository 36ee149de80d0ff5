"""Model fixtures shared by the test modules: a tiny random LLaMA and the real SmolLM2-135M-Instruct."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from discord_harness import StartBot, World, bot_starter, build_world
from model_fixtures import build_tiny_llama, ensure_smollm2
from openai_server import RunningServer, transformers_server
from script_model import CODE_SCRIPT, PING_SCRIPT, build_script_llama

from discord_emulator import running_emulator


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-layer random-weight LLaMA with the real LLaMA-2 tokenizer, saved like a downloaded model."""
    return build_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    """SmolLM2-135M-Instruct as a Hugging Face folder, converted once into the cache (LLAMA_DISCORD_CACHE)."""
    return ensure_smollm2()


@pytest.fixture(scope="session")
def openai_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    """One real OpenAI-compatible server (`transformers serve`) for the run; it serves any local model folder."""
    with transformers_server(tmp_path_factory.mktemp("serve")) as running:
        yield running


@pytest.fixture(scope="session")
def code_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_script_llama(tmp_path_factory.mktemp("code-model"), CODE_SCRIPT)


@pytest.fixture(scope="session")
def ping_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_script_llama(tmp_path_factory.mktemp("ping-model"), PING_SCRIPT)


@pytest.fixture
async def world(tmp_path: Path) -> AsyncIterator[World]:
    """A Discord API emulator holding the usual test server (tests/discord_harness.py World)."""
    async with running_emulator() as emu:
        yield build_world(emu, tmp_path / "data")


@pytest.fixture
def start_bot(world: World, tiny_llama_dir: Path) -> StartBot:
    """Starts our bot against `world`; the tiny LLaMA unless `model_dir=` says otherwise."""
    return bot_starter(world, tiny_llama_dir)


SLOW_MARKS = ("load", "crash", "faults", "remote_server")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """A test that uses `openai_server` (a real `transformers serve`) is `remote_server`; one with any of the
    slow marks is also `slow`, so `pytest -m "not slow"` is the quick loop."""
    for item in items:
        if "openai_server" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.remote_server)
        if any(item.get_closest_marker(mark) for mark in SLOW_MARKS):
            item.add_marker(pytest.mark.slow)
