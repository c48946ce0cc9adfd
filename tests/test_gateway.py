"""The fleet port under abuse (issue 31): fast tests of :class:`~fedlora.server.gateway.FleetGateway`
with small limits, in front of a plain HTTP server that stands in for the SuperLink and records
what reached it.

Every refusal is checked to be decided before the body is read: the client sends the request
line and headers only (a raw socket), gets its answer, and the upstream never sees the request.
Node authentication uses Flower's own signing code (what a SuperNode sends). The real SuperLink
behind the gateway is exercised by tests/test_deploy*.py and benchmarks/gateway_abuse.py.
"""

from __future__ import annotations

import datetime
import http.server
import json
import socket
import ssl
import threading
import time
from base64 import b64encode

import httpx
import pytest
from conftest import free_port
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from flwr.supercore.primitives.asymmetric import public_key_to_bytes, sign_message

from fedlora.server.fleet_auth import NodeKeys
from fedlora.server.gateway import FleetGateway
from fedlora.server.gateway_limits import GatewayLimits, RefusalLog, request_limit

pytestmark = pytest.mark.unit

PULL = "/v1/fleet/pull-messages"


class _Upstream(http.server.BaseHTTPRequestHandler):
    """Echoes what it received: path, body size, the headers the gateway passed on."""

    protocol_version = "HTTP/1.1"
    seen: list[str] = []

    def do_POST(self) -> None:
        self.seen.append(self.path)
        length = int(self.headers.get("Content-Length") or 0)
        got = 0
        while got < length:
            chunk = self.rfile.read(min(1 << 16, length - got))
            if not chunk:
                break
            got += len(chunk)
        body = json.dumps(
            {"path": self.path, "bytes": got, "headers": {k.lower(): v for k, v in self.headers.items()}}
        ).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args) -> None:
        pass


@pytest.fixture(scope="module")
def upstream():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Upstream)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server
    server.shutdown()
    server.server_close()


@pytest.fixture(scope="module")
def node():
    """An enrolled node's key pair and an outsider's."""
    return ec.generate_private_key(ec.SECP384R1()), ec.generate_private_key(ec.SECP384R1())


def _pem(key) -> bytes:
    return key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)


def signed(key, *, age: float = 0.0, tamper: bool = False) -> dict[str, str]:
    """The headers Flower 1.41's SuperNode adds (NodeAuthHttpInterceptor), signed by ``key``."""
    stamp = (datetime.datetime.now(tz=datetime.UTC) - datetime.timedelta(seconds=age)).isoformat()
    signature = sign_message(key, stamp.encode("ascii"))
    if tamper:
        signature = sign_message(key, b"something else")
    return {
        "flwr-public-key": b64encode(public_key_to_bytes(key.public_key())).decode(),
        "flwr-timestamp": stamp,
        "flwr-signature": b64encode(signature).decode(),
    }


@pytest.fixture
def gateway(upstream, node, request):
    """A gateway with small limits (overridden per test by ``@pytest.mark.parametrize('limits', ...)``)."""
    changes = dict(getattr(request, "param", {}))
    auth = changes.pop("auth", False)
    lines: list[str] = []
    limits = GatewayLimits(**{"max_request_bytes": 1 << 20, "header_timeout": 1.0, "keepalive_timeout": 2.0, **changes})
    gw = FleetGateway(
        "127.0.0.1",
        free_port(),
        upstream.server_address[1],
        None,
        limits=limits,
        keys=NodeKeys([_pem(node[0])]) if auth else None,
        emit=lines.append,
    )
    gw.lines = lines
    gw.start()
    _Upstream.seen.clear()
    yield gw
    gw.stop()


def _url(gw: FleetGateway) -> str:
    return f"http://127.0.0.1:{gw.sock.getsockname()[1]}"


def _raw(gw: FleetGateway, head: bytes, timeout: float = 5.0) -> tuple[bytes, float]:
    """Send only ``head`` (request line and headers, no body); the whole answer, and how long its
    first byte (or the close, when nothing came) took. Once the whole answer is in, the client
    shuts its sending side, as one that has its answer does: the gateway's lingering close then
    ends at once instead of after its second, and the read still waits for the gateway's close."""
    began = time.monotonic()
    took = None
    with socket.create_connection(gw.sock.getsockname()[:2], timeout=timeout) as sock:
        sock.sendall(head)
        data = b""
        shut = False
        while True:
            chunk = sock.recv(65536)
            if took is None:
                took = time.monotonic() - began
            if not chunk:
                break
            data += chunk
            if not shut and _answered(data):
                sock.shutdown(socket.SHUT_WR)
                shut = True
    return data, took


