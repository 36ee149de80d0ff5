"""Interaction callbacks and the interaction webhook (followups, @original)."""

from __future__ import annotations

from typing import Any

from aiohttp import web

from .gateway import Gateway
from .http_util import API_PREFIX, body_of, files_of, json_response, no_content
from .interactions import (
    APPLICATION_COMMAND,
    AUTOCOMPLETE,
    AUTOCOMPLETE_RESULT,
    CHANNEL_MESSAGE,
    DEFERRED_CHANNEL_MESSAGE,
    DEFERRED_UPDATE,
    MESSAGE_COMPONENT,
    MODAL,
    UPDATE_MESSAGE,
    InteractionHandle,
)
from .rest import RestApi
from .store import CHAT_INPUT_COMMAND, DEFAULT_MESSAGE, EPHEMERAL, LOADING, ApiError, Store, UploadedFile

ALLOWED_CALLBACKS = {
    APPLICATION_COMMAND: {CHANNEL_MESSAGE, DEFERRED_CHANNEL_MESSAGE, MODAL},
    MESSAGE_COMPONENT: {CHANNEL_MESSAGE, DEFERRED_CHANNEL_MESSAGE, DEFERRED_UPDATE, UPDATE_MESSAGE, MODAL},
    AUTOCOMPLETE: {AUTOCOMPLETE_RESULT},
}


def _is_ephemeral(message: dict[str, Any]) -> bool:
    return bool(int(message.get("flags") or 0) & EPHEMERAL)


