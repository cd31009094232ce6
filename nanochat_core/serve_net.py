"""
The chat server's edge towards the network: what a server needs before it can face one.

  Gate            an ASGI middleware in front of the app: Host check (loopback servers), API key
                  (`Authorization: Bearer`), JSON content type, body size and body read timeout.
  GuardedH11      uvicorn's h11 protocol plus a header timeout and a hard cap on open connections.
  Server          uvicorn's server plus a bounded drain on SIGTERM.
  make_server     the uvicorn server with all of the above; run_server and the tests use the same one.

Why each exists:
  - Host: a web page the user visits can make the browser POST to http://127.0.0.1:8000, and with DNS
    rebinding (evil.example resolving to 127.0.0.1) even read the answer. The browser then sends
    `Host: evil.example`, so a loopback server only answers requests addressed to a loopback name.
  - JSON only: text/plain, form and multipart bodies are "simple" requests a page may send cross-origin
    without a CORS preflight; application/json needs one, which this server never grants.
  - Timeouts: uvicorn only times out a connection that is idle *after* a response. One that never sends
    a request (or dribbles its headers, or its body) was held forever; thousands of them exhausted the
    process's file descriptors.
  - Drain: uvicorn waits without limit for requests in flight when told to stop, and a reply can take
    minutes; the port is released at once, so the process lingered, generating for nobody.
"""
import asyncio
import hmac
import ipaddress
import json
from dataclasses import dataclass

import h11
import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1", "[::1]")


@dataclass
class Limits:
    header_timeout: float = 10.0     # connection opened (or first byte of a next request) -> headers complete
    body_timeout: float = 30.0       # headers -> body complete
    keep_alive: float = 5.0          # idle between requests on one connection (uvicorn's timeout_keep_alive)
    max_connections: int = 512       # beyond this, new connections are closed at once
    max_header_bytes: int = 16384    # h11 refuses longer request heads with a 400
    max_body_bytes: int = 1 << 20
    drain: float = 5.0               # on SIGTERM: replies in flight get this long, then end with an error


def is_loopback(host: str) -> bool:
    if host in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False   # a host name other than localhost may resolve to anything


def _host_is_loopback(header: bytes) -> bool:
    host = header.decode("latin-1").strip().lower()
    if host.startswith("["):                      # [::1]:8000
        host = host[:host.find("]") + 1]
    elif host.count(":") == 1:                    # 127.0.0.1:8000
        host = host.split(":")[0]
    return is_loopback(host)


def _error(status: int, message: str, code: str, type: str = "invalid_request_error", extra_headers=()) -> tuple:
    body = json.dumps({"error": {"message": message, "type": type, "param": None, "code": code}}).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()), *extra_headers]
    return status, headers, body