def _answered(data: bytes) -> bool:
    """Whether ``data`` holds a whole HTTP response (its headers and Content-Length bytes of body)."""
    head, sep, body = data.partition(b"\r\n\r\n")
    if not sep:
        return False
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            return len(body) >= int(value)
    return False


def _head(path: str = PULL, length: int | None = None, extra: dict[str, str] | None = None) -> bytes:
    lines = [f"POST {path} HTTP/1.1", "Host: fleet"]
    if length is not None:
        lines.append(f"Content-Length: {length}")
    lines += [f"{k}: {v}" for k, v in (extra or {}).items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def test_forwards_fleet_calls_streamed_and_keeps_alive(gateway):
    with httpx.Client(base_url=_url(gateway)) as client:
        first = client.post(PULL, content=b"x" * 900_000, headers={"flwr-timestamp": "t", "content-type": "a/b"})
        second = client.post("/v1/fleet/send-node-heartbeat", content=b"ping")
    assert first.status_code == 200 and second.status_code == 200
    echoed = first.json()
    assert echoed["bytes"] == 900_000 and echoed["path"] == PULL
    # Flower's own headers reach the SuperLink unchanged; the body keeps its declared length.
    assert echoed["headers"]["flwr-timestamp"] == "t" and echoed["headers"]["content-length"] == "900000"
    assert "transfer-encoding" not in echoed["headers"]
    assert second.json()["bytes"] == 4
    assert _Upstream.seen == [PULL, "/v1/fleet/send-node-heartbeat"]


@pytest.mark.parametrize(
    "head",
    [
        _head("/v1/control/stop-run", 0),
        _head("/v1/fleet/../control/stop-run", 0),
        _head("/v1/runtime/acquire-task", 0),
        b"GET /docs HTTP/1.1\r\nHost: x\r\n\r\n",
    ],
)
def test_anything_but_the_fleet_api_is_refused(gateway, head):
    answer, _ = _raw(gateway, head)
    assert answer.startswith(b"HTTP/1.1 403") and b"only the Fleet API" in answer
    assert _Upstream.seen == []


def test_oversized_declared_length_is_refused_unread(gateway):
    answer, took = _raw(gateway, _head(length=900 * 2**20))
    assert answer.startswith(b"HTTP/1.1 413") and took < 1.0
    assert _Upstream.seen == []


@pytest.mark.parametrize("head", [_head(), _head(extra={"Transfer-Encoding": "chunked"})])
def test_missing_length_and_chunked_bodies_are_refused(gateway, head):
    answer, took = _raw(gateway, head)
    assert answer.startswith(b"HTTP/1.1 411") and took < 1.0
    assert _Upstream.seen == []


def test_slow_headers_are_dropped_at_the_deadline(gateway):
    answer, took = _raw(gateway, b"POST /v1/fleet/pull-mess")
    assert answer == b"" and 0.8 < took < 3.0
    assert _Upstream.seen == []


@pytest.mark.parametrize("gateway", [{"body_grace": 0.5, "min_body_rate": 1000.0}], indirect=True)
def test_a_body_slower_than_the_minimum_rate_is_dropped(gateway):
    began = time.monotonic()
    with socket.create_connection(gateway.sock.getsockname()[:2], timeout=10) as sock:
        sock.sendall(_head(length=100_000) + b"x" * 10)
        closed = sock.recv(1000) == b""  # the server closes; nothing more is waited for
    assert closed and time.monotonic() - began < 3.0


@pytest.mark.parametrize("gateway", [{"auth": True}], indirect=True)
def test_node_authentication_is_checked_before_the_body(gateway, node):
    enrolled, outsider = node
    big = 900 * 2**20
    cases = {
        "no headers": (_head(length=big), b"401"),
        "unenrolled key": (_head(length=big, extra=signed(outsider)), b"401"),
        "bad signature": (_head(length=100, extra=signed(enrolled, tamper=True)), b"401"),
        "stale timestamp": (_head(length=100, extra=signed(enrolled, age=3600)), b"401"),
        "future timestamp": (_head(length=100, extra=signed(enrolled, age=-3600)), b"401"),
        "garbage key": (_head(length=100, extra={**signed(enrolled), "flwr-public-key": "%%%"}), b"401"),
    }
    for name, (head, status) in cases.items():
        answer, took = _raw(gateway, head)
        assert answer.startswith(b"HTTP/1.1 " + status), (name, answer[:80])
        assert took < 1.0, name
    assert _Upstream.seen == []
    # Flower's own refusals, word for word, so a device without --key still says what to do.
    answer, _ = _raw(gateway, _head("/v1/fleet/register-node", 100, signed(outsider)))
    assert answer.startswith(b"HTTP/1.1 412") and b'"code":2001' in answer
    answer, _ = _raw(gateway, _head("/v1/fleet/activate-node", 100, signed(outsider)))
    assert answer.startswith(b"HTTP/1.1 412") and b'"code":2004' in answer
    with httpx.Client(base_url=_url(gateway)) as client:
        ok = client.post(PULL, content=b"hello", headers=signed(enrolled))
    assert ok.status_code == 200 and ok.json()["bytes"] == 5
    assert _Upstream.seen == [PULL]


@pytest.mark.parametrize("gateway", [{"max_inflight_bytes": 1000}], indirect=True)
def test_requests_beyond_the_inflight_budget_get_503(gateway):
    answer, _ = _raw(gateway, _head(length=2000))
    assert answer.startswith(b"HTTP/1.1 503")
    with httpx.Client(base_url=_url(gateway)) as client:
        assert client.post(PULL, content=b"x" * 500).status_code == 200


@pytest.mark.parametrize(
    "gateway", [{"max_connections": 30, "max_connections_per_peer": 20, "header_timeout": 30.0}], indirect=True
)
def test_a_connection_flood_cannot_keep_a_device_out(gateway):
    """100 half-open connections from the device's own address against caps of 20 per address and
    30 in all: the oldest idle ones are dropped for newcomers, the device is answered at once, no
    thread is spent per connection, and the refusals are one line."""
    threads = threading.active_count()
    flood = []
    for _ in range(100):
        sock = socket.create_connection(gateway.sock.getsockname()[:2], timeout=5)
        sock.sendall(b"POST /v1/fle")
        flood.append(sock)
    try:
        time.sleep(0.3)
        assert len(gateway.table.open) <= 20
        began = time.monotonic()
        with httpx.Client(base_url=_url(gateway)) as client:
            assert client.post(PULL, content=b"hi").status_code == 200
        assert time.monotonic() - began < 1.0
        assert threading.active_count() <= threads + 1
        dropped = sum(1 for s in flood if _closed(s))
        assert dropped >= 80
        assert gateway.refusals.total["idle connections dropped at the per-address cap"] >= 80
    finally:
        for sock in flood:
            sock.close()


def _closed(sock: socket.socket) -> bool:
    sock.settimeout(0.05)
    try:
        return sock.recv(1) == b""
    except (TimeoutError, BlockingIOError):
        return False
    except OSError:
        return True


def test_tls_and_the_handshake_deadline(tmp_path):
    """TLS on both legs, as fedlora-server runs it (the SuperLink has the server certificate too)."""
    from fedlora.deploy.certs import create_certs

    files = create_certs(tmp_path / "certs", "localhost", nodes=1)
    tls = {"ca": files.ca_cert, "cert": files.server_cert, "key": files.server_key}
    upstream = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Upstream)
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(str(files.server_cert), str(files.server_key))
    upstream.socket = context.wrap_socket(upstream.socket, server_side=True)
    threading.Thread(target=upstream.serve_forever, daemon=True).start()
    gw = FleetGateway("127.0.0.1", free_port(), upstream.server_address[1], tls, GatewayLimits(header_timeout=1.0))
    gw.start()
    try:
        port = gw.sock.getsockname()[1]
        with httpx.Client(verify=ssl.create_default_context(cafile=str(files.ca_cert))) as client:
            assert client.post(f"https://localhost:{port}{PULL}", content=b"abc").json()["bytes"] == 3
        # A peer that connects and never starts its handshake is dropped at the deadline.
        began = time.monotonic()
        with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
            assert sock.recv(10) == b""
        assert 0.8 < time.monotonic() - began < 3.0
    finally:
        gw.stop()
        upstream.shutdown()
        upstream.server_close()


def test_refusals_are_logged_at_most_once_a_window():
    lines: list[str] = []
    log = RefusalLog(lines.append, every=0.3)
    for _ in range(1000):
        log.note("too large")
    log.note("no Content-Length")
    assert lines == ["fedlora-server: fleet port refused: 1 too large"]
    time.sleep(0.35)
    log.note("too large")
    assert lines[1] == "fedlora-server: fleet port refused: 1 no Content-Length, 1000 too large"
    assert log.total["too large"] == 1001


def test_request_limit_follows_the_run():
    # The figures: a 7B model with r = 32 on q/k/v/o (about 40M values) in bf16.
    seven_b = request_limit(40_000_000, 2)
    assert 150 * 2**20 < seven_b < 200 * 2**20
    assert request_limit(75_000, 4) < 17 * 2**20  # the quickstart: a few MB
