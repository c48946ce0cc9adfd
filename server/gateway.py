"""The fleet port: the one port the devices reach, Flower's Fleet API and nothing else, and a port
that holds when an outsider abuses it.

``fedlora-server``'s SuperLink listens on loopback only (Flower 1.41 serves its Fleet, Control and
ServerAppIo APIs on one HTTP port); :class:`FleetGateway` terminates TLS on ``--host``/``--port``
and forwards ``POST /v1/fleet/<rpc>`` to it. It is an asynchronous server (asyncio streams, h11
for HTTP/1.1, httpx for the upstream), so an idle or half-open connection costs a few kilobytes
and no thread. What it refuses, and when:

* anything but ``POST /v1/fleet/<rpc>`` (Control API, ServerAppIo, docs, path tricks): 403;
* a request without ``Content-Length`` (chunked included): 411; one that declares more than
  :attr:`GatewayLimits.max_request_bytes` (derived from the run, :func:`request_limit`): 413;
* with node authentication, a request whose signed headers do not name an enrolled key:
  401 (or Flower's own 412, :mod:`fedlora.server.fleet_auth`);
* a request that would take the bytes being forwarded past ``max_inflight_bytes``: 503, which
  Flower's SuperNode retries;

all of them decided from the request line and headers, before one body byte is read. Accepted
bodies are streamed to the SuperLink and its answers streamed back in chunks, never held whole.
Connections are bounded: request line and headers within ``header_timeout`` of arriving (the TLS
handshake included), bodies at ``min_body_rate`` after a grace, idle keep-alive connections
closed after ``keepalive_timeout``, at most ``max_connections`` open and ``max_connections_per_peer``
from one address. At a cap the oldest connection that has not sent a request (or sits idle) is
dropped for the newcomer, so a flood of half-open connections cannot keep a device out; only
when every connection is busy with a request is the newcomer refused. Refusals are counted per
reason and reported at most once a minute (:class:`RefusalLog`), so a flood cannot flood the log.
"""

from __future__ import annotations

import asyncio
import asyncio.sslproto
import contextlib
import re
import socket
import ssl
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import replace
from http import HTTPStatus
from pathlib import Path

import h11

from .fleet_auth import NodeKeys, Refusal
from .gateway_limits import TLS_READ_BUFFER, GatewayLimits, RefusalLog, _Conn, _Gone, _Table

#: The only requests a device may make: Flower's Fleet API, one RPC per path.
FLEET_PATH = re.compile(r"/v1/fleet/[a-z][a-z-]*")
REFUSED = b"fedlora-server: only the Fleet API is served on this port\n"
_HOP_HEADERS = {
    "connection",
    "keep-alive",
    "transfer-encoding",
    "content-length",
    "host",
    "accept-encoding",
    "te",
    "upgrade",
    "proxy-connection",
    "proxy-authorization",
    "trailer",
}
_READ = 64 * 1024
#: After a refusal, read (and drop) at most this much of an unread body, for at most a second,
#: so the client sees the answer instead of a reset (nginx's lingering close).
_LINGER_BYTES = 1 << 20


