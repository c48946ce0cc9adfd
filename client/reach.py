"""Reaching the server from a device: a TCP connection and, with TLS, a handshake against the CA.

:func:`reach` retries with exponential backoff up to ``--max-retries`` times, so a server that is
still starting is waited for, a wrong CA is reported as such at once and an unreachable server
ends the command instead of hanging; :func:`wait_for_server` waits for a server that went away
mid-run, for up to ``--max-wait``.
"""

from __future__ import annotations

import socket
import ssl
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from fedlora.errors import ConnectError

from .device import PREFIX

if TYPE_CHECKING:
    from .launcher import ClientOptions


def probe(host: str, port: int, ca: Path | None, timeout: float) -> None:
    """One attempt to reach the server (and to verify its certificate against ``ca``).

    Raises ``OSError`` for what a retry may fix (refused, unreachable, timed out) and a
    ConnectError for what it won't (a certificate ``ca`` does not trust, a TLS mismatch).
    """
    with socket.create_connection((host, port), timeout=timeout) as sock:
        if ca is None:
            if _speaks_tls(sock, host):
                raise ConnectError(
                    f"the server at {host}:{port} uses TLS; drop --insecure and pass --ca CA_CERT "
                    "(the ca.crt made by `fedlora certs` together with the server's certificate)"
                )
            return
        context = ssl.create_default_context(cafile=str(ca))
        try:
            with context.wrap_socket(sock, server_hostname=host):
                return
        except ssl.SSLCertVerificationError as err:
            raise ConnectError(
                f"the server at {host}:{port} has a certificate that --ca {ca} does not trust "
                f"({err.verify_message}); use the ca.crt made together with the server's certificate"
            ) from None
        except ssl.SSLError as err:
            raise ConnectError(
                f"TLS handshake with {host}:{port} failed ({err.reason}); is the server running with --insecure?"
            ) from None


def _speaks_tls(sock: socket.socket, host: str) -> bool:
    """Whether the server on ``sock`` completes a TLS handshake (an ``--insecure`` client would
    otherwise retry plain HTTP against it until ``--max-wait``). Nothing is verified or sent."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    try:
        with context.wrap_socket(sock, server_hostname=host, do_handshake_on_connect=True):
            return True
    except (ssl.SSLError, OSError):  # a plain HTTP server answers the hello with an error, or closes
        return False


def reach(
    host: str, port: int, opts: ClientOptions, emit: Callable[[str], None], sleep: Callable[[float], None] = time.sleep
) -> None:
    """:func:`probe` with exponential backoff (1, 2, 4, ... s, at most 30 s) for ``max_retries`` retries."""
    delay = 1.0
    for attempt in range(opts.max_retries + 1):
        try:
            probe(host, port, None if opts.insecure else opts.ca, opts.connect_timeout)
            return
        except ConnectError:
            raise
        except OSError as err:
            reason = err.strerror or type(err).__name__
            if attempt == opts.max_retries:
                raise ConnectError(
                    f"cannot reach the server at {host}:{port} after {attempt + 1} attempts "
                    f"({reason}); is fedlora-server running there and the port open?"
                ) from None
            emit(
                f"{PREFIX}server {host}:{port} not reachable ({reason}); retrying in {delay:g} s "
                f"({attempt + 1}/{opts.max_retries})"
            )
            sleep(delay)
            delay = min(delay * 2, 30.0)


def wait_for_server(host: str, port: int, opts: ClientOptions, deadline: float, stop_event: threading.Event) -> bool:
    """Probe the server until it answers (True), ``stop_event`` is set (False), or ``deadline``
    passes (ConnectError naming how long it has been away). A certificate problem is raised at once."""
    delay = 1.0
    while True:
        try:
            probe(host, port, None if opts.insecure else opts.ca, opts.connect_timeout)
            return True
        except ConnectError:
            raise
        except OSError:
            pass
        left = deadline - time.monotonic()
        if left <= 0:
            raise ConnectError(
                f"the server at {host}:{port} has been away for {opts.max_wait:g} s (--max-wait); giving up"
            )
        if stop_event.wait(min(delay, left)):
            return False
        delay = min(delay * 2, 10.0)