class InteractionApi:
    """Handlers for routes authorised by an interaction token rather than the bot token."""

    def __init__(self, store: Store, gateway: Gateway, rest: RestApi) -> None:
        self._store = store
        self._gateway = gateway
        self._rest = rest
        self.by_id: dict[int, InteractionHandle] = {}
        self.by_token: dict[str, InteractionHandle] = {}

    def add(self, handle: InteractionHandle) -> None:
        self.by_id[handle.id] = handle
        self.by_token[handle.token] = handle

    def routes(self) -> list[web.RouteDef]:
        p = API_PREFIX
        hook = p + "/webhooks/{app}/{token}"
        return [
            web.post(p + "/interactions/{iid}/{token}/callback", self.callback),
            web.post(hook, self.followup),
            web.get(hook + "/messages/{mid}", self.get_message),
            web.patch(hook + "/messages/{mid}", self.edit_message),
            web.delete(hook + "/messages/{mid}", self.delete_message),
        ]

    async def callback(self, request: web.Request) -> web.Response:
        handle = self.by_id.get(int(request.match_info["iid"]))
        if handle is None or handle.token != request.match_info["token"]:
            raise ApiError(404, 10062, "Unknown interaction")
        if handle.callbacks:
            raise ApiError(400, 40060, "Interaction has already been acknowledged.")
        body: dict[str, Any] = body_of(request)
        kind = int(body.get("type", 0))
        if kind not in ALLOWED_CALLBACKS.get(handle.type, set()):
            raise ApiError(400, 50035, f"Invalid Form Body: callback type {kind} for interaction type {handle.type}")
        data: dict[str, Any] = body.get("data") or {}
        handle.callbacks.append(body)
        files: list[UploadedFile] = files_of(request)
        message: dict[str, Any] | None = None
        if kind == CHANNEL_MESSAGE:
            message = await self._create(handle, data, files)
            handle.original_message_id = int(message["id"])
        elif kind == DEFERRED_CHANNEL_MESSAGE:
            flags = (int(data.get("flags") or 0) & EPHEMERAL) | LOADING
            message = await self._create(handle, {"content": "", "flags": flags}, [])
            handle.original_message_id = int(message["id"])
        elif kind in (DEFERRED_UPDATE, UPDATE_MESSAGE):
            message = self._store.message(handle.channel_id, int(handle.payload["message"]["id"]))
            handle.original_message_id = int(message["id"])
            if kind == UPDATE_MESSAGE:
                await self._edit(message, data, files)
        if request.query.get("with_response", "").lower() not in ("1", "true"):
            return no_content()
        interaction: dict[str, Any] = {"id": str(handle.id), "type": handle.type}
        resource: dict[str, Any] = {"type": kind}
        if message is not None and kind in (CHANNEL_MESSAGE, DEFERRED_CHANNEL_MESSAGE, UPDATE_MESSAGE):
            interaction.update(
                response_message_id=message["id"],
                response_message_loading=kind == DEFERRED_CHANNEL_MESSAGE,
                response_message_ephemeral=_is_ephemeral(message),
            )
            resource["message"] = message
        return json_response({"interaction": interaction, "resource": resource})

    def _handle(self, request: web.Request) -> InteractionHandle:
        handle = self.by_token.get(request.match_info["token"])
        if handle is None or request.match_info["app"] != str(self._store.application_id):
            raise ApiError(404, 10015, "Unknown Webhook")
        return handle

    async def followup(self, request: web.Request) -> web.Response:
        handle = self._handle(request)
        if not handle.callbacks:
            raise ApiError(404, 10015, "Unknown Webhook")
        body: dict[str, Any] = body_of(request)
        files: list[UploadedFile] = files_of(request)
        original = handle.original()
        if handle.response_type == DEFERRED_CHANNEL_MESSAGE and original is not None and handle.is_loading():
            # The first followup after a defer replaces the "thinking" message and keeps its ephemerality.
            message = await self._edit(original, {k: v for k, v in body.items() if k != "flags"}, files)
        else:
            message = await self._create(handle, body, files)
            handle.followup_ids.append(int(message["id"]))
        if request.query.get("wait", "").lower() in ("1", "true"):
            return json_response(message)
        return no_content()

    def _webhook_message(self, request: web.Request) -> tuple[InteractionHandle, dict[str, Any]]:
        handle = self._handle(request)
        raw = request.match_info["mid"]
        message_id = handle.original_message_id if raw == "@original" else int(raw)
        if message_id is None or (message_id != handle.original_message_id and message_id not in handle.followup_ids):
            raise ApiError(404, 10008, "Unknown Message")
        return handle, self._store.message(handle.channel_id, message_id)

    async def get_message(self, request: web.Request) -> web.Response:
        return json_response(self._webhook_message(request)[1])

    async def edit_message(self, request: web.Request) -> web.Response:
        _, message = self._webhook_message(request)
        body = {k: v for k, v in body_of(request).items() if k != "flags"}
        return json_response(await self._edit(message, body, files_of(request)))

    async def delete_message(self, request: web.Request) -> web.Response:
        _, message = self._webhook_message(request)
        if _is_ephemeral(message):
            self._store.delete_message(message)
        else:
            await self._rest.remove_message(message)
        return no_content()

    async def _create(
        self, handle: InteractionHandle, body: dict[str, Any], files: list[UploadedFile]
    ) -> dict[str, Any]:
        store = self._store
        channel = store.channel(handle.channel_id)
        user = store.user(handle.user_id)
        owners = handle.payload.get("authorizing_integration_owners", {})
        extra = {
            "webhook_id": str(store.application_id),
            "application_id": str(store.application_id),
            "interaction_metadata": {
                "id": str(handle.id),
                "type": handle.type,
                "user": user.payload(),
                "authorizing_integration_owners": owners,
            },
        }
        kind = CHAT_INPUT_COMMAND if handle.type == APPLICATION_COMMAND else DEFAULT_MESSAGE
        message = store.create_message(channel, store.bot, body, files=files, message_type=kind, extra=extra)
        if not _is_ephemeral(message):
            await self._gateway.dispatch_message("MESSAGE_CREATE", message)
        return message

    async def _edit(self, message: dict[str, Any], body: dict[str, Any], files: list[UploadedFile]) -> dict[str, Any]:
        self._store.edit_message(message, body, files)
        message["flags"] = int(message["flags"]) & ~LOADING
        if not _is_ephemeral(message):
            await self._gateway.dispatch_message("MESSAGE_UPDATE", message)
        return message
