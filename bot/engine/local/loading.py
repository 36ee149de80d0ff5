"""How the local model is loaded: dtype, device map, per-device memory and quantization (bitsandbytes on NVIDIA
GPUs, torchao's int8 weights anywhere); then the model and tokenizer themselves, and what the engine needs to know
of them.

`check_loading_supported` runs at start-up, before any weights are read, so an operator who asks for a GPU-only
feature on a machine without one (or runs an untested transformers) gets a one-line ConfigError naming the key
instead of a stack trace from deep inside transformers minutes later.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, cast

from bot.engine.local.source import model_source_kwargs
from bot.errors import ConfigError

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

    from bot.config import ModelSettings, Settings

log = logging.getLogger(__name__)

GPU_EXTRA_HINT = "pip install 'llama-discord[gpu]'"
INT8_EXTRA_HINT = "pip install 'llama-discord[int8]'"
BITSANDBYTES = ("4bit", "8bit")
# The transformers minor version kv_store.py's cache subclasses are tested with; pyproject.toml pins the same.
TESTED_TRANSFORMERS = (5, 24)


class UnsupportedTransformersError(RuntimeError):
    """The installed transformers is not the minor version the KV store was tested with."""


def check_transformers_version(version: str) -> None:
    """Raise UnsupportedTransformersError, in one sentence, unless `version` is of the tested minor version.

    kv_store.py subclasses transformers' cache internals, which change between minor versions without notice: a
    mismatch could run and answer subtly wrong, so it is refused at start-up rather than discovered in a chat."""
    tested = ".".join(map(str, TESTED_TRANSFORMERS))
    found = re.match(r"(\d+)\.(\d+)\b", version)
    if found is None or (int(found[1]), int(found[2])) != TESTED_TRANSFORMERS:
        raise UnsupportedTransformersError(
            f"the local backend is tested with transformers {tested}.x and {version} is installed: "
            f"pip install 'transformers>={tested},<{TESTED_TRANSFORMERS[0]}.{TESTED_TRANSFORMERS[1] + 1}'"
        )


@dataclass(frozen=True)
class LoadedModel:
    """The model and tokenizer, with what the engine reads of them on every request."""

    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    eos_ids: frozenset[int]
    pad_id: int
    vocab_size: int
    context_length: int


def load_model(
    settings: ModelSettings,
    *,
    hf_token: str | None = None,
    loader: Callable[[], tuple[PreTrainedModel, PreTrainedTokenizerBase]] | None = None,
) -> LoadedModel:
    """Load `settings.name` (or call `loader`), ready for inference; runs on the engine's worker thread."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    s = settings
    if s.quantization == "int8" and (s.compile == "off" or s.dtype == "float32"):
        # Eagerly, each step widens every int8 matrix back to floats before multiplying: more bytes, not fewer; and
        # inductor's int8 matmul lowering matches 16-bit activations only (with float32 the compiled step ran as
        # fast as float32's, its peak memory that of float32 copies of the weights).
        log.warning(
            'int8 weights make decode steps faster only with compile = "decode" and dtype = "bfloat16" (or "float16" '
            "on a GPU); as set, each step is as slow as unquantized, or slower"
        )
    if loader is not None:
        model, tokenizer = loader()
    else:
        common: dict[str, object] = {"token": hf_token}
        if s.gguf_file:
            common["gguf_file"] = s.gguf_file
        # A wrong name or an unreachable hub is one sentence here, not a misleading error from transformers.
        common.update(model_source_kwargs(s, hf_token=hf_token))
        tokenizer = AutoTokenizer.from_pretrained(s.name, **common)
        model = AutoModelForCausalLM.from_pretrained(s.name, **model_load_kwargs(s), **common)
    model.eval()
    use_grouped_attention(model)
    tokenizer.padding_side = "left"
    eos = model.generation_config.eos_token_id
    eos_ids = {eos} if isinstance(eos, int) else set(eos or ())
    if tokenizer.eos_token_id is not None:
        eos_ids.add(tokenizer.eos_token_id)
    pad = next(
        (i for i in (tokenizer.pad_token_id, tokenizer.eos_token_id, tokenizer.unk_token_id) if i is not None),
        0,
    )
    context = s.context_length or getattr(model.config, "max_position_embeddings", None)
    if not context:
        raise ValueError(f"{s.name} does not state its context length; set model.context_length")
    log.info(
        "loaded %s on %s: %s, %.1fM parameters, %.0f MiB, context %d tokens",
        s.name,
        model.device,
        model.dtype,
        model.num_parameters() / 1e6,
        model.get_memory_footprint() / 2**20,
        context,
    )
    return LoadedModel(
        model=model,
        tokenizer=tokenizer,
        eos_ids=frozenset(eos_ids),
        pad_id=pad,
        # get_input_embeddings() is typed nn.Module, whose __getattr__ gives Tensor | Module; an Embedding's is an int.
        vocab_size=cast(int, model.get_input_embeddings().num_embeddings),
        context_length=context,
    )


