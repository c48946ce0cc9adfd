"""Development certificates and node-authentication keys for a deployment (``fedlora certs``).

What it writes into ``out``:

* ``ca.crt`` / ``ca.key``: a self-signed certificate authority. Clients trust ``ca.crt``
  (``fedlora-client --ca``); ``ca.key`` signs and should stay on the machine that made it.
* ``server.crt`` / ``server.key``: the SuperLink's TLS certificate, valid for the server's
  host name or IP plus ``localhost`` and ``127.0.0.1`` (``fedlora-server --certs``).
* ``nodes/<name>.key`` / ``nodes/<name>.pub``: one EC P-384 key pair per edge device in
  OpenSSH format, the format Flower's SuperNode authentication reads. The device keeps its
  ``.key`` (``fedlora-client --key``); the server lists the ``.pub`` files
  (``fedlora-server --auth-keys nodes/``).

An organisation with its own PKI skips this: ``fedlora-server --certs`` takes any folder with
``ca.crt``, ``server.crt`` and ``server.key`` (PEM), and ``--auth-keys`` any folder of
OpenSSH-format NIST EC public keys.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import re
from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from fedlora.errors import FedLoraError
from fedlora.files import atomic_write_bytes

CA_CERT, CA_KEY = "ca.crt", "ca.key"
SERVER_CERT, SERVER_KEY = "server.crt", "server.key"
NODES_DIR = "nodes"


@dataclass
class CertFiles:
    """Paths of what :func:`create_certs` wrote."""

    ca_cert: Path
    ca_key: Path
    server_cert: Path
    server_key: Path
    node_keys: list[Path] = field(default_factory=list)
    node_public_keys: list[Path] = field(default_factory=list)


#: The subject (and issuer) common name of the development CA.
CA_NAME = "fedlora development CA"


def _name(common_name: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "fedlora development"),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )


def _san(hosts: list[str]) -> x509.SubjectAlternativeName:
    entries: list[x509.GeneralName] = []
    for host in dict.fromkeys(hosts):  # ordered, unique
        try:
            entries.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            entries.append(x509.DNSName(host))
    return x509.SubjectAlternativeName(entries)


def _write(path: Path, data: bytes, private: bool) -> None:
    # A key is 0600 from its first byte: the temporary file is created 0600 (fedlora.files).
    atomic_write_bytes(path, data, private=private)


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def node_key_pair() -> tuple[bytes, bytes]:
    """(private, public) key of one SuperNode: EC P-384 in OpenSSH format."""
    key = ec.generate_private_key(ec.SECP384R1())
    private = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()
    )
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    return private, public + b"\n"


def _ca_certificate(start: dt.datetime, end: dt.datetime) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    """A self-signed CA (P-384) that may sign server certificates only (``path_length=0``)."""
    ca_key = ec.generate_private_key(ec.SECP384R1())
    ca_name = _name(CA_NAME)
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                key_cert_sign=True,
                crl_sign=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA384())
    )
    return ca_key, ca_cert


def _server_certificate(
    host: str, ca_key: ec.EllipticCurvePrivateKey, start: dt.datetime, end: dt.datetime
) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    """The server's certificate for ``host`` (and ``localhost``, ``127.0.0.1``), signed by the CA."""
    server_key = ec.generate_private_key(ec.SECP384R1())
    server_cert = (
        x509.CertificateBuilder()
        .subject_name(_name(host))
        .issuer_name(_name(CA_NAME))
        .public_key(server_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(_san([host, "localhost", "127.0.0.1"]), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA384())
    )
    return server_key, server_cert


def create_certs(
    out: str | Path,
    server_host: str,
    *,
    nodes: int = 3,
    node_names: list[str] | None = None,
    days: int = 365,
    force: bool = False,
) -> CertFiles:
    """Write a development CA, a server certificate and node key pairs into ``out``.

    Parameters
    ----------
    out : path
        Output folder; created if missing.
    server_host : str
        DNS name or IP address the clients dial (``fedlora-client --server HOST:PORT``). The
        certificate is also valid for ``localhost`` and ``127.0.0.1``.
    nodes : int
        How many node key pairs (``node1`` ... ``nodeN``) when ``node_names`` is not given.
    node_names : list of str, optional
        Names of the node key pairs.
    days : int
        Validity of the certificates.
    force : bool
        Replace existing files; otherwise an existing CA stops the command, so a CA that clients
        already trust is never overwritten by accident.
    """
    out = Path(out)
    host = server_host.strip("[]")
    if not _is_ip(host) and not re.fullmatch(r"[A-Za-z0-9]([A-Za-z0-9.-]*[A-Za-z0-9])?", host):
        raise FedLoraError(f"--server-host must be a host name or IP address (no port, no scheme), got {server_host!r}")
    names = node_names if node_names is not None else [f"node{i + 1}" for i in range(nodes)]
    if nodes < 0 or any(not n or "/" in n or n.startswith(".") for n in names):
        raise FedLoraError("--nodes must be >= 0 and node names plain file names")
    if (out / CA_CERT).exists() and not force:
        raise FedLoraError(
            f"{out / CA_CERT} exists; pass --force to replace the CA (clients trusting it must get the new ca.crt)"
        )
    now = dt.datetime.now(dt.UTC)
    start, end = now - dt.timedelta(minutes=5), now + dt.timedelta(days=days)
    ca_key, ca_cert = _ca_certificate(start, end)
    server_key, server_cert = _server_certificate(host, ca_key, start, end)
    files = CertFiles(
        ca_cert=out / CA_CERT, ca_key=out / CA_KEY, server_cert=out / SERVER_CERT, server_key=out / SERVER_KEY
    )
    _write(files.ca_key, _pem_key(ca_key), private=True)
    _write(files.ca_cert, ca_cert.public_bytes(serialization.Encoding.PEM), private=False)
    _write(files.server_key, _pem_key(server_key), private=True)
    _write(files.server_cert, server_cert.public_bytes(serialization.Encoding.PEM), private=False)
    for name in names:
        private, public = node_key_pair()
        key_path, pub_path = out / NODES_DIR / f"{name}.key", out / NODES_DIR / f"{name}.pub"
        _write(key_path, private, private=True)
        _write(pub_path, public, private=False)
        files.node_keys.append(key_path)
        files.node_public_keys.append(pub_path)
    return files


def _is_ip(value: str) -> bool:
    try:
        ipaddress.ip_address(value)
        return True
    except ValueError:
        return False


def load_public_keys(folder: str | Path) -> dict[str, bytes]:
    """The node public keys in ``folder`` (``*.pub``, OpenSSH EC on a NIST curve), by file name.

    Raises a FedLoraError naming the first file that is not one, or an empty folder.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise FedLoraError(f"--auth-keys {folder}: not a folder")
    keys: dict[str, bytes] = {}
    for path in sorted(folder.glob("*.pub")):
        try:
            key = serialization.load_ssh_public_key(path.read_bytes())
        except (ValueError, OSError, UnsupportedAlgorithm) as err:
            raise FedLoraError(f"--auth-keys: {path} is not an OpenSSH public key ({err})") from None
        if not isinstance(key, ec.EllipticCurvePublicKey) or not isinstance(
            key.curve, (ec.SECP256R1, ec.SECP384R1, ec.SECP521R1)
        ):
            raise FedLoraError(f"--auth-keys: {path} is not a NIST EC public key (make one with `fedlora certs`)")
        keys[path.stem] = key.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    if not keys:
        raise FedLoraError(f"--auth-keys {folder}: no *.pub files")
    return keys


def check_private_key(path: str | Path) -> None:
    """Raise a FedLoraError unless ``path`` is an OpenSSH EC private key a SuperNode can use."""
    path = Path(path)
    if not path.is_file():
        raise FedLoraError(f"--key {path}: no such file")
    try:
        key = serialization.load_ssh_private_key(path.read_bytes(), None)
    except (ValueError, TypeError, UnsupportedAlgorithm) as err:
        raise FedLoraError(f"--key {path}: not an unencrypted OpenSSH private key ({err})") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise FedLoraError(f"--key {path}: not an EC key (make one with `fedlora certs`)")


def check_certificate(path: str | Path, flag: str) -> None:
    """Raise a FedLoraError unless ``path`` holds a PEM certificate."""
    path = Path(path)
    if not path.is_file():
        raise FedLoraError(f"{flag} {path}: no such file")
    try:
        x509.load_pem_x509_certificates(path.read_bytes())
    except ValueError as err:
        raise FedLoraError(f"{flag} {path}: not a PEM certificate ({err})") from None
