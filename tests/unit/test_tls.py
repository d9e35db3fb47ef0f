"""The coordinator's certificates (coordinator/tls.py) and the clients' pinning (dstack/tls.py)."""

from __future__ import annotations

import datetime
import ipaddress
import ssl
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from dstack.coordinator import tls
from dstack.tls import (
    SERVER_NAME,
    FingerprintMismatch,
    TlsSetupError,
    Transport,
    der_certs,
    der_to_pem,
    fingerprint,
    handshake_failure,
    is_dstack_ca,
    parse_fingerprint,
    pin_by_fingerprint,
    split_address,
)


def names(cert_pem: bytes) -> set[str]:
    cert = x509.load_pem_x509_certificate(cert_pem)
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    return {*san.get_values_for_type(x509.DNSName), *(str(i) for i in san.get_values_for_type(x509.IPAddress))}


def test_first_start_makes_a_ca_and_a_server_certificate_the_owners_only(tmp_path: Path) -> None:
    st = tls.ensure_server_tls(tmp_path, "10.1.2.3", ("gpu-pool.example.com",))
    d = tmp_path / "tls"
    assert d.stat().st_mode & 0o777 == 0o700
    for name in ("ca.pem", "ca.key", "server.pem", "server.key"):
        assert (d / name).stat().st_mode & 0o777 == 0o600
    assert st.generated and st.ca_path == d / "ca.pem"
    assert st.fingerprint == fingerprint((d / "ca.pem").read_bytes())
    assert {SERVER_NAME, "localhost", "127.0.0.1", "::1", "10.1.2.3", "gpu-pool.example.com"} <= names(
        (d / "server.pem").read_bytes()
    )
    # The chain the server presents: its certificate, then the CA (what --ca-fingerprint looks for).
    chain = der_certs(st.chain_pem)
    assert len(chain) == 2 and fingerprint(der_to_pem(chain[1])) == st.fingerprint
    ca = x509.load_pem_x509_certificate(st.ca_pem)
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    server = x509.load_pem_x509_certificate((d / "server.pem").read_bytes())
    server.verify_directly_issued_by(ca)
    assert is_dstack_ca(st.ca_pem)


def test_a_wildcard_listen_host_is_not_a_name(tmp_path: Path) -> None:
    tls.ensure_server_tls(tmp_path, "0.0.0.0")
    assert "0.0.0.0" not in names((tmp_path / "tls" / "server.pem").read_bytes())


def test_a_restart_keeps_everything_that_is_still_good(tmp_path: Path) -> None:
    first = tls.ensure_server_tls(tmp_path, "127.0.0.1")
    again = tls.ensure_server_tls(tmp_path, "127.0.0.1")
    assert again == first


def test_a_new_name_makes_a_new_server_certificate_under_the_same_ca(tmp_path: Path) -> None:
    first = tls.ensure_server_tls(tmp_path, "127.0.0.1")
    moved = tls.ensure_server_tls(tmp_path, "192.168.7.7")
    assert moved.ca_pem == first.ca_pem and moved.key_pem != first.key_pem
    assert "192.168.7.7" in names((tmp_path / "tls" / "server.pem").read_bytes())


