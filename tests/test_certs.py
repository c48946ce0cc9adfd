"""`fedlora certs`: a CA that verifies the server certificate, node keys Flower can read."""

from __future__ import annotations

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from fedlora.deploy.certs import check_private_key, create_certs, load_public_keys
from fedlora.errors import FedLoraError

pytestmark = pytest.mark.unit


def test_server_certificate_is_signed_by_the_ca_for_every_host_name(tmp_path):
    files = create_certs(tmp_path, "edge.example.org", nodes=2)
    ca = x509.load_pem_x509_certificate(files.ca_cert.read_bytes())
    server = x509.load_pem_x509_certificate(files.server_cert.read_bytes())
    server.verify_directly_issued_by(ca)
    san = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["edge.example.org", "localhost"]
    assert [str(ip) for ip in san.get_values_for_type(x509.IPAddress)] == ["127.0.0.1"]
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert (files.ca_key.stat().st_mode & 0o077) == 0 and (files.server_key.stat().st_mode & 0o077) == 0


def test_node_keys_are_openssh_ec_pairs(tmp_path):
    files = create_certs(tmp_path, "10.0.0.5", node_names=["hospital-a", "phone-7"])
    assert [p.stem for p in files.node_keys] == ["hospital-a", "phone-7"]
    for key_path, pub_path in zip(files.node_keys, files.node_public_keys):
        check_private_key(key_path)
        private = serialization.load_ssh_private_key(key_path.read_bytes(), None)
        public = serialization.load_ssh_public_key(pub_path.read_bytes())
        assert isinstance(private, ec.EllipticCurvePrivateKey)
        assert private.public_key().public_numbers() == public.public_numbers()
    assert set(load_public_keys(files.node_keys[0].parent)) == {"hospital-a", "phone-7"}


def test_refuses_to_overwrite_a_ca_and_bad_hosts(tmp_path):
    create_certs(tmp_path, "localhost", nodes=0)
    with pytest.raises(FedLoraError, match="--force"):
        create_certs(tmp_path, "localhost", nodes=0)
    create_certs(tmp_path, "localhost", nodes=0, force=True)
    with pytest.raises(FedLoraError, match="--server-host"):
        create_certs(tmp_path / "x", "https://host:9092")


def test_bad_keys_are_named(tmp_path):
    (tmp_path / "keys").mkdir()
    (tmp_path / "keys" / "bad.pub").write_text("not a key\n")
    with pytest.raises(FedLoraError, match="bad.pub is not an OpenSSH public key"):
        load_public_keys(tmp_path / "keys")
    with pytest.raises(FedLoraError, match="no \\*.pub files"):
        load_public_keys(tmp_path)
    (tmp_path / "k").write_text("nope")
    with pytest.raises(FedLoraError, match="--key"):
        check_private_key(tmp_path / "k")
