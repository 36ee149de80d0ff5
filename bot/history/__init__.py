"""Stored sessions: session files (files.py), the index log (index.py), a held session (held.py), the store."""

from bot.history.files import FileStamp, atomic_write
from bot.history.index import SessionIndex, recency
from bot.history.store import HeldSession, HistoryStore

__all__ = ["FileStamp", "HeldSession", "HistoryStore", "SessionIndex", "atomic_write", "recency"]
