"""Logging: every line once, in one timestamped format, on stderr (journald keeps it as it is).

Left alone, some lines came out twice or raw: huggingface_hub logs through a handler of its own and then again
through the root logger, transformers prints through its own handler only (no timestamp), and `warnings.warn`
writes two lines (the message, then the source line) straight to stderr.
"""

from __future__ import annotations

import logging
import sys
import warnings
from typing import TextIO

FORMAT = "%(asctime)s %(levelname)-8s %(name)s: %(message)s"
LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
# The libraries that install a handler of their own on import; theirs go, so their records reach ours.
OWN_HANDLER_LOGGERS = ("huggingface_hub", "transformers")
# discord.py warns on every client it makes that voice needs extra packages; this bot has no voice.
VOICE_WARNINGS = ("PyNaCl is not installed", "davey is not installed")


def parse_level(name: str) -> int | None:
    """The logging level named `name` (any case), or None when it is not one."""
    upper = name.strip().upper()
    return logging.getLevelName(upper) if upper in LEVELS else None


class _NoVoiceWarnings(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.name == "discord.client" and str(record.msg).startswith(VOICE_WARNINGS))


def configure_logging(level: int) -> None:
    """The root logger's one handler, and warnings as one log line each. A handler already on the root logger
    (pytest's, when main() runs in a test) is left as it is."""
    root = logging.getLogger()
    if not root.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter(FORMAT))
        handler.addFilter(_NoVoiceWarnings())
        root.addHandler(handler)
        root.setLevel(level)
    warnings.showwarning = _log_warning
    # torchao ([model] quantization = "int8"; transformers imports it whenever it is installed) warns at import of
    # every CUDA-only kernel library it cannot load on a machine without one, and its import makes torch warn,
    # through torch's own handler, of a deprecated call of torchao's: expected lines at each start, none the
    # operator can act on.
    logging.getLogger("torchao").setLevel(logging.ERROR)
    logging.getLogger("torch.utils._pytree").setLevel(logging.ERROR)


def adopt_library_loggers(*, progress_bars: bool | None = None) -> None:
    """Send transformers' and huggingface_hub's records through the root logger only (call it after importing
    them: they add their handlers then). Their progress bars are carriage-return animations that a journal
    keeps as a mess of fragments, so they show only on a terminal unless `progress_bars` says otherwise."""
    import huggingface_hub.utils
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_default_handler()
    transformers_logging.enable_propagation()
    for name in OWN_HANDLER_LOGGERS:
        library = logging.getLogger(name)
        for handler in list(library.handlers):
            library.removeHandler(handler)
        library.propagate = True
    if progress_bars is None:
        progress_bars = sys.stderr.isatty()
    if not progress_bars:
        transformers_logging.disable_progress_bar()
        huggingface_hub.utils.disable_progress_bars()


def _log_warning(
    message: Warning | str,
    category: type[Warning],
    filename: str,
    lineno: int,
    file: TextIO | None = None,
    line: str | None = None,
) -> None:
    # warnings.showwarning's documented replacement point; one line, without the source line it would print.
    logging.getLogger("py.warnings").warning("%s: %s (%s:%d)", category.__name__, message, filename, lineno)
