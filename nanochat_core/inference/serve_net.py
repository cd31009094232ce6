"""
The chat server's edge towards the network: what a server needs before it can face one.

  Gate            an ASGI middleware in front of the app: Host check (loopback servers), API key
                  (`Authorization: Bearer`), JSON content type, body size and body read timeout.
  GuardedH11      uvicorn's h11 protocol plus a header timeout and caps on open connections (all, and per
                  client address) that evict idle connections rather than refuse new ones.
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
  - Caps that degrade: a fixed cap that resets new connections lets ~520 idle sockets (no key needed, reopened
    under the header timeout) lock everyone out. So at a cap the connection that has been idle longest (no
    request in progress: never sent one, a head still dribbling in, or kept alive after a reply) is closed
    to make room, from the client holding the most connections first; a legitimate client sends its
    request at once, so it is busy, never the idlest. Past half the cap, new connections get a shorter
    head deadline. Only when every connection has a request in progress does a new one wait (its reading
    paused, in a bounded queue) for a slot; beyond that queue it is reset.
  - Drain: uvicorn waits without limit for requests in flight when told to stop, and a reply can take
    minutes; the port is released at once, so the process lingered, generating for nobody.
"""
import asyncio
import hmac
import ipaddress
import json
import re
from collections import Counter
from dataclasses import dataclass, field

import h11
import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1", "[::1]")


@dataclass
class Limits:
    header_timeout: float = 10.0     # connection opened (or first byte of a next request) -> headers complete
    body_timeout: float = 30.0       # headers -> body complete
    keep_alive: float = 5.0          # idle between requests on one connection (uvicorn's timeout_keep_alive)
    max_connections: int = 512       # open connections; at the cap the idlest one makes room (see above)
    max_per_client: int = 64         # open connections of one client address; its own idlest one makes room
    max_waiting: int = 128           # connections waiting for a slot while every one has a request in progress
    pressure_header_timeout: float = 2.0   # the head deadline of connections made past half of max_connections
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


# A Host header is a name or an address, then an optional :port - nothing else (`127.0.0.1:80@evil` or
# `[::1]evil` are not a loopback host with a suffix, they are not a host at all).
_HOST_RE = re.compile(r"^(\[[0-9a-f:.]+\]|[^\[\]:@/\s]+)(:[0-9]{1,5})?$")


def _host_is_loopback(header: bytes) -> bool:
    m = _HOST_RE.match(header.decode("latin-1").strip().lower())
    return m is not None and is_loopback(m.group(1))


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


@dataclass
class _Slots:
    """The connections of one server: admitted ones (in order of arrival), waiting ones, and per client."""
    admitted: dict = field(default_factory=dict)     # GuardedH11 -> None (an ordered set)
    waiting: list = field(default_factory=list)
    per_client: Counter = field(default_factory=Counter)


