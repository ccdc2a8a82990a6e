"""Logging in to the console: a pasted token with ``relay:admin``, or a browser login at the
auth provider's issuer (OIDC: the authorization code flow with PKCE) when it offers one.
Either way the relay validates the token as it validates a client's, and the login becomes
a session cookie."""

from __future__ import annotations

import time
from collections.abc import Callable

from cloudbridge_core.errors import CloudBridgeError
from cloudbridge_core.httpd import Request, Response
from cloudbridge_core.log import get_logger
from cloudbridge_core.providers import BrowserLogin
from cloudbridge_core.relay.console.actions import ConsoleActions
from cloudbridge_core.relay.console.sessions import (
    LOGIN_COOKIE,
    ConsoleSessions,
    PendingLogins,
    login_cookie,
    session_cookie,
)
from cloudbridge_core.relay.console.web import SECURITY_HEADERS, redirect, text

log = get_logger("relay.console")

CALLBACK = "/console/login/oidc/callback"
#: renders a template with its values: (status, template, values) -> response
Render = Callable[..., Response]
#: the longest error text a provider's redirect may bring back (it reaches the page)
MAX_PROVIDER_ERROR = 200


class ConsoleLogins:
    def __init__(
        self,
        actions: ConsoleActions,
        sessions: ConsoleSessions,
        browser_login: BrowserLogin | None,
        render: Render,
    ) -> None:
        self._actions = actions
        self._sessions = sessions
        self._browser = browser_login
        self._pending = PendingLogins()
        self._render = render

    async def __call__(self, request: Request) -> Response:
        route = (request.method, request.path)
        if route == ("GET", "/console/login"):
            return self._page(200)
        if route == ("POST", "/console/login"):
            return await self._token(request)
        if route == ("GET", "/console/login/oidc") and self._browser is not None:
            return await self._begin(request, self._browser)
        if route == ("GET", CALLBACK) and self._browser is not None:
            return await self._come_back(request, self._browser)
        return text(404, "no such login")

    def _page(self, status: int, error: str | None = None) -> Response:
        return self._render(status, "login.html", error=error, oidc=self._browser is not None)

    async def _token(self, request: Request) -> Response:
        cookie = await self._open_session(request, request.form().get("token", "").strip())
        if isinstance(cookie, Response):
            return cookie
        return redirect("/console/", [("set-cookie", cookie)])

    async def _begin(self, request: Request, browser: BrowserLogin) -> Response:
        scheme = "https" if request.secure else "http"
        # the Host the browser used (checked against the allowed names before it got here)
        redirect_uri = f"{scheme}://{request.headers.get('host', '')}{CALLBACK}"
        state, pending = self._pending.begin(redirect_uri)
        try:
            url = await browser.authorization_url(redirect_uri, state, pending.code_verifier)
        except CloudBridgeError as error:
            log.warning("console_login_unavailable", code=error.code, reason=error.message)
            return self._page(503, error.message)
        return redirect(url, [("set-cookie", login_cookie(state, secure=request.secure))])

    async def _come_back(self, request: Request, browser: BrowserLogin) -> Response:
        forget = ("set-cookie", login_cookie("", secure=request.secure))
        state = request.query.get("state")
        pending = self._pending.finish(state, request.cookie(LOGIN_COOKIE))
        refused = request.query.get("error")
        if pending is None or refused or not request.query.get("code"):
            # the provider's words only for a login this browser began: a crafted link
            # must not put text of its choosing on the relay's page
            why = (
                f"the provider refused: {refused[:MAX_PROVIDER_ERROR]}"
                if pending is not None and refused
                else "this login was not begun here, or took too long: log in again"
            )
            page = self._page(400, why)
            page.headers.append(forget)
            return page
        try:
            token = await browser.exchange(
                request.query["code"], pending.redirect_uri, pending.code_verifier
            )
        except CloudBridgeError as error:
            log.info("console_login_refused", code=error.code)
            page = self._page(401, error.message)
            page.headers.append(forget)
            return page
        cookie = await self._open_session(request, token)
        if isinstance(cookie, Response):
            cookie.headers.append(forget)
            return cookie
        # a cross-site navigation (back from the provider) carries no SameSite=Strict cookie
        # even through a same-site redirect: a page of ours moves on to the console instead
        headers = [*SECURITY_HEADERS, ("set-cookie", cookie), forget]
        return Response(200, "text/html; charset=utf-8", MOVE_ON, headers)

    async def _open_session(self, request: Request, token: str) -> str | Response:
        """The session cookie of a login with ``token``, or the login page saying why not."""
        try:
            claims = await self._actions.admin(token)
        except CloudBridgeError as error:
            log.info("console_login_refused", code=error.code)
            return self._page(401, error.message)
        session_id, session = self._sessions.open(claims)
        log.info("console_login", tenant_id=claims.tenant_id, subject=claims.subject)
        return session_cookie(
            session_id, secure=request.secure, max_age=int(session.expires_at - time.time())
        )


MOVE_ON = (
    b'<!doctype html><html lang="en"><head><meta charset="utf-8">'
    b'<meta http-equiv="refresh" content="0; url=/console/"><title>Logged in</title></head>'
    b'<body><p>Logged in. <a href="/console/">Continue to the console</a>.</p></body></html>'
)