class Gate:
    """Checks a request before the app sees it; answers refusals in OpenAI's error shape."""

    def __init__(self, app, api_key: str | None = None, check_host: bool = True, limits: Limits | None = None):
        self.app, self.api_key, self.check_host = app, api_key, check_host
        self.limits = limits or Limits()

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope["headers"])    # uvicorn gives lower-case names
        refusal = self._refuse(scope, headers)
        body = b""
        if refusal is None and scope["method"] in ("POST", "PUT", "PATCH"):
            body, refusal = await self._read_body(receive, headers)
            if body is None:                # the client left while sending
                return
        if refusal is not None:
            status, hdrs, payload = refusal
            await send({"type": "http.response.start", "status": status, "headers": hdrs})
            await send({"type": "http.response.body", "body": payload})
            return
        replayed = False

        async def replay():   # the body we read, then whatever comes next (a disconnect, for the app to see)
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    def _refuse(self, scope, headers: dict) -> tuple | None:
        host = headers.get(b"host")
        if self.check_host and host is not None and not _host_is_loopback(host):
            return _error(400, f"Host {host.decode('latin-1')[:60]!r} is not this server: it only answers requests "
                          "addressed to localhost (protection against DNS rebinding)", "invalid_host")
        if self.api_key and scope["path"].startswith("/v1/"):
            auth = headers.get(b"authorization", b"").decode("latin-1")
            scheme, _, token = auth.partition(" ")
            if scheme.lower() != "bearer" or not token.strip():
                return _error(401, "missing API key: send the header `Authorization: Bearer <key>` (the key given "
                              "to `nanochat serve --api-key` or NANOCHAT_API_KEY)", "invalid_api_key",
                              extra_headers=[(b"www-authenticate", b"Bearer")])
            if not hmac.compare_digest(token.strip().encode(), self.api_key.encode()):
                return _error(401, "incorrect API key provided", "invalid_api_key",
                              extra_headers=[(b"www-authenticate", b"Bearer")])
        if scope["method"] in ("POST", "PUT", "PATCH"):
            ctype = headers.get(b"content-type", b"").decode("latin-1").split(";")[0].strip().lower()
            if ctype != "application/json":
                return _error(415, f"the body must be JSON sent with `Content-Type: application/json` (got "
                              f"{ctype or 'no content type'!r})", "unsupported_media_type")
            length = headers.get(b"content-length", b"0")
            if length.isdigit() and int(length) > self.limits.max_body_bytes:
                return _error(413, f"request body larger than {self.limits.max_body_bytes} bytes", "body_too_large")
        return None

    async def _read_body(self, receive, headers: dict) -> tuple:
        """(body, None), (b"", refusal) or (None, None) when the client disconnected."""
        chunks, size = [], 0
        try:
            async with asyncio.timeout(self.limits.body_timeout):
                while True:
                    msg = await receive()
                    if msg["type"] == "http.disconnect":
                        return None, None
                    chunk = msg.get("body", b"")
                    size += len(chunk)
                    if size > self.limits.max_body_bytes:
                        return b"", _error(413, f"request body larger than {self.limits.max_body_bytes} bytes",
                                           "body_too_large", extra_headers=[(b"connection", b"close")])
                    chunks.append(chunk)
                    if not msg.get("more_body", False):
                        return b"".join(chunks), None
        except TimeoutError:
            return b"", _error(408, f"the request body did not arrive within {self.limits.body_timeout:g} s",
                               "request_timeout", extra_headers=[(b"connection", b"close")])


class GuardedH11(H11Protocol):
    """uvicorn's h11 protocol with a deadline for the request head and a cap on open connections.
    The head deadline runs while h11 waits for a request line and headers (their_state IDLE) once the
    connection is open or the first byte of a next request has arrived; between requests uvicorn's own
    keep-alive timeout applies."""

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        self._head_timer = None
        limits: Limits = self.config.nanochat_limits
        if len(self.connections) > limits.max_connections:
            transport.abort()   # refused before anything is read: the descriptor is freed at once
            return
        self._arm()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        self._arm()

    def connection_lost(self, exc) -> None:
        self._disarm()
        super().connection_lost(exc)

    def _arm(self) -> None:
        if self.conn.their_state is not h11.IDLE or self.transport.is_closing():
            self._disarm()
        elif self._head_timer is None:
            self._head_timer = self.loop.call_later(self.config.nanochat_limits.header_timeout, self._head_timeout)

    def _disarm(self) -> None:
        if getattr(self, "_head_timer", None) is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_timeout(self) -> None:
        self._head_timer = None
        if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
            self.transport.close()


class Server(uvicorn.Server):
    """On SIGTERM (or should_exit): stop accepting, let replies in flight run for `drain` seconds, then
    end them with an error (the pool's abort) so every connection closes and the process exits."""

    async def shutdown(self, sockets=None) -> None:
        pool = getattr(getattr(self.config.app, "state", None), "pool", None)
        if pool is not None:
            asyncio.get_running_loop().call_later(self.config.nanochat_limits.drain, pool.abort,
                                                  "the server is shutting down: retry shortly")
        await super().shutdown(sockets)


def make_server(app, host: str = "127.0.0.1", port: int = 8000, limits: Limits | None = None,
                log_level: str = "warning") -> Server:
    limits = limits or getattr(getattr(app, "state", None), "limits", None) or Limits()
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level, ws="none", http=GuardedH11,
                            lifespan="on", timeout_keep_alive=limits.keep_alive,
                            limit_concurrency=limits.max_connections, h11_max_incomplete_event_size=limits.max_header_bytes,
                            timeout_graceful_shutdown=int(limits.drain + 3))   # a backstop behind the pool's abort
    config.nanochat_limits = limits
    return Server(config)