class GuardedH11(H11Protocol):
    """uvicorn's h11 protocol with a deadline for the request head and the caps described in the module
    docstring. The head deadline runs while h11 waits for a request line and headers (their_state IDLE) once
    the connection is admitted or the first byte of a next request has arrived; between requests uvicorn's
    own keep-alive timeout applies."""

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        self._head_timer = None
        self._slots: _Slots = self.config.nanochat_slots
        self._peer = self.client[0] if self.client else ""
        self._idle_since = self.loop.time()
        self._admitted = False
        limits: Limits = self.config.nanochat_limits
        if self._slots.per_client[self._peer] >= limits.max_per_client:
            victim = self._idlest(self._peer)
        elif len(self._slots.admitted) >= limits.max_connections:
            victim = self._idlest(None)
        else:
            victim = self
        if victim is not None:
            if victim is not self:
                victim._evict()
            self._admit()
        elif len(self._slots.waiting) < limits.max_waiting:
            self.flow.pause_reading()       # it waits in the kernel's buffer until a slot frees
            self._slots.waiting.append(self)
            self._head_timer = self.loop.call_later(limits.header_timeout, self._head_timeout)
        else:
            transport.abort()   # every slot busy with a request, the queue full: refused before anything is read

    def data_received(self, data: bytes) -> None:
        self._idle_since = self.loop.time()
        super().data_received(data)
        self._arm()

    def on_response_complete(self) -> None:
        self._idle_since = self.loop.time()
        super().on_response_complete()
        if self._slots.waiting and self._idle() and not self.transport.is_closing():
            self.transport.close()      # kept alive for nobody while someone waits: hand the slot over

    def connection_lost(self, exc) -> None:
        self._disarm()
        self._release()
        super().connection_lost(exc)

    # -- slots --------------------------------------------------------------------------------------
    def _admit(self) -> None:
        self._admitted = True
        self._slots.admitted[self] = None
        self._slots.per_client[self._peer] += 1
        self._arm()

    def _release(self) -> None:
        slots = getattr(self, "_slots", None)
        if slots is None:
            return
        if self in slots.waiting:
            slots.waiting.remove(self)
        if self._admitted:
            self._admitted = False
            del slots.admitted[self]
            slots.per_client[self._peer] -= 1
            if slots.per_client[self._peer] <= 0:
                del slots.per_client[self._peer]
            self._let_one_in()

    def _let_one_in(self) -> None:
        limits: Limits = self.config.nanochat_limits
        while self._slots.waiting and len(self._slots.admitted) < limits.max_connections:
            nxt = self._slots.waiting.pop(0)
            if nxt.transport.is_closing():
                continue
            nxt._disarm()
            nxt._idle_since = self.loop.time()
            nxt._admit()
            nxt.flow.resume_reading()

    def _idle(self) -> bool:
        """No request in progress: none yet, a head still arriving, or kept alive after a reply."""
        return (self.cycle is None or self.cycle.response_complete) and self.conn.their_state in (h11.IDLE, h11.DONE)

    def _idlest(self, peer: str | None) -> "GuardedH11 | None":
        """The connection idle longest - of `peer`, or else of the client holding the most connections that
        has an idle one - or None if every one has a request in progress. One pass over the connections."""
        oldest: dict[str, GuardedH11] = {}
        for c in self._slots.admitted:
            if (peer is None or c._peer == peer) and c._idle() and not c.transport.is_closing():
                if c._peer not in oldest or c._idle_since < oldest[c._peer]._idle_since:
                    oldest[c._peer] = c
        if not oldest:
            return None
        heaviest = max(oldest, key=lambda p: self._slots.per_client[p])
        return oldest[heaviest]

    def _evict(self) -> None:
        self._release()        # the slot is free now, not when the transport gets round to closing
        self._disarm()
        self.transport.close()

    # -- the head deadline ------------------------------------------------------------------------
    def _arm(self) -> None:
        if not self._admitted or self.conn.their_state is not h11.IDLE or self.transport.is_closing():
            self._disarm()
        elif self._head_timer is None:
            limits: Limits = self.config.nanochat_limits
            timeout = limits.header_timeout
            if len(self._slots.admitted) >= limits.max_connections // 2:   # this one included
                timeout = min(timeout, limits.pressure_header_timeout)
            self._head_timer = self.loop.call_later(timeout, self._head_timeout)

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
    # No limit_concurrency: uvicorn answers 503 once that many connections are open, idle ones included,
    # which is the lock-out the caps above avoid (they bound the connections, so also the requests).
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level, ws="none", http=GuardedH11,
                            lifespan="on", timeout_keep_alive=limits.keep_alive,
                            h11_max_incomplete_event_size=limits.max_header_bytes,
                            timeout_graceful_shutdown=int(limits.drain + 3))   # a backstop behind the pool's abort
    config.nanochat_limits = limits
    config.nanochat_slots = _Slots()
    return Server(config)
