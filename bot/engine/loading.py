"""How the local model is loaded: dtype, device map, per-device memory and bitsandbytes quantization.

`check_loading_supported` runs at start-up, before any weights are read, so an operator who asks for a GPU-only
feature on a machine without one gets a one-line ConfigError naming the key instead of a stack trace from deep
inside transformers minutes later.
"""

from __future__ import annotations

import importlib.util
import logging
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from bot.errors import ConfigError

if TYPE_CHECKING:
    import torch

    from bot.config import ModelSettings, Settings

log = logging.getLogger(__name__)

GPU_EXTRA_HINT = "pip install 'llama-discord[gpu]'"


def model_load_kwargs(settings: ModelSettings) -> dict[str, Any]:
    """The keyword arguments for `AutoModelForCausalLM.from_pretrained` (besides the name, token and gguf_file)."""
    kwargs: dict[str, Any] = {"dtype": _torch_dtype(settings.dtype), "device_map": settings.device_map}
    if settings.max_memory:
        kwargs["max_memory"] = accelerate_max_memory(settings.max_memory)
    if settings.quantization != "none":
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

    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if m.quantization != "none":
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

    return getattr(torch, name)


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