def use_grouped_attention(model: PreTrainedModel) -> None:
    """On the CPU, let torch's attention read grouped keys and values (GQA) as they are.

    transformers' SDPA attention copies each layer's keys and values once per query head sharing them (repeat_kv)
    unless told that the kernel takes them grouped, which it assumes only of GPUs without a mask; a compiled
    decode step always copies. torch's CPU kernel takes them grouped, masked or not, without the copies (same
    results, to float rounding): 3.9x faster attention for SmolLM2 (3 key heads for 9 query heads) at 16 rows of 200
    slots, 3.6x for one row of 2,000. transformers reads the switch at every call, so it is set before the first.
    """
    if model.device.type == "cpu":
        os.environ.setdefault("TRANSFORMERS_SDPA_FORCE_GQA", "1")


def model_load_kwargs(settings: ModelSettings) -> dict[str, Any]:
    """The keyword arguments for `AutoModelForCausalLM.from_pretrained` (besides the name, token and gguf_file)."""
    kwargs: dict[str, Any] = {"dtype": _torch_dtype(settings.dtype), "device_map": settings.device_map}
    if settings.max_memory:
        kwargs["max_memory"] = accelerate_max_memory(settings.max_memory)
    if settings.quantization == "int8":
        kwargs["quantization_config"] = _torchao_int8_config()
    elif settings.quantization in BITSANDBYTES:
        kwargs["quantization_config"] = _bitsandbytes_config(settings)
    return kwargs


def accelerate_max_memory(max_memory: Mapping[str, str]) -> dict[int | str, str]:
    """accelerate wants GPU indices as ints ("0" in TOML) and device names as strings."""
    return {int(device) if device.isdigit() else device: size.strip() for device, size in max_memory.items()}


def check_loading_supported(settings: Settings) -> None:
    """Raise ConfigError, naming the key, when this machine cannot load the model the way `[model]` asks."""
    m = settings.model
    if m.backend != "local":
        return  # the server loads the model; these keys do not apply
    source = settings.source or "<config>"
    import torch
    import transformers

    try:
        check_transformers_version(transformers.__version__)
    except UnsupportedTransformersError as exc:
        raise ConfigError(source, "model.backend", f'"local": {exc} (or use backend = "openai")') from None

    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if m.quantization == "int8" and importlib.util.find_spec("torchao") is None:
        missing = f'"int8" needs the torchao package, which is not installed ({INT8_EXTRA_HINT})'
        raise ConfigError(source, "model.quantization", missing)
    if m.quantization in BITSANDBYTES:
        if gpus == 0:
            raise ConfigError(
                source,
                "model.quantization",
                f'"{m.quantization}" needs an NVIDIA GPU with CUDA, and this machine has none '
                '(set quantization = "none" to run unquantized on the CPU)',
            )
        if importlib.util.find_spec("bitsandbytes") is None:
            raise ConfigError(
                source,
                "model.quantization",
                f'"{m.quantization}" needs the bitsandbytes package, which is not installed ({GPU_EXTRA_HINT})',
            )
    indices = sorted(int(device) for device in m.max_memory if device.isdigit())
    if indices and indices[-1] >= gpus:
        raise ConfigError(
            source,
            f"model.max_memory.{indices[-1]}",
            f"names GPU {indices[-1]}, but this machine has {gpus} CUDA GPU{'' if gpus == 1 else 's'}",
        )
    if m.device_map.startswith("cuda") and gpus == 0:
        raise ConfigError(
            source, "model.device_map", f'"{m.device_map}" needs a CUDA GPU, and this machine has none (use "auto")'
        )


def _torch_dtype(name: str) -> torch.dtype | str:
    if name == "auto":
        return "auto"
    import torch

    dtype = getattr(torch, name)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"{name!r} is not a torch dtype")
    return dtype


def _torchao_int8_config() -> Any:
    """Every linear layer's weights as int8, one scale per output row (torchao's Int8WeightOnlyConfig): a quarter
    of float32's bytes per decode step; the activations stay in the model's dtype."""
    from torchao.quantization import Int8WeightOnlyConfig
    from transformers import TorchAoConfig

    return TorchAoConfig(Int8WeightOnlyConfig())


def _bitsandbytes_config(settings: ModelSettings) -> Any:
    import torch
    from transformers import BitsAndBytesConfig

    if settings.quantization == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    # float16 compute unless asked otherwise: every CUDA GPU has it, bfloat16 needs Ampere or newer.
    compute = torch.float16 if settings.dtype == "auto" else getattr(torch, settings.dtype)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_compute_dtype=compute,
        bnb_4bit_use_double_quant=True,
    )
