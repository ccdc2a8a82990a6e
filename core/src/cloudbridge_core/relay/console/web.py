"""What every console answer shares: security headers, JSON, redirects, and routing a
request to its handler by method and path."""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from typing import Any

from cloudbridge_core.httpd import Request, Response
from cloudbridge_core.relay.console.sessions import ConsoleSession

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

#: a page or API call: the request, the login, and what follows a path routed by its start
Handler = Callable[[Request, ConsoleSession, str], Awaitable[Response]]


def route(
    table: dict[tuple[str, str], Handler], request: Request, prefix: str = ""
) -> tuple[Handler | None, str]:
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


def redirect(location: str, headers: list[tuple[str, str]] | None = None) -> Response:
    return Response(
        303, "text/plain; charset=utf-8", b"", [("location", location), *(headers or [])]
    )


def text(status: int, text: str) -> Response:
    return Response(
        status, "text/plain; charset=utf-8", f"{text}\n".encode(), list(SECURITY_HEADERS)
    )


def json_response(status: int, body: dict[str, Any]) -> Response:
    return Response(status, "application/json", json.dumps(body).encode(), list(SECURITY_HEADERS))
