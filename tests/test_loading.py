"""Loading options for small and several GPUs (bot/engine/local/loading.py): the from_pretrained keywords, and the
clear start-up errors of a machine without CUDA and of an untested transformers. The GPU path itself (bitsandbytes
4/8-bit, several GPUs) needs a CUDA machine and is not exercised here."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import BitsAndBytesConfig

from bot.config import load_settings, settings_from_mapping
from bot.engine import GenerationRequest, LocalEngine, SamplingParams, TokenPrompt
from bot.engine.local.loading import (
    UnsupportedTransformersError,
    check_loading_supported,
    check_transformers_version,
    model_load_kwargs,
)
from bot.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]
needs_no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="the error path of machines without CUDA")


def test_default_keywords_are_the_ones_local_loading_always_used() -> None:
    assert model_load_kwargs(settings_from_mapping({}).model) == {"dtype": "auto", "device_map": "auto"}
    model = settings_from_mapping({"model": {"dtype": "bfloat16", "device_map": "cpu"}}).model
    assert model_load_kwargs(model) == {"dtype": torch.bfloat16, "device_map": "cpu"}


def test_max_memory_is_a_toml_table_given_to_accelerate_with_gpu_indices_as_ints(tmp_path: Path) -> None:
    path = tmp_path / "config.toml"
    path.write_text('[model]\nmax_memory = { "0" = "20GiB", "1" = "20GiB", cpu = "60GiB" }\n', encoding="utf-8")
    model = load_settings(path).model
    assert dict(model.max_memory) == {"0": "20GiB", "1": "20GiB", "cpu": "60GiB"}
    with pytest.raises(TypeError):
        model.max_memory["0"] = "1GiB"  # type: ignore[index]
    assert model_load_kwargs(model)["max_memory"] == {0: "20GiB", 1: "20GiB", "cpu": "60GiB"}


def test_quantization_builds_a_bitsandbytes_config() -> None:
    four = model_load_kwargs(settings_from_mapping({"model": {"quantization": "4bit"}}).model)["quantization_config"]
    assert isinstance(four, BitsAndBytesConfig)
    assert four.load_in_4bit and four.bnb_4bit_quant_type == "nf4"
    assert four.bnb_4bit_compute_dtype == torch.float16
    eight = model_load_kwargs(settings_from_mapping({"model": {"quantization": "8bit"}}).model)["quantization_config"]
    assert eight.load_in_8bit and not eight.load_in_4bit


@pytest.mark.parametrize(
    ("model", "key", "words"),
    [
        ({"quantization": "4bit"}, "model.quantization", "needs an NVIDIA GPU with CUDA"),
        ({"quantization": "8bit"}, "model.quantization", "needs an NVIDIA GPU with CUDA"),
        ({"max_memory": {"0": "20GiB", "cpu": "30GiB"}}, "model.max_memory.0", "this machine has 0 CUDA GPUs"),
        ({"device_map": "cuda:0"}, "model.device_map", "needs a CUDA GPU"),
    ],
)
@needs_no_cuda
def test_gpu_options_without_cuda_are_a_config_error_naming_the_key(
    model: dict[str, object], key: str, words: str
) -> None:
    with pytest.raises(ConfigError) as info:
        check_loading_supported(settings_from_mapping({"model": model}, source=Path("bot.toml")))
    assert f"bot.toml: [{key}]" in str(info.value)
    assert words in str(info.value)


def test_cpu_options_and_remote_backends_pass_the_check() -> None:
    check_loading_supported(settings_from_mapping({"model": {"max_memory": {"cpu": "8GiB"}}}))
    remote = {"backend": "openai", "base_url": "http://127.0.0.1:8000/v1", "quantization": "4bit"}
    check_loading_supported(settings_from_mapping({"model": remote}))  # the server loads the model


@pytest.mark.parametrize(
    ("model", "key"),
    [
        ({"quantization": "2bit"}, "model.quantization"),
        ({"max_memory": {"gpu0": "2GiB"}}, "model.max_memory.gpu0"),
        ({"max_memory": {"0": "plenty"}}, "model.max_memory.0"),
        ({"max_memory": "20GiB"}, "model.max_memory"),
        ({"max_memory": {"cpu": "2GiB"}, "device_map": "cpu"}, "model.max_memory"),
    ],
)
def test_bad_loading_settings_name_the_key(model: dict[str, object], key: str) -> None:
    with pytest.raises(ConfigError) as info:
        settings_from_mapping({"model": model})
    assert f"[{key}]" in str(info.value)


@pytest.mark.parametrize("version", ["5.24.0", "5.24.3", "5.24.0.dev0"])
def test_the_tested_transformers_minor_version_passes(version: str) -> None:
    check_transformers_version(version)


@pytest.mark.parametrize("version", ["5.30.1", "6.0", "5.23.9", "4.57.1", "garbage"])
def test_another_transformers_version_is_refused_in_one_sentence(version: str) -> None:
    with pytest.raises(UnsupportedTransformersError) as info:
        check_transformers_version(version)
    message = str(info.value)
    assert "\n" not in message
    assert f"tested with transformers 5.24.x and {version} is installed" in message
    assert "pip install 'transformers>=5.24,<5.25'" in message


def test_the_installed_transformers_is_the_tested_one() -> None:
    import transformers

    check_transformers_version(transformers.__version__)


async def test_a_model_loads_through_accelerate_within_max_memory(tiny_llama_dir: Path) -> None:
    model = settings_from_mapping(
        {"model": {"name": str(tiny_llama_dir), "max_memory": {"cpu": "2GiB"}, "max_new_tokens": 4, "temperature": 0}}
    ).model
    async with LocalEngine(model) as engine:
        assert engine.model.device.type == "cpu"
        prompt = tuple(engine.tokenizer.encode("hello"))
        request = GenerationRequest(TokenPrompt(prompt), sampling=SamplingParams(max_new_tokens=4))
        assert [d async for d in engine.generate(request)]


@needs_no_cuda
def test_the_command_line_reports_the_key_without_a_stack_trace(tmp_path: Path) -> None:
    config = tmp_path / "config.toml"
    config.write_text('[model]\nquantization = "4bit"\n', encoding="utf-8")
    done = subprocess.run(
        [sys.executable, "-m", "bot", "--config", str(config), "chat"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 2
    assert f"Configuration error: {config}: [model.quantization]" in done.stderr
    assert "Traceback" not in done.stderr + done.stdout


def test_an_unreachable_hub_loads_a_cached_model_from_the_cache_at_once(tmp_path: Path) -> None:
    """One try at the hub; the model in the cache is then loaded without it (local_files_only), not after a minute
    of retries."""
    commit = "0" * 40
    repo = tmp_path / "hub" / "models--someone--cached-model"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    (repo / "snapshots" / commit).mkdir(parents=True)
    (repo / "snapshots" / commit / "config.json").write_text("{}")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        closed = probe.getsockname()[1]
    script = (
        "from bot.config import settings_from_mapping\n"
        "from bot.engine.local.source import model_source_kwargs\n"
        "m = settings_from_mapping({'model': {'name': 'someone/cached-model'}}).model\n"
        "print(model_source_kwargs(m, hf_token=None))\n"
    )
    env = {**os.environ, "HF_HOME": str(tmp_path), "HF_ENDPOINT": f"http://127.0.0.1:{closed}"}
    env.pop("HF_HUB_OFFLINE", None)
    done = subprocess.run(
        [sys.executable, "-c", script], cwd=REPO, env=env, capture_output=True, text=True, timeout=180, check=True
    )
    assert done.stdout == "{'local_files_only': True}\n"
    assert "loading someone/cached-model from the local cache" in done.stderr
