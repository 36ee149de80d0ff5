"""Model fixtures shared by the test modules: a tiny random LLaMA and the real SmolLM2-135M-Instruct."""

from __future__ import annotations

from pathlib import Path

import pytest
from model_fixtures import build_tiny_llama, ensure_smollm2


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-layer random-weight LLaMA with the real LLaMA-2 tokenizer, saved like a downloaded model."""
    return build_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    """SmolLM2-135M-Instruct as a Hugging Face folder, converted once into the cache (LLAMA_DISCORD_CACHE)."""
    return ensure_smollm2()
