"""Node authentication at the fleet port, checked from the headers alone, before any body byte.

With ``--auth-keys``, Flower's SuperNode signs every Fleet request over HTTP (Flower 1.41's
``NodeAuthHttpInterceptor``): ``flwr-public-key`` (base64 of its PEM public key),
``flwr-timestamp`` (ISO 8601, UTC) and ``flwr-signature`` (base64 of an ECDSA signature of the
timestamp). The SuperLink verifies them too, but only after the whole body has reached it; the
gateway verifies them first, so an outsider's upload is refused before it is read.

What a refused request gets is what the SuperLink itself would answer, so a device's own
diagnosis (``fedlora-client``'s one line about ``--key``) is unchanged:

* a missing, malformed or badly signed header set, a timestamp outside Flower's window, or an
  unenrolled key on any RPC but the two below: 401, as Flower's ``NodeAuthMiddleware``;
* ``register-node`` (a SuperNode without ``--key`` registering a key it just made): Flower's
  412 with code 2001, self-registration is disabled under node authentication;
* ``activate-node`` with a validly signed but unenrolled key: Flower's 412 with code 2004.
"""

from __future__ import annotations

import binascii
import datetime
import json
from base64 import b64decode
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

#: The RPCs whose refusal Flower words itself (see the module docstring).
REGISTER_PATH = "/v1/fleet/register-node"
ACTIVATE_PATH = "/v1/fleet/activate-node"


@dataclass(frozen=True)
class Refusal:
    """An answer to send instead of forwarding: status, body, content type and the reason counted
    in the gateway's refusal log."""

    status: int
    body: bytes
    reason: str
    content_type: str = "text/plain"


UNAUTHENTICATED = Refusal(401, b'{"detail":"Invalid SuperNode authentication"}', "unauthenticated", "application/json")


def _flower_refusal(code: int, reason: str) -> Refusal:
    """Flower's own HTTP error for ``code`` (its catalog's status and public message, its JSON)."""
    from flwr.supercore.error.base import FlowerError
    from flwr.supercore.error.catalog import API_ERROR_MAP

    spec = API_ERROR_MAP[code]
    payload = FlowerError(code, spec.public_message).to_json(spec.public_message)
    body = json.dumps(payload, separators=(",", ":")).encode()
    return Refusal(int(spec.http_status_code), body, reason, "application/json")


class NodeKeys:
    """The enrolled node public keys and the check of a request's signed headers.

    Parameters
    ----------
    pems : iterable of bytes
        The PEM public keys of ``--auth-keys`` (the keys the SuperLink is given too).
    """

    def __init__(self, pems: Iterable[bytes]):
        from cryptography.hazmat.primitives import serialization
        from flwr.supercore.primitives.asymmetric import public_key_to_bytes

        # Keyed by Flower's own encoding of each key: what a SuperNode puts in its header.
        self._keys = {}
        for pem in pems:
            key = serialization.load_pem_public_key(pem)
            self._keys[public_key_to_bytes(key)] = key
        from flwr.supercore.error.base import ApiErrorCode

        self._register = _flower_refusal(ApiErrorCode.FLEET_SUPERNODE_REGISTRATION_DISABLED, "self-registration")
        self._activate = _flower_refusal(ApiErrorCode.FLEET_NODE_ACTIVATION_FAILED, "unenrolled key")

    def __len__(self) -> int:
        return len(self._keys)

    def check(self, path: str, headers: Mapping[str, str]) -> Refusal | None:
        """None when the headers carry a valid signature of an enrolled key; else the answer."""
        claimed = _signed_key(headers)
        if claimed is None:
            return UNAUTHENTICATED
        raw, signature, timestamp = claimed
        if path == REGISTER_PATH:
            return self._register  # validly signed or not, the SuperLink refuses it: no body needed
        key = self._keys.get(raw)
        if key is None:
            return self._activate if path == ACTIVATE_PATH else UNAUTHENTICATED
        from flwr.supercore.primitives.asymmetric import verify_signature

        if not verify_signature(key, timestamp.encode("ascii"), signature):
            return UNAUTHENTICATED
        return None


def _signed_key(headers: Mapping[str, str]) -> tuple[bytes, bytes, str] | None:
    """(public key, signature, timestamp) from well-formed headers whose timestamp is inside
    Flower's window, else None. Only cheap checks here: the signature is verified by the caller
    once the key is known to be enrolled (an outsider costs no ECDSA verification)."""
    from flwr.common.constant import SYSTEM_TIME_TOLERANCE, TIMESTAMP_HEADER, TIMESTAMP_TOLERANCE
    from flwr.supercore.constant import FLEET_HTTP_PUBLIC_KEY_HEADER, FLEET_HTTP_SIGNATURE_HEADER

    try:
        raw = b64decode(headers[FLEET_HTTP_PUBLIC_KEY_HEADER], validate=True)
        signature = b64decode(headers[FLEET_HTTP_SIGNATURE_HEADER], validate=True)
        timestamp = headers[TIMESTAMP_HEADER]
        age = (datetime.datetime.now(tz=datetime.UTC) - datetime.datetime.fromisoformat(timestamp)).total_seconds()
        timestamp.encode("ascii")
    except (KeyError, ValueError, TypeError, UnicodeError, binascii.Error):
        return None
    # Flower's own window (flwr.superlink.routers.fleet.node_auth): a little drift either way.
    if not -SYSTEM_TIME_TOLERANCE < age < TIMESTAMP_TOLERANCE + SYSTEM_TIME_TOLERANCE:
        return None
    return raw, signature, timestamp