class FleetGateway:
    """The fleet port in front of the SuperLink at ``127.0.0.1:upstream_port``.

    Parameters
    ----------
    host, port : str, int
        Where devices connect; bound at once (so nothing else takes the port), served from
        :meth:`start`.
    upstream_port : int
        The SuperLink's loopback port.
    tls : dict or None
        ``ca``, ``cert`` and ``key`` paths (:func:`~fedlora.server.launcher.tls_files`); None
        serves plain HTTP (``--insecure``).
    limits : GatewayLimits
        What the port accepts; :meth:`set_limits` may change them before :meth:`start`.
    keys : NodeKeys, optional
        The enrolled node keys when node authentication is on.
    emit : callable
        Where the refusal counts go (one line at most once a minute).
    """

    def __init__(
        self,
        host: str,
        port: int,
        upstream_port: int,
        tls: dict[str, Path] | None,
        limits: GatewayLimits | None = None,
        keys: NodeKeys | None = None,
        emit: Callable[[str], None] = print,
    ):
        self.limits = limits or GatewayLimits()
        self.keys = keys
        self.refusals = RefusalLog(emit)
        self.tls_context: ssl.SSLContext | None = None
        self._upstream_verify: ssl.SSLContext | bool = False
        if tls is not None:
            self.tls_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            self.tls_context.load_cert_chain(str(tls["cert"]), str(tls["key"]))
            self._upstream_verify = ssl.create_default_context(cafile=str(tls["ca"]))
        self._upstream_url = f"{'https' if tls is not None else 'http'}://127.0.0.1:{upstream_port}"
        self.sock = _listen(host, port)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopping: asyncio.Event | None = None
        self._ready = threading.Event()
        self.thread = threading.Thread(target=self._run, name="fleet-gateway", daemon=True)

    def set_limits(self, **changes) -> None:
        self.limits = replace(self.limits, **changes)

    def start(self) -> None:
        self.thread.start()
        self._ready.wait(10)

    def stop(self) -> None:
        if self._loop is not None and self.thread.is_alive():
            self._loop.call_soon_threadsafe(self._stopping.set)
            self.thread.join(10)
        with contextlib.suppress(OSError):
            self.sock.close()
        self.refusals.flush(force=True)

    def _run(self) -> None:
        # asyncio gives every TLS connection a 256 KiB receive buffer up front (SSLProtocol.max_size,
        # measured: 278 MB for 1,000 half-open connections); a TLS record is at most 16 KiB, so
        # 32 KiB reads lose nothing and a connection costs about 55 KB. Only this server's
        # connections use asyncio's TLS in this process (httpx's go through anyio's own).
        asyncio.sslproto.SSLProtocol.max_size = TLS_READ_BUFFER
        asyncio.run(self._main())

    async def _main(self) -> None:
        import httpx

        self._loop = asyncio.get_running_loop()
        self._stopping = asyncio.Event()
        self.table = _Table(self.limits, self.refusals.note)
        self.inflight = 0
        self.upstream = httpx.AsyncClient(
            base_url=self._upstream_url,
            verify=self._upstream_verify,
            timeout=httpx.Timeout(self.limits.upstream_timeout, connect=10.0),
            limits=httpx.Limits(max_connections=256, max_keepalive_connections=32),
        )
        server = await asyncio.start_server(self._connection, sock=self.sock, backlog=1024)
        ticker = asyncio.create_task(self._tick())
        self._ready.set()
        try:
            await self._stopping.wait()
        finally:
            ticker.cancel()
            server.close()
            for conn in list(self.table.open):
                self.table.drop(conn)
            await self.upstream.aclose()

    async def _tick(self) -> None:
        while True:  # refusal counts that no later refusal flushes still reach the log
            await asyncio.sleep(self.refusals.every / 4)
            self.refusals.flush()

    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = writer.get_extra_info("peername")
        conn = _Conn(str(peer[0]) if peer else "?", writer)
        refused = self.table.admit(conn)
        if refused is not None:
            self.refusals.note(refused)
            conn.abort()
            return
        try:
            if self.tls_context is not None:
                await writer.start_tls(self.tls_context, ssl_handshake_timeout=self.limits.header_timeout)
            await self._serve(conn, reader, writer)
        except TimeoutError:
            self.refusals.note("header or idle timeouts")
        except (_Gone, OSError, ssl.SSLError, h11.ProtocolError, ConnectionError):
            pass
        except asyncio.CancelledError:
            pass  # dropped for a newcomer at a cap, or the gateway is stopping
        finally:
            self.table.remove(conn)
            conn.abort()

    async def _serve(self, conn: _Conn, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Requests of one connection, one after another (HTTP/1.1 keep-alive)."""
        http = h11.Connection(h11.SERVER, max_incomplete_event_size=self.limits.max_header_bytes)
        first = True
        while True:
            try:
                request = await self._next_request(http, reader, first)
            except h11.RemoteProtocolError:
                self.refusals.note("malformed requests")
                return await self._refuse(http, reader, writer, Refusal(400, b"bad request\n", ""))
            if request is None:
                return
            first = False
            self.table.set_busy(conn, True)
            try:
                await self._handle(http, request, reader, writer)
            finally:
                self.table.set_busy(conn, False)
            if http.our_state is not h11.DONE or http.their_state is not h11.DONE:
                return
            http.start_next_cycle()

    async def _next_request(
        self, http: h11.Connection, reader: asyncio.StreamReader, first: bool
    ) -> h11.Request | None:
        """The next request's line and headers (None when the client closed): the first within
        ``header_timeout``; later ones may wait ``keepalive_timeout`` for their first byte."""
        limits = self.limits
        deadline = time.monotonic() + (limits.header_timeout if first else limits.keepalive_timeout)
        started = first
        while True:
            event = http.next_event()
            if isinstance(event, h11.Request):
                return event
            if isinstance(event, h11.ConnectionClosed):
                return None
            data = await asyncio.wait_for(reader.read(_READ), max(deadline - time.monotonic(), 0.01))
            if not data and not started:
                return None
            if data and not started:  # an idle connection's new request: its headers are on the clock
                started = True
                deadline = time.monotonic() + limits.header_timeout
            http.receive_data(data)

    def _screen(self, request: h11.Request, headers: dict[str, str]) -> Refusal | int:
        """The declared body length when the request may be forwarded; otherwise the refusal."""
        path = request.target.decode("latin-1")
        # A full match, not a prefix: "/v1/fleet/../control/..." must not reach the Control API.
        if request.method != b"POST" or not FLEET_PATH.fullmatch(path):
            return Refusal(403, REFUSED, "not the Fleet API")
        if "transfer-encoding" in headers or "content-length" not in headers:
            return Refusal(411, b"fedlora-server: Content-Length required\n", "no Content-Length")
        if self.keys is not None:  # an outsider learns nothing more, not even the size limit
            refusal = self.keys.check(path, headers)
            if refusal is not None:
                return refusal
        length = int(headers["content-length"])  # h11 has checked it is a number
        if length > self.limits.max_request_bytes:
            return Refusal(413, b"fedlora-server: request too large for this run\n", "too large")
        if self.inflight + length > self.limits.max_inflight_bytes:
            return Refusal(503, b"fedlora-server: busy, retry\n", "over the in-flight budget")
        return length

    async def _handle(
        self, http: h11.Connection, request: h11.Request, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in request.headers}
        screened = self._screen(request, headers)
        if isinstance(screened, Refusal):
            self.refusals.note(screened.reason)
            return await self._refuse(http, reader, writer, screened)
        self.inflight += screened
        try:
            await self._forward(http, request, headers, screened, reader, writer)
        finally:
            self.inflight -= screened

    async def _forward(
        self,
        http: h11.Connection,
        request: h11.Request,
        headers: dict[str, str],
        length: int,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
    ) -> None:
        """Stream the body to the SuperLink and its answer back, a chunk at a time."""
        import httpx

        upstream_headers = {k: v for k, v in headers.items() if k not in _HOP_HEADERS}
        upstream_headers["content-length"] = str(length)
        body = _body(http, reader, self.limits)
        req = self.upstream.build_request(
            "POST", request.target.decode("latin-1"), content=body, headers=upstream_headers
        )
        try:
            res = await self.upstream.send(req, stream=True)
        except _Gone:
            self.refusals.note("slow or cut bodies")
            raise
        except httpx.HTTPError:  # the SuperLink is starting or gone: the SuperNode retries on 503
            return await self._refuse(
                http, reader, writer, Refusal(503, b"fedlora-server: the SuperLink is not available\n", "")
            )
        try:
            out = [(k, v) for k, v in res.headers.items() if k.lower() not in _HOP_HEADERS]
            if "content-length" in res.headers:
                out.append(("content-length", res.headers["content-length"]))
            await _send(writer, http.send(h11.Response(status_code=res.status_code, headers=out)), self.limits)
            async for chunk in res.aiter_raw():
                await _send(writer, http.send(h11.Data(data=chunk)), self.limits)
            await _send(writer, http.send(h11.EndOfMessage()), self.limits)
        finally:
            await res.aclose()

    async def _refuse(
        self, http: h11.Connection, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, refusal: Refusal
    ) -> None:
        """Answer ``refusal`` and close: the unread body, if any, is never read, only dropped."""
        response = h11.Response(
            status_code=refusal.status,
            reason=HTTPStatus(refusal.status).phrase,
            headers=[
                ("content-type", refusal.content_type),
                ("content-length", str(len(refusal.body))),
                ("connection", "close"),
            ],
        )
        with contextlib.suppress(h11.LocalProtocolError):
            data = http.send(response) + http.send(h11.Data(data=refusal.body)) + http.send(h11.EndOfMessage())
            await _send(writer, data, self.limits)
            await _linger(reader)


async def _body(http: h11.Connection, reader: asyncio.StreamReader, limits: GatewayLimits) -> AsyncIterator[bytes]:
    """The request body as it arrives; :class:`_Gone` when it is slower than ``min_body_rate``
    (after ``body_grace``) or ends early."""
    start = time.monotonic()
    received = 0
    while True:
        event = http.next_event()
        if isinstance(event, h11.Data):
            received += len(event.data)
            yield bytes(event.data)
            continue
        if isinstance(event, h11.EndOfMessage):
            return
        if event is not h11.NEED_DATA:
            raise _Gone()
        allowed = start + limits.body_grace + received / limits.min_body_rate - time.monotonic()
        try:
            data = await asyncio.wait_for(reader.read(_READ), max(allowed, 0.01))
        except TimeoutError:
            raise _Gone() from None
        if not data:
            raise _Gone()
        http.receive_data(data)


async def _send(writer: asyncio.StreamWriter, data: bytes, limits: GatewayLimits) -> None:
    """Write ``data``; a client that does not read its answer is dropped after ``keepalive_timeout``."""
    writer.write(data)
    try:
        await asyncio.wait_for(writer.drain(), limits.keepalive_timeout)
    except TimeoutError:
        raise _Gone() from None


async def _linger(reader: asyncio.StreamReader) -> None:
    """Drop what the client still sends, briefly: closing on unread bytes would reset the
    connection before the client has read the answer."""
    dropped = 0
    deadline = time.monotonic() + 1.0
    with contextlib.suppress(Exception):
        while dropped < _LINGER_BYTES:
            data = await asyncio.wait_for(reader.read(_READ), max(deadline - time.monotonic(), 0.01))
            if not data:
                return
            dropped += len(data)


def _listen(host: str, port: int) -> socket.socket:
    """A listening socket on ``host:port`` (IPv6 for an address with a colon)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(1024)
        sock.setblocking(False)
    except OSError:
        sock.close()
        raise
    return sock
