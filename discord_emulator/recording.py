"""What the bot sent to the REST API, and failures a test asked for."""

from __future__ import annotations

import asyncio
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from .store import UploadedFile


@dataclass
class RecordedCall:
    """One REST request as the emulator received it."""

    method: str
    path: str  # without the /api/v10 prefix, e.g. "/channels/1/messages"
    query: dict[str, str]
    json: Any  # the JSON body, or the payload_json of a multipart body; None when absent
    files: list[UploadedFile]
    time: float  # loop time when it arrived
    status: int = 0  # the status the emulator answered with

    def matches(self, method: str | None, path_pattern: str | None) -> bool:
        if method is not None and self.method != method.upper():
            return False
        return path_pattern is None or re.fullmatch(path_pattern, self.path) is not None


@dataclass
class FailureRule:
    """Answer the next `times` matching requests with an error instead of handling them."""

    method: str | None
    path_pattern: str
    status: int
    times: int
    retry_after: float
    body: dict[str, Any] | None = None
    hits: list[RecordedCall] = field(default_factory=list)

    def take(self, call: RecordedCall) -> bool:
        if self.times <= 0 or not call.matches(self.method, self.path_pattern):
            return False
        self.times -= 1
        self.hits.append(call)
        return True


@dataclass
class HoldRule:
    """Hold the responses to matching requests (and `when`, if given, approves) until `released` is set."""

    method: str | None
    path_pattern: str
    when: Callable[[RecordedCall], bool] | None = None
    released: asyncio.Event = field(default_factory=asyncio.Event)
    hits: list[RecordedCall] = field(default_factory=list)

    def take(self, call: RecordedCall) -> bool:
        if not call.matches(self.method, self.path_pattern) or (self.when is not None and not self.when(call)):
            return False
        self.hits.append(call)
        return True
