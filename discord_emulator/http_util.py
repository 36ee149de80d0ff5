"""Request parsing and Discord-shaped responses shared by the REST handlers."""

from __future__ import annotations

import json
from typing import Any

from aiohttp import BodyPartReader, web

from .store import UploadedFile

API_PREFIX = "/api/v10"
BODY: web.RequestKey[Any] = web.RequestKey("body", object)
FILES: web.RequestKey[list[UploadedFile]] = web.RequestKey("files", list)


def json_response(data: Any, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    # discord.py decodes JSON only when Content-Type is exactly this, without a charset.
    return web.Response(
        body=json.dumps(data).encode(),
        status=status,
        headers={"Content-Type": "application/json", **(headers or {})},
    )


def error_response(status: int, code: int, message: str, **extra: Any) -> web.Response:
    headers = {"Via": "1.1 google"} if status == 429 else None
    return json_response({"message": message, "code": code, **extra}, status, headers)


def no_content() -> web.Response:
    return web.Response(status=204)


async def read_body(request: web.Request) -> tuple[Any, list[UploadedFile]]:
    """The JSON body (or multipart payload_json) and any uploaded files."""
    if request.content_type.startswith("multipart/"):
        payload: Any = None
        files: list[UploadedFile] = []
        reader = await request.multipart()
        async for part in reader:
            if not isinstance(part, BodyPartReader):
                continue
            data = await part.read()
            if part.name == "payload_json":
                payload = json.loads(data)
            else:
                content_type = part.headers.get("Content-Type", "application/octet-stream")
                files.append(UploadedFile(part.name or "", part.filename or "", content_type, bytes(data)))
        return payload, files
    raw = await request.read()
    if raw and request.content_type == "application/json":
        return json.loads(raw), []
    return None, []


def body_of(request: web.Request) -> Any:
    return request.get(BODY) or {}


def files_of(request: web.Request) -> list[UploadedFile]:
    return request.get(FILES) or []