def test_a_server_certificate_near_its_end_is_made_anew(tmp_path: Path) -> None:
    first = tls.ensure_server_tls(tmp_path, "127.0.0.1")
    d = tmp_path / "tls"
    ca_key = serialization.load_pem_private_key((d / "ca.key").read_bytes(), None)
    assert isinstance(ca_key, ec.EllipticCurvePrivateKey)
    ca = x509.load_pem_x509_certificate(first.ca_pem)
    old = x509.load_pem_x509_certificate((d / "server.pem").read_bytes())
    soon = datetime.datetime.now(datetime.UTC) + datetime.timedelta(days=3)
    expiring = (
        x509.CertificateBuilder()
        .subject_name(old.subject)
        .issuer_name(ca.subject)
        .public_key(old.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(old.not_valid_before_utc)
        .not_valid_after(soon)
        .add_extension(old.extensions.get_extension_for_class(x509.SubjectAlternativeName).value, critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    (d / "server.pem").write_bytes(expiring.public_bytes(serialization.Encoding.PEM))
    renewed = tls.ensure_server_tls(tmp_path, "127.0.0.1")
    cert = x509.load_pem_x509_certificate((d / "server.pem").read_bytes())
    assert cert.not_valid_after_utc > soon + datetime.timedelta(days=300)
    assert renewed.ca_pem == first.ca_pem


def test_a_server_certificate_of_another_ca_is_replaced(tmp_path: Path) -> None:
    tls.ensure_server_tls(tmp_path, "127.0.0.1")
    other_key, other_ca = tls.make_ca("someone else")
    _, foreign = tls.make_server_cert(other_key, other_ca, tls.wanted_names("127.0.0.1"))
    (tmp_path / "tls" / "server.pem").write_bytes(foreign.public_bytes(serialization.Encoding.PEM))
    st = tls.ensure_server_tls(tmp_path, "127.0.0.1")
    cert = x509.load_pem_x509_certificate((tmp_path / "tls" / "server.pem").read_bytes())
    cert.verify_directly_issued_by(x509.load_pem_x509_certificate(st.ca_pem))


def test_half_a_ca_is_an_error_not_a_new_ca(tmp_path: Path) -> None:
    tls.ensure_server_tls(tmp_path, "127.0.0.1")
    (tmp_path / "tls" / "ca.key").unlink()
    with pytest.raises(tls.TlsError, match=r"only one of ca\.pem and ca\.key"):
        tls.ensure_server_tls(tmp_path, "127.0.0.1")


def test_loose_key_modes_are_tightened(tmp_path: Path) -> None:
    tls.ensure_server_tls(tmp_path, "127.0.0.1")
    (tmp_path / "tls" / "server.key").chmod(0o644)
    (tmp_path / "tls").chmod(0o755)
    tls.ensure_server_tls(tmp_path, "127.0.0.1")
    assert (tmp_path / "tls" / "server.key").stat().st_mode & 0o777 == 0o600
    assert (tmp_path / "tls").stat().st_mode & 0o777 == 0o700


def test_fingerprints_parse_in_our_form_and_openssls() -> None:
    digits = "0123456789abcdef" * 4
    assert parse_fingerprint("SHA256:" + digits) == "SHA256:" + digits
    assert parse_fingerprint(":".join(digits[i : i + 2].upper() for i in range(0, 64, 2))) == "SHA256:" + digits
    assert parse_fingerprint("sha256:" + digits.upper()) == "SHA256:" + digits
    for bad in ("", "SHA256:abc", "MD5:" + digits, digits + "00"):
        with pytest.raises(TlsSetupError):
            parse_fingerprint(bad)


def test_the_fingerprint_is_the_sha256_of_the_der() -> None:
    _, ca = tls.make_ca()
    pem = ca.public_bytes(serialization.Encoding.PEM)
    der = ca.public_bytes(serialization.Encoding.DER)
    assert der_certs(pem) == [der]
    assert fingerprint(pem) == "SHA256:" + ca.fingerprint(hashes.SHA256()).hex()
    assert der_to_pem(der) == pem  # the same PEM as cryptography writes


def test_only_a_coordinators_private_ca_is_verified_against_the_fixed_name() -> None:
    ours = tls.make_ca()[1].public_bytes(serialization.Encoding.PEM)
    admins = tls.make_ca("Example Corp Root CA")[1].public_bytes(serialization.Encoding.PEM)
    assert Transport(ca_pem=ours).options() == [("grpc.ssl_target_name_override", SERVER_NAME)]
    assert Transport(ca_pem=admins).options() == []
    assert Transport().options() == []


def test_handshake_failures_are_told_apart() -> None:
    verify = (
        "failed to connect to all addresses; last error: UNKNOWN: ipv4:127.0.0.1:1: Tls handshake failed"
        " (TSI_PROTOCOL_FAILURE): SSL_ERROR_SSL: error:1000007d:SSL routines:OPENSSL_internal:"
        "CERTIFICATE_VERIFY_FAILED: self signed certificate in certificate chain: OK"
    )
    plain = "Tls handshake failed (TSI_PROTOCOL_FAILURE): SSL_ERROR_SSL: ...:WRONG_VERSION_NUMBER: ..."
    assert handshake_failure(verify) == "untrusted"
    assert handshake_failure(plain) == "plaintext"
    assert handshake_failure("failed to connect to all addresses; last error: Connection refused") is None


def test_addresses_split() -> None:
    assert split_address("10.0.0.1:3000") == ("10.0.0.1", 3000)
    assert split_address("[::1]:3000") == ("::1", 3000)
    assert split_address("dns:///pool.example.com:443") == ("pool.example.com", 443)
    with pytest.raises(TlsSetupError):
        split_address("no-port")


@pytest.fixture
def tls_server(tmp_path: Path) -> Iterator[tuple[str, tls.ServerTls]]:
    """A bare TLS server presenting the coordinator's chain, for the pinning handshake."""
    import socket

    st = tls.ensure_server_tls(tmp_path, "127.0.0.1")
    (tmp_path / "chain.pem").write_bytes(st.chain_pem)
    (tmp_path / "key.pem").write_bytes(st.key_pem)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(tmp_path / "chain.pem", tmp_path / "key.pem")
    server = socket.create_server(("127.0.0.1", 0))

    def serve() -> None:
        while True:
            try:
                conn, _ = server.accept()
            except OSError:
                return
            try:
                with ctx.wrap_socket(conn, server_side=True) as s:
                    s.recv(1)
            except OSError:
                pass

    threading.Thread(target=serve, daemon=True).start()
    yield f"127.0.0.1:{server.getsockname()[1]}", st
    server.close()


def test_pinning_keeps_the_certificate_with_the_fingerprint(tls_server: tuple[str, tls.ServerTls]) -> None:
    address, st = tls_server
    assert fingerprint(pin_by_fingerprint(address, st.fingerprint)) == st.fingerprint
    with pytest.raises(FingerprintMismatch, match="does not match the pinned CA") as e:
        pin_by_fingerprint(address, "SHA256:" + "00" * 32)
    assert st.fingerprint in str(e.value)


def test_ip_names_are_ip_sans(tmp_path: Path) -> None:
    tls.ensure_server_tls(tmp_path, "[fd00::5]")
    cert = x509.load_pem_x509_certificate((tmp_path / "tls" / "server.pem").read_bytes())
    ips = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value.get_values_for_type(x509.IPAddress)
    assert ipaddress.ip_address("fd00::5") in ips


def test_a_tls_client_does_not_import_cryptography(tmp_path: Path) -> None:
    """The CLI's start-up: a TLS channel with a pinned CA costs no import of `cryptography` (tens of ms; grpc
    imports ssl anyway)."""
    import json
    import subprocess
    import sys

    st = tls.ensure_server_tls(tmp_path, "127.0.0.1")
    assert st.ca_path is not None
    script = (
        "import json, sys\n"
        "from dstack.cli.client import Client\n"
        "from dstack.cli.home import Endpoint\n"
        f"c = Client(Endpoint('127.0.0.1:1', 't', ca_file={str(st.ca_path)!r}))\n"
        "c.close()\n"
        "print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] == 'cryptography')))\n"
    )
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True, timeout=60)
    assert json.loads(r.stdout) == []
