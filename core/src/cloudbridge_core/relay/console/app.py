"""The console's requests: who is logged in, what each page and ``/api/v1/`` path answers,
and the changes (invites, revocations) behind CSRF checks."""

from __future__ import annotations

import json
import time
import urllib.parse
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import segno
from jinja2 import Environment, FileSystemLoader, select_autoescape
from markupsafe import Markup

from cloudbridge_core.durations import format_duration, parse_duration
from cloudbridge_core.errors import CloudBridgeError, ServerUnavailable
from cloudbridge_core.httpd import Request, Response
from cloudbridge_core.log import get_logger
from cloudbridge_core.providers import Claims
from cloudbridge_core.relay.cluster.store import INVITE_ID_LENGTH, Invite, Revocation
from cloudbridge_core.relay.console import data
from cloudbridge_core.relay.console.sessions import (
    ConsoleSession,
    ConsoleSessions,
    cookie_name,
    session_cookie,
)
from cloudbridge_core.relay.console.traffic import TrafficHistory
from cloudbridge_core.relay.invites import InviteLink, new_code
from cloudbridge_core.relay.server import Relay
from cloudbridge_core.relay.state import RelayState

log = get_logger("relay.console")

ADMIN = "relay:admin"
#: what an invite made in the console may grant (never relay:admin: an admin is made on
#: purpose, with ``relay token issue``)
INVITE_PERMISSIONS = ("relay:connect", "tunnel:create", "p2p:mesh")
MAX_INVITE_USES = 100
#: a revocation outlives every token it covers by this much (as ``relay token revoke``)
REVOCATION_MARGIN = 3600.0
HERE = Path(__file__).parent
STATIC = {
    "/console/static/console.css": ("text/css; charset=utf-8", "console.css"),
    "/console/static/console.js": ("text/javascript; charset=utf-8", "console.js"),
}
SECURITY_HEADERS = [
    (
        "content-security-policy",
        "default-src 'none'; style-src 'self'; script-src 'self'; img-src 'self';"
        " connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
    ),
    ("x-content-type-options", "nosniff"),
    ("referrer-policy", "same-origin"),  # no-referrer would make form posts send "Origin: null"
    ("cache-control", "no-store"),
]


class BadInput(ValueError):
    """A field of a form or JSON request that is wrong, named."""


@dataclass
class ConsoleContext:
    """What the console reads and changes: the relay, its state (CA, for invite URLs),
    where clients reach it, and the longest token it issues."""

    relay: Relay
    state: RelayState
    public_host: str
    tls_port: int
    max_token_ttl: float


Page = Callable[[Request, ConsoleSession, str], Awaitable[Response]]
UNAUTHORIZED = "log in, or send a bearer token with relay:admin"


