"""Files attached to a message: which ones the model can read (text, UTF-8, within the limits), and how they
look in the turn. Discord-free: the chat cog reads the bytes with discord.py's `Attachment.read`."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import PurePosixPath

# Source and text files that Discord may label application/octet-stream (or nothing at all).
_SUFFIXES = (
    ".txt .md .markdown .rst .csv .tsv .log .json .jsonl .yaml .yml .toml .ini .cfg .conf .xml .html .htm .css "
    ".py .pyi .js .mjs .ts .tsx .jsx .java .kt .c .h .cc .cpp .hpp .cs .go .rs .rb .php .swift .scala .sh .bash "
    ".zsh .ps1 .sql .r .lua .pl .hs .ex .exs .erl .clj .dart .vue .svelte .tex .diff .patch"
)
TEXT_SUFFIXES = frozenset(_SUFFIXES.split())
TEXT_TYPES = frozenset(
    ("application/json", "application/xml", "application/javascript", "application/x-yaml", "application/toml")
)


@dataclass(frozen=True)
class TextFile:
    """A file read into a turn: its name and its text, as the model sees them."""

    filename: str
    text: str


def is_text_file(filename: str, content_type: str | None) -> bool:
    kind = (content_type or "").split(";")[0].strip().lower()
    return kind.startswith("text/") or kind in TEXT_TYPES or PurePosixPath(filename.lower()).suffix in TEXT_SUFFIXES


def why_not_read(filename: str, content_type: str | None, size: int, *, max_bytes: int) -> str | None:
    """The reason a file is not read, as the end of a sentence, or None when it may be."""
    if not is_text_file(filename, content_type):
        return "is not a text file (I read text and source files only)"
    if size > max_bytes:
        return f"is {size:,} bytes; the limit is {max_bytes:,}"
    return None


def decode(data: bytes) -> str | None:
    """The file's text, or None when it is not UTF-8 (a binary file with a text-like name)."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        return None
    return None if "\x00" in text else text.removeprefix("\ufeff")


def with_files(text: str, files: tuple[TextFile, ...]) -> str:
    """The user's turn as the model reads it: their text, then each file marked with its name."""
    parts = [text] if text else []
    for file in files:
        parts.append(f"--- file: {file.filename} ---\n{file.text.rstrip()}\n--- end of {file.filename} ---")
    return "\n\n".join(parts)
