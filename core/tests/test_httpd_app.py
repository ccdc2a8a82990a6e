"""The local HTTP server's ``app``: what reaches it (method, path, query, headers, body) and
what never does (a body over the limit, a foreign ``Host``), over real sockets on loopback."""

from __future__ import annotations

import asyncio

import pytest
from cloudbridge_core.httpd import MAX_BODY_BYTES, LocalHttpServer, Request, Response

pytestmark = pytest.mark.timeout(30)


async def exchange(port: int, raw: bytes) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(raw)
    await writer.drain()
    answer = await reader.read()
    writer.close()
    return answer


def serve_and_ask(*requests: bytes) -> tuple[list[bytes], list[Request]]:
    seen: list[Request] = []

    async def app(request: Request) -> Response:
        seen.append(request)
        return Response(200, "text/plain", b"app", [("x-app", "yes")])

    async def main() -> list[bytes]:
        server = LocalHttpServer({"/metrics": lambda: (200, "text/plain", b"m")}, app=app)
        base = await server.start("127.0.0.1", 0)
        port = int(base.rsplit(":", 1)[1])
        try:
            return [await exchange(port, raw) for raw in requests]
        finally:
            await server.aclose()

    return asyncio.run(main()), seen


def test_the_app_gets_what_the_routes_do_not_with_its_body_and_headers() -> None:
    body = b"token=abc&csrf=x"
    answers, seen = serve_and_ask(
        b"POST /console/login?next=%2F HTTP/1.1\r\nHost: localhost\r\nCookie: a=1; b=2\r\n"
        b"Content-Type: application/x-www-form-urlencoded\r\n"
        + f"Content-Length: {len(body)}\r\n\r\n".encode()
        + body,
        b"GET /metrics HTTP/1.1\r\nHost: localhost\r\n\r\n",
    )
    assert answers[0].startswith(b"HTTP/1.1 200")
    assert b"x-app: yes" in answers[0]
    assert answers[1].endswith(b"m")  # a route, not the app
    (request,) = seen
    assert (request.method, request.path, request.query) == (
        "POST",
        "/console/login",
        {"next": "/"},
    )
    assert request.form() == {"token": "abc", "csrf": "x"}
    assert (request.cookie("b"), request.cookie("c")) == ("2", None)
    assert not request.secure


def test_a_large_body_or_a_foreign_host_never_reaches_the_app() -> None:
    too_large = MAX_BODY_BYTES + 1
    answers, seen = serve_and_ask(
        b"POST /x HTTP/1.1\r\nHost: localhost\r\n"
        + f"Content-Length: {too_large}\r\n\r\n".encode(),
        b"GET /x HTTP/1.1\r\nHost: attacker.example\r\n\r\n",
        b"GET /x?"
        + b"&".join(b"f%d=1" % n for n in range(40))
        + b" HTTP/1.1\r\nHost: localhost\r\n\r\n",
    )
    assert answers[0].startswith(b"HTTP/1.1 413")
    assert answers[1].startswith(b"HTTP/1.1 421")
    assert answers[2].startswith(b"HTTP/1.1 400")
    assert seen == []
