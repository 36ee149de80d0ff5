"""Where `[model] name` points, checked before transformers is asked to load it.

transformers answers a wrong name with misleading errors: a missing folder is "Repo id must be in the form ...", an
empty folder or a GGUF folder without `gguf_file` is "You need to have sentencepiece or tiktoken installed", and a
hub name without a network is a minute of retries before a line about gated models. These checks say what is
wrong in one sentence, and ask the hub once (no retries): when it cannot be reached, a cached model is loaded
from the cache at once.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import TYPE_CHECKING

from bot.errors import first_line

if TYPE_CHECKING:
    from bot.config import ModelSettings

log = logging.getLogger(__name__)

# huggingface_hub's repo id rule: "name" or "namespace/name" of word characters, dots and dashes.
_REPO_ID = re.compile(r"[\w.-]+(/[\w.-]+)?\Z")
# Any one of these lets AutoTokenizer build a tokenizer from a folder.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "spiece.model")
HUB_PROBE_TIMEOUT_S = 10.0


class ModelNotFoundError(Exception):
    """`key` (a [model] setting) names no model that can be loaded: a setting to fix, not a passing failure."""

    def __init__(self, key: str, problem: str) -> None:
        self.key = key
        self.problem = problem
        super().__init__(problem)


class ModelHubUnreachableError(Exception):
    """The model is on the hub only (not cached here) and the hub cannot be reached now."""


def model_source_kwargs(settings: ModelSettings, *, hf_token: str | None) -> dict[str, object]:
    """Extra `from_pretrained` keywords for where the model is (`local_files_only` when the hub is unreachable
    but the model is cached); raises ModelNotFoundError or ModelHubUnreachableError in one sentence."""
    name = settings.name
    path = Path(name).expanduser()
    if path.exists() or not _REPO_ID.match(name) or name.startswith("."):
        check_model_folder(path, settings.gguf_file)
        return {}
    return _hub_kwargs(settings, hf_token)


def check_model_folder(path: Path, gguf_file: str | None) -> None:
    """A folder transformers can load a model and tokenizer from (or a GGUF file in it, when `gguf_file` is set)."""
    if not path.exists():
        raise ModelNotFoundError(
            "model.name",
            f"there is no folder {path} (name is a local model folder or a Hugging Face id such as "
            "meta-llama/Llama-2-7b-chat-hf)",
        )
    if path.is_file():
        if path.suffix == ".gguf":
            raise ModelNotFoundError(
                "model.name", f"{path} is a GGUF file: set name = {str(path.parent)!r} and gguf_file = {path.name!r}"
            )
        raise ModelNotFoundError("model.name", f"{path} is a file, not a model folder")
    ggufs = sorted(p.name for p in path.glob("*.gguf"))
    if gguf_file:
        if not (path / gguf_file).is_file():
            held = f" (it holds {', '.join(ggufs[:3])})" if ggufs else ""
            raise ModelNotFoundError("model.gguf_file", f"{gguf_file!r} is not in {path}{held}")
        return
    if not (path / "config.json").is_file():
        if ggufs:
            raise ModelNotFoundError(
                "model.gguf_file",
                f"{path} holds GGUF weights and no config.json: set gguf_file = {ggufs[0]!r}",
            )
        if not any(path.iterdir()):
            raise ModelNotFoundError(
                "model.name", f"{path} is an empty folder: put a model in it (save_pretrained, `hf download`)"
            )
        raise ModelNotFoundError("model.name", f"{path} has no config.json, so it is not a Hugging Face model folder")
    if not any((path / file).is_file() for file in TOKENIZER_FILES):
        raise ModelNotFoundError(
            "model.name", f"{path} has no tokenizer files ({', '.join(TOKENIZER_FILES[:3])}): save the tokenizer too"
        )


def _hub_kwargs(settings: ModelSettings, hf_token: str | None) -> dict[str, object]:
    from huggingface_hub import constants, get_hf_file_metadata, hf_hub_url, try_to_load_from_cache
    from huggingface_hub.errors import EntryNotFoundError, GatedRepoError, RepositoryNotFoundError

    name = settings.name
    probe = settings.gguf_file or "config.json"
    cached = isinstance(try_to_load_from_cache(name, probe), str)
    if constants.HF_HUB_OFFLINE:
        if cached:
            return {}  # transformers reads HF_HUB_OFFLINE too and loads from the cache
        raise ModelNotFoundError(
            "model.name",
            f"{name!r} is not in the Hugging Face cache ({constants.HF_HUB_CACHE}) and HF_HUB_OFFLINE is set: "
            "download it once with the network on, or set name to a local folder",
        )
    try:
        get_hf_file_metadata(hf_hub_url(name, probe), token=hf_token, timeout=HUB_PROBE_TIMEOUT_S)
    except GatedRepoError:  # before RepositoryNotFoundError, its base class
        variable = settings.hf_token_env
        who = f"the account of the token in {variable}" if hf_token else f"an account, and set {variable}"
        raise ModelNotFoundError(
            "model.name", f"{name} is gated: accept its licence on {constants.ENDPOINT}/{name} with {who}"
        ) from None
    except RepositoryNotFoundError:
        private = "" if hf_token else f", or it is private and needs a token in {settings.hf_token_env}"
        raise ModelNotFoundError(
            "model.name", f"there is no model {name!r} on Hugging Face (nor a local folder of that name){private}"
        ) from None
    except EntryNotFoundError:
        if settings.gguf_file:
            raise ModelNotFoundError("model.gguf_file", f"{settings.gguf_file!r} is not in {name}") from None
        raise ModelNotFoundError(
            "model.name", f"{name} has no config.json (for a GGUF repository, set gguf_file)"
        ) from None
    except Exception as exc:  # the hub client's transport and HTTP errors (httpx) share no public base here
        reason = first_line(exc)
        if cached:
            log.warning("cannot reach %s (%s); loading %s from the local cache", constants.ENDPOINT, reason, name)
            return {"local_files_only": True}
        raise ModelHubUnreachableError(
            f"cannot reach {constants.ENDPOINT} to download {name} ({reason}), and it is not in the local cache: "
            "check the network, or set [model] name to a local folder"
        ) from None
    return {}