class ConsoleApp:
    def __init__(self, context: ConsoleContext, session_ttl: float) -> None:
        self._context = context
        self._relay = context.relay
        self.sessions = ConsoleSessions(session_ttl)
        self.traffic = TrafficHistory(context.relay.mesh)
        self._templates = Environment(
            loader=FileSystemLoader(HERE / "templates"),
            autoescape=select_autoescape(default=True, default_for_string=True),
        )
        self._templates.filters["bytes"] = _bytes
        self._templates.filters["rtt"] = _rtt
        self._templates.filters["counts"] = data.counts

    async def __call__(self, request: Request) -> Response:
        path = request.path
        if path in STATIC:
            content_type, name = STATIC[path]
            return Response(200, content_type, (HERE / "static" / name).read_bytes())
        if path in ("/", "/console"):
            return _redirect("/console/")
        if path.startswith("/api/v1/"):
            return await self._api(request)
        if path == "/console/login":
            return await self._login(request)
        return await self._logged_in(request)

    async def _logged_in(self, request: Request) -> Response:
        session_id = request.cookie(cookie_name(request.secure))
        session = self._session(session_id)
        if session is None:
            if request.method == "GET":
                return _redirect("/console/login")
            return self._html(403, "login.html", None, error="log in first")
        if request.method == "POST" and not self._change_allowed(request, session):
            return _text(403, "refused: the form's CSRF token does not match this login")
        if (request.method, request.path) == ("POST", "/console/logout"):
            self.sessions.close(session_id)
            cookie = session_cookie("", secure=request.secure, max_age=0)
            return _redirect("/console/login", [("set-cookie", cookie)])
        page, rest = _route(self._pages, request)
        if page is None:
            return self._html(404, "missing.html", None, session=session, what="page")
        return await page(request, session, rest)

    # ---- login ----

    async def _login(self, request: Request) -> Response:
        if request.method == "GET":
            return self._html(200, "login.html", None)
        if request.method != "POST":
            return _text(405, "GET or POST")
        token = request.form().get("token", "").strip()
        try:
            claims = await self._admin(token)
        except CloudBridgeError as error:
            log.info("console_login_refused", code=error.code)
            return self._html(401, "login.html", None, error=error.message)
        session_id, session = self.sessions.open(claims)
        log.info("console_login", tenant_id=claims.tenant_id, subject=claims.subject)
        cookie = session_cookie(
            session_id, secure=request.secure, max_age=int(session.expires_at - time.time())
        )
        return _redirect("/console/", [("set-cookie", cookie)])

    async def _admin(self, token: str) -> Claims:
        """The claims of a valid, unrevoked, unexpired token with ``relay:admin``."""
        if not token:
            raise BadToken("paste a token with the relay:admin permission")
        claims = await self._relay.auth.validate(token)
        if claims.expires_at <= time.time():
            raise BadToken("the token has expired")
        self._relay.revocations.check(claims)
        if ADMIN not in claims.permissions:
            raise BadToken(f"the token lacks the {ADMIN} permission")
        return claims

    def _session(self, session_id: str | None) -> ConsoleSession | None:
        session = self.sessions.get(session_id)
        if session is not None and self._relay.revocations.covers(session.claims):
            self.sessions.close(session_id)  # its token was revoked: so is the login
            return None
        return session

    @staticmethod
    def _change_allowed(request: Request, session: ConsoleSession) -> bool:
        origin = request.headers.get("origin")
        if origin is not None and urllib.parse.urlsplit(origin).netloc != request.headers.get(
            "host"
        ):
            return False
        offered = request.headers.get("x-csrf-token") or request.form().get("csrf")
        return session.csrf_matches(offered)

    # ---- pages ----

    @property
    def _pages(self) -> dict[tuple[str, str], Page]:
        """(method, path) -> page; a path ending in "/" takes what follows as its argument."""
        return {
            ("GET", "/console/"): self._overview_page,
            ("GET", "/console/devices"): self._devices_page,
            ("GET", "/console/devices/"): self._device_page,
            ("GET", "/console/invites"): self._invites_page,
            ("POST", "/console/invites"): self._invites_page,
            ("POST", "/console/invites/"): self._revoke_invite_page,
            ("GET", "/console/tokens"): self._tokens_page,
            ("POST", "/console/tokens"): self._tokens_page,
        }

    async def _overview_page(self, _: Request, session: ConsoleSession, __: str) -> Response:
        devices, whole = await data.tenant_devices(self._relay, session.tenant_id)
        summary = await data.overview(self._relay, session.tenant_id, devices, self.traffic)
        return self._html(
            200,
            "overview.html",
            "overview",
            session=session,
            whole=whole,
            o=summary,
            chart=_chart(summary["traffic"]),
        )

    async def _devices_page(self, _: Request, session: ConsoleSession, __: str) -> Response:
        devices, whole = await data.tenant_devices(self._relay, session.tenant_id)
        picture = data.graph(devices, data.links(devices))
        return self._html(
            200,
            "devices.html",
            "devices",
            session=session,
            whole=whole,
            devices=devices,
            graph=picture,
        )

    async def _device_page(self, _: Request, session: ConsoleSession, peer_id: str) -> Response:
        devices, whole = await data.tenant_devices(self._relay, session.tenant_id)
        found = data.device_detail(devices, self._relay, session.tenant_id, peer_id)
        if found is None:
            return self._html(404, "missing.html", "devices", session=session, what="device")
        return self._html(200, "device.html", "devices", session=session, whole=whole, d=found)

    async def _invites_page(self, request: Request, session: ConsoleSession, _: str) -> Response:
        created, error, status = None, None, 200
        if request.method == "POST":
            try:
                created = await self._create_invite(session.tenant_id, request.form())
            except BadInput as problem:
                error, status = str(problem), 400
        rows = data.invite_rows(await self._relay.cluster.list_invites(session.tenant_id))
        return self._html(
            status,
            "invites.html",
            "invites",
            session=session,
            invites=rows,
            created=created,
            error=error,
        )

    async def _revoke_invite_page(
        self, _: Request, session: ConsoleSession, action: str
    ) -> Response:
        invite_id, _slash, verb = action.partition("/")
        if verb != "revoke":
            return self._html(404, "missing.html", "invites", session=session, what="page")
        await self._revoke_invite(session.tenant_id, invite_id)
        return _redirect("/console/invites")

    async def _tokens_page(self, request: Request, session: ConsoleSession, _: str) -> Response:
        error, status, done = None, 200, None
        if request.method == "POST":
            try:
                done = await self._revoke_token(session.tenant_id, request.form())
            except BadInput as problem:
                error, status = str(problem), 400
        listed = data.tokens(self._relay, session.tenant_id)
        return self._html(
            status, "tokens.html", "tokens", session=session, t=listed, error=error, done=done
        )

    # ---- changes ----

    async def _create_invite(self, tenant_id: str, form: dict[str, Any]) -> dict[str, Any]:
        ttl = _field_duration(form, "ttl", self._context.max_token_ttl)
        uses = _field_uses(form)
        asked = form.get("permissions")
        granted = list(asked) if isinstance(asked, list) else list(INVITE_PERMISSIONS)
        unknown = [p for p in granted if p not in INVITE_PERMISSIONS]
        if unknown or not granted:
            raise BadInput(f"permissions: choose among {', '.join(INVITE_PERMISSIONS)}")
        code, key = new_code()
        invite = Invite(tenant_id, granted, time.time() + ttl, uses)
        await self._relay.cluster.add_invite(key, invite)
        link = InviteLink(
            self._context.public_host,
            self._context.tls_port,
            code,
            self._context.state.ca.certificate,
        )
        url = link.url()
        log.info("console_invite_created", tenant_id=tenant_id, uses=uses, ttl=format_duration(ttl))
        return {
            "url": url,
            "invite_id": key[:INVITE_ID_LENGTH],
            "expires_at": data.utc(invite.expires_at),
            "uses_left": uses,
            "permissions": granted,
            "qr_svg": _qr_code(url),
        }

    async def _revoke_invite(self, tenant_id: str, invite_id: str) -> bool:
        revoked = await self._relay.cluster.revoke_invite(tenant_id, invite_id)
        log.info("console_invite_revoked", tenant_id=tenant_id, found=revoked)
        return revoked

    async def _revoke_token(self, tenant_id: str, form: dict[str, Any]) -> str:
        subject = str(form.get("subject") or "").strip() or None
        token_id = str(form.get("token_id") or "").strip() or None
        if (subject is None) == (token_id is None):
            raise BadInput("give a subject or a token id (one of them)")
        for name, value in (("subject", subject), ("token_id", token_id)):
            if value is not None and len(value) > 256:
                raise BadInput(f"{name}: at most 256 characters")
        now = time.time()
        revocation = Revocation(
            tenant_id,
            now,
            now + self._context.max_token_ttl + REVOCATION_MARGIN,
            token_id=token_id,
            subject=subject,
        )
        await self._relay.cluster.revoke(revocation)
        await self._relay.on_revoked(revocation)  # this relay at once, whatever the backend
        log.info("console_token_revoked", tenant_id=tenant_id)
        return f"token {token_id}" if token_id else f"every token of {subject} issued so far"

    # ---- JSON ----

    async def _api(self, request: Request) -> Response:
        session = await self._api_session(request)
        if isinstance(session, Response):
            return session
        call, rest = _route(self._calls, request, prefix="/api/v1")
        if call is None:
            message = f"no {request.method} {request.path}"
            return _json(404, {"error": "not_found", "message": message})
        try:
            return await call(request, session, rest)
        except BadInput as problem:
            return _json(400, {"error": "bad_request", "message": str(problem)})
        except ServerUnavailable as error:
            return _json(503, {"error": error.code, "message": error.message})

    async def _api_session(self, request: Request) -> ConsoleSession | Response:
        """Who calls: a bearer token with ``relay:admin`` (each call), or the console's login
        cookie, whose changes carry its CSRF token in ``X-CSRF-Token``."""
        bearer = request.headers.get("authorization", "")
        if bearer.lower().startswith("bearer "):
            try:
                claims = await self._admin(bearer[7:].strip())
            except CloudBridgeError as error:
                return _json(401, {"error": error.code, "message": error.message})
            return ConsoleSession(claims, "", claims.expires_at)
        session = self._session(request.cookie(cookie_name(request.secure)))
        if session is None:
            return _json(401, {"error": "unauthorized", "message": UNAUTHORIZED})
        if request.method != "GET" and not self._change_allowed(request, session):
            return _json(403, {"error": "csrf", "message": "X-CSRF-Token does not match"})
        return session

    @property
    def _calls(self) -> dict[tuple[str, str], Page]:
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
        summary = await data.overview(self._relay, session.tenant_id, devices, self.traffic)
        return _json(200, summary)

    async def _devices_json(self, _: Request, session: ConsoleSession, __: str) -> Response:
        devices, whole = await data.tenant_devices(self._relay, session.tenant_id)
        return _json(
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
            return _json(404, {"error": "not_found", "message": "no such device in the tenant"})
        return _json(200, found)

    async def _invites_json(self, _: Request, session: ConsoleSession, __: str) -> Response:
        rows = data.invite_rows(await self._relay.cluster.list_invites(session.tenant_id))
        return _json(200, {"tenant_id": session.tenant_id, "invites": rows})

    async def _create_invite_json(
        self, request: Request, session: ConsoleSession, _: str
    ) -> Response:
        created = await self._create_invite(session.tenant_id, _json_body(request))
        del created["qr_svg"]
        return _json(201, created)

    async def _revoke_invite_json(
        self, _: Request, session: ConsoleSession, invite_id: str
    ) -> Response:
        if not await self._revoke_invite(session.tenant_id, invite_id):
            message = f"no open invite {invite_id[:32]!r} in the tenant"
            return _json(404, {"error": "not_found", "message": message})
        return _json(200, {"revoked": True, "invite_id": invite_id})

    async def _tokens_json(self, _: Request, session: ConsoleSession, __: str) -> Response:
        return _json(
            200, {"tenant_id": session.tenant_id, **data.tokens(self._relay, session.tenant_id)}
        )

    async def _revoke_token_json(
        self, request: Request, session: ConsoleSession, _: str
    ) -> Response:
        what = await self._revoke_token(session.tenant_id, _json_body(request))
        return _json(200, {"revoked": what})

    # ---- rendering ----

    def _html(self, status: int, template: str, current: str | None, **values: Any) -> Response:
        page = self._templates.get_template(template)
        body = page.render(current=current, now=data.now_utc(), **values)
        return Response(status, "text/html; charset=utf-8", body.encode(), list(SECURITY_HEADERS))


def _route(
    table: dict[tuple[str, str], Page], request: Request, prefix: str = ""
) -> tuple[Page | None, str]:
    """The handler of ``request`` in ``table``, and the rest of a path routed by its start
    (``/console/devices/ID`` -> ``ID``)."""
    path = request.path.removeprefix(prefix)
    exact = table.get((request.method, path))
    if exact is not None:
        return exact, ""
    head, slash, rest = path.rpartition("/") if path.count("/") > 1 else ("", "", "")
    while head:
        found = table.get((request.method, f"{head}{slash}"))
        if found is not None and rest:
            return found, rest
        head, slash, tail = head.rpartition("/")
        rest = f"{tail}/{rest}"
    return None, ""


class BadToken(CloudBridgeError):
    code = "invalid_token"


def _field_duration(form: dict[str, Any], name: str, maximum: float) -> float:
    value = str(form.get(name) or "24h").strip()
    try:
        seconds = parse_duration(value)
    except ValueError:
        raise BadInput(f"{name}: {value!r} is not a duration (30m, 24h, 7d)") from None
    if not 0 < seconds <= maximum:
        raise BadInput(f"{name}: between 1s and {format_duration(maximum)} (server.max_token_ttl)")
    return seconds


def _field_uses(form: dict[str, Any]) -> int:
    value = form.get("uses", 1)
    try:
        uses = int(value)
    except (TypeError, ValueError):
        raise BadInput(f"uses: {str(value)[:32]!r} is not a whole number") from None
    if not 1 <= uses <= MAX_INVITE_USES:
        raise BadInput(f"uses: from 1 to {MAX_INVITE_USES}")
    return uses


def _json_body(request: Request) -> dict[str, Any]:
    try:
        body = json.loads(request.body or b"{}")
    except ValueError:
        raise BadInput("the body is not JSON") from None
    if not isinstance(body, dict):
        raise BadInput("the body is not a JSON object")
    return body


def _chart(traffic: list[dict[str, Any]]) -> dict[str, Any]:
    """Bars of the last hour's traffic in SVG units (600 x 120)."""
    peak = max((t["bytes_per_second"] for t in traffic), default=0.0)
    width = 600 / max(len(traffic), 1)
    bars = [
        {
            "x": round(i * width, 1),
            "width": max(round(width - 1, 1), 1),
            "height": round(110 * t["bytes_per_second"] / peak, 1) if peak else 0,
            "label": f"{data.utc(t['at'])}: {_bytes(t['bytes_per_second'])}/s",
        }
        for i, t in enumerate(traffic)
    ]
    return {"bars": bars, "peak": peak}


def _qr_code(url: str) -> Markup:
    """``url`` as an inline SVG QR code (segno writes the SVG; the URL is ours, and
    segno escapes the title)."""
    svg = segno.make(url, error="l").svg_inline(scale=3, title="invite QR code")
    return Markup(svg)  # noqa: S704 - segno's markup, not user input


def _bytes(value: float | None) -> str:
    if value is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(value) < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} GiB"


def _rtt(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1000:.1f} ms"


def _redirect(location: str, headers: list[tuple[str, str]] | None = None) -> Response:
    return Response(
        303, "text/plain; charset=utf-8", b"", [("location", location), *(headers or [])]
    )


def _text(status: int, text: str) -> Response:
    return Response(
        status, "text/plain; charset=utf-8", f"{text}\n".encode(), list(SECURITY_HEADERS)
    )


def _json(status: int, body: dict[str, Any]) -> Response:
    return Response(status, "application/json", json.dumps(body).encode(), list(SECURITY_HEADERS))
