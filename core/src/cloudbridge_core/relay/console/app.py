"""The console's pages: logging in and out, what each page shows, and the forms behind
CSRF checks; ``/api/v1/`` goes to :class:`ConsoleApi`."""

from __future__ import annotations

import urllib.parse
from pathlib import Path
from typing import Any

import segno
from jinja2 import Environment, FileSystemLoader, select_autoescape
from markupsafe import Markup

from cloudbridge_core.errors import ServerUnavailable
from cloudbridge_core.httpd import Request, Response
from cloudbridge_core.log import get_logger
from cloudbridge_core.relay.console import data
from cloudbridge_core.relay.console.actions import BadInput, ConsoleActions, ConsoleContext
from cloudbridge_core.relay.console.api import ConsoleApi
from cloudbridge_core.relay.console.login import ConsoleLogins
from cloudbridge_core.relay.console.sessions import (
    ConsoleSession,
    ConsoleSessions,
    cookie_name,
    session_cookie,
)
from cloudbridge_core.relay.console.traffic import TrafficHistory
from cloudbridge_core.relay.console.web import (
    SECURITY_HEADERS,
    Handler,
    redirect,
    route,
    text,
)

log = get_logger("relay.console")

HERE = Path(__file__).parent
STATIC = {
    "/console/static/console.css": ("text/css; charset=utf-8", "console.css"),
    "/console/static/console.js": ("text/javascript; charset=utf-8", "console.js"),
}


class ConsoleApp:
    def __init__(self, context: ConsoleContext, session_ttl: float) -> None:
        self._relay = context.relay
        self._actions = ConsoleActions(context)
        self._sessions = ConsoleSessions(session_ttl)
        self.traffic = TrafficHistory(context.relay.mesh)
        self._api = ConsoleApi(
            self._relay, self._actions, self.traffic, self._login_of, self._change_allowed
        )
        self._templates = Environment(
            loader=FileSystemLoader(HERE / "templates"),
            autoescape=select_autoescape(default=True, default_for_string=True),
        )
        self._templates.filters["bytes"] = _bytes
        self._templates.filters["rtt"] = _rtt
        self._templates.filters["counts"] = data.counts
        self._pages = self._page_routes()
        self._logins = ConsoleLogins(
            self._actions,
            self._sessions,
            context.browser_login,
            lambda status, template, **values: self._html(status, template, None, **values),
        )

    async def __call__(self, request: Request) -> Response:
        path = request.path
        if path in STATIC:
            content_type, name = STATIC[path]
            return Response(200, content_type, (HERE / "static" / name).read_bytes())
        if path in ("/", "/console"):
            return redirect("/console/")
        if path.startswith("/api/v1/"):
            return await self._api(request)
        if path == "/console/login" or path.startswith("/console/login/"):
            return await self._logins(request)
        try:
            return await self._logged_in(request)
        except ServerUnavailable as error:  # the cluster's store, for a page that needs it
            return text(503, f"unavailable: {error.message}")

    async def _logged_in(self, request: Request) -> Response:
        session_id = request.cookie(cookie_name(request.secure))
        session = self._session(session_id)
        if session is None:
            if request.method == "GET":
                return redirect("/console/login")
            return self._html(403, "login.html", None, error="log in first")
        if request.method == "POST" and not self._change_allowed(request, session):
            return text(403, "refused: the form's CSRF token does not match this login")
        if (request.method, request.path) == ("POST", "/console/logout"):
            self._sessions.close(session_id)
            cookie = session_cookie("", secure=request.secure, max_age=0)
            return redirect("/console/login", [("set-cookie", cookie)])
        page, rest = route(self._pages, request)
        if page is None:
            return self._html(404, "missing.html", None, session=session, what="page")
        return await page(request, session, rest)

    # ---- login ----

    def _login_of(self, request: Request) -> ConsoleSession | None:
        return self._session(request.cookie(cookie_name(request.secure)))

    def _session(self, session_id: str | None) -> ConsoleSession | None:
        session = self._sessions.get(session_id)
        if session is not None and self._relay.revocations.covers(session.claims):
            self._sessions.close(session_id)  # its token was revoked: so is the login
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

    def _page_routes(self) -> dict[tuple[str, str], Handler]:
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
                created = await self._actions.create_invite(session.tenant_id, request.form())
                created["qr_svg"] = _qr_code(created["url"])
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
        await self._actions.revoke_invite(session.tenant_id, invite_id)
        return redirect("/console/invites")

    async def _tokens_page(self, request: Request, session: ConsoleSession, _: str) -> Response:
        error, status, done = None, 200, None
        if request.method == "POST":
            try:
                done = await self._actions.revoke_token(session.tenant_id, request.form())
            except BadInput as problem:
                error, status = str(problem), 400
        listed = data.tokens(self._relay, session.tenant_id)
        return self._html(
            status, "tokens.html", "tokens", session=session, t=listed, error=error, done=done
        )

    # ---- rendering ----

    def _html(self, status: int, template: str, current: str | None, **values: Any) -> Response:
        page = self._templates.get_template(template)
        body = page.render(current=current, now=data.now_utc(), **values)
        return Response(status, "text/html; charset=utf-8", body.encode(), list(SECURITY_HEADERS))


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


def _qr_code(url: str) -> Markup:
    """``url`` as an inline SVG QR code (segno writes the SVG; the URL is ours, and
    segno escapes the title)."""
    svg = segno.make(url, error="l").svg_inline(scale=3, title="invite QR code")
    return Markup(svg)  # noqa: S704 - segno's markup, not user input
