"""``/api/v1/``: the console's data as JSON (``schemas/console/``), for a bearer token with
``relay:admin`` or the console's login (its changes carry ``X-CSRF-Token``)."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from cloudbridge_core.errors import CloudBridgeError, ServerUnavailable
from cloudbridge_core.httpd import Request, Response
from cloudbridge_core.relay.console import data
from cloudbridge_core.relay.console.actions import BadInput, ConsoleActions
from cloudbridge_core.relay.console.sessions import ConsoleSession
from cloudbridge_core.relay.console.traffic import TrafficHistory
from cloudbridge_core.relay.console.web import Handler, json_response, route
from cloudbridge_core.relay.server import Relay

UNAUTHORIZED = "log in, or send a bearer token with relay:admin"
#: the login a cookie holds, if any, and whether a change it asks for may go ahead (CSRF)
LoginOf = Callable[[Request], ConsoleSession | None]
ChangeAllowed = Callable[[Request, ConsoleSession], bool]


class ConsoleApi:
    def __init__(
        self,
        relay: Relay,
        actions: ConsoleActions,
        traffic: TrafficHistory,
        login_of: LoginOf,
        change_allowed: ChangeAllowed,
    ) -> None:
        self._relay = relay
        self._actions = actions
        self._traffic = traffic
        self._login_of = login_of
        self._change_allowed = change_allowed
        self._calls = self._routes()

    async def __call__(self, request: Request) -> Response:
        session = await self._api_session(request)
        if isinstance(session, Response):
            return session
        call, rest = route(self._calls, request, prefix="/api/v1")
        if call is None:
            message = f"no {request.method} {request.path}"
            return json_response(404, {"error": "not_found", "message": message})
        try:
            return await call(request, session, rest)
        except BadInput as problem:
            return json_response(400, {"error": "bad_request", "message": str(problem)})
        except ServerUnavailable as error:
            return json_response(503, {"error": error.code, "message": error.message})

    async def _api_session(self, request: Request) -> ConsoleSession | Response:
        """Who calls: a bearer token with ``relay:admin`` (each call), or the console's login
        cookie, whose changes carry its CSRF token in ``X-CSRF-Token``."""
        bearer = request.headers.get("authorization", "")
        if bearer.lower().startswith("bearer "):
            try:
                claims = await self._actions.admin(bearer[7:].strip())
            except CloudBridgeError as error:
                return json_response(401, {"error": error.code, "message": error.message})
            return ConsoleSession(claims, "", claims.expires_at)
        session = self._login_of(request)
        if session is None:
            return json_response(401, {"error": "unauthorized", "message": UNAUTHORIZED})
        if request.method != "GET" and not self._change_allowed(request, session):
            return json_response(403, {"error": "csrf", "message": "X-CSRF-Token does not match"})
        return session

    def _routes(self) -> dict[tuple[str, str], Handler]:
        return {
            ("GET", "/overview"): self._overview_json,
            ("GET", "/devices"): self._devices_json,
            ("GET", "/devices/"): self._device_json,
            ("GET", "/invites"): self._invites_json,
            ("POST", "/invites"): self._create_invite_json,
            ("DELETE", "/invites/"): self._revoke_invite_json,
            ("GET", "/tokens"): self._tokens_json,
            ("POST", "/tokens/revoke"): self._revoke_token_json,
        }

    async def _overview_json(self, _: Request, session: ConsoleSession, __: str) -> Response:
        devices, _whole = await data.tenant_devices(self._relay, session.tenant_id)
        summary = await data.overview(self._relay, session.tenant_id, devices, self._traffic)
        return json_response(200, summary)

    async def _devices_json(self, _: Request, session: ConsoleSession, __: str) -> Response:
        devices, whole = await data.tenant_devices(self._relay, session.tenant_id)
        return json_response(
            200,
            {
                "tenant_id": session.tenant_id,
                "complete": whole,
                "devices": devices,
                "links": data.links(devices),
            },
        )

    async def _device_json(self, _: Request, session: ConsoleSession, peer_id: str) -> Response:
        devices, _whole = await data.tenant_devices(self._relay, session.tenant_id)
        found = data.device_detail(devices, self._relay, session.tenant_id, peer_id)
        if found is None:
            return json_response(
                404, {"error": "not_found", "message": "no such device in the tenant"}
            )
        return json_response(200, found)

    async def _invites_json(self, _: Request, session: ConsoleSession, __: str) -> Response:
        rows = data.invite_rows(await self._relay.cluster.list_invites(session.tenant_id))
        return json_response(200, {"tenant_id": session.tenant_id, "invites": rows})

    async def _create_invite_json(
        self, request: Request, session: ConsoleSession, _: str
    ) -> Response:
        created = await self._actions.create_invite(session.tenant_id, _json_body(request))
        return json_response(201, created)

    async def _revoke_invite_json(
        self, _: Request, session: ConsoleSession, invite_id: str
    ) -> Response:
        if not await self._actions.revoke_invite(session.tenant_id, invite_id):
            message = f"no open invite {invite_id[:32]!r} in the tenant"
            return json_response(404, {"error": "not_found", "message": message})
        return json_response(200, {"revoked": True, "invite_id": invite_id})

    async def _tokens_json(self, _: Request, session: ConsoleSession, __: str) -> Response:
        return json_response(
            200, {"tenant_id": session.tenant_id, **data.tokens(self._relay, session.tenant_id)}
        )

    async def _revoke_token_json(
        self, request: Request, session: ConsoleSession, _: str
    ) -> Response:
        what = await self._actions.revoke_token(session.tenant_id, _json_body(request))
        return json_response(200, {"revoked": what})


def _json_body(request: Request) -> dict[str, Any]:
    try:
        body = json.loads(request.body or b"{}")
    except ValueError:
        raise BadInput("the body is not JSON") from None
    if not isinstance(body, dict):
        raise BadInput("the body is not a JSON object")
    return body
