"""The coordinator's TLS material: a private CA and a server certificate it signs, in STATE_DIR/tls/.

On first start over TCP the coordinator creates both (EC P-256, which gRPC's BoringSSL accepts). Later
starts keep the CA (its fingerprint is what clients and agents pinned) and make a new server certificate
only when the old one is near its end or its names no longer cover the listen address and --tls-san
values. Clients that pinned this CA verify the server against one fixed name, SERVER_NAME (gRPC's
`ssl_target_name_override`), which every server certificate carries: an agent reaching the coordinator
by any address or name still verifies it.

Or an admin gives a certificate and key (--tls-cert/--tls-key): then none is created, and clients verify
it as usual (with --ca-file, or the system's roots).

Only the coordinator imports this module (and `cryptography` with it): the CLI and the agent pin and
check certificates with dstack.tls, which needs the standard library only.
"""

from __future__ import annotations

import datetime
import ipaddress
import logging
import os
import socket
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from dstack.storage.private import FILE_MODE, private_dir, tighten_file
from dstack.tls import CA_MARKER, SERVER_NAME, fingerprint

log = logging.getLogger("dstack.coordinator")

CA_VALIDITY = datetime.timedelta(days=3650)
SERVER_VALIDITY = datetime.timedelta(days=397)
# A server certificate with less than this left is made anew at start.
RENEW_BEFORE = datetime.timedelta(days=30)
# Clocks of clients a little behind the coordinator's still accept a certificate made just now.
BACKDATE = datetime.timedelta(hours=1)

WILDCARD_HOSTS = {"", "0.0.0.0", "::", "[::]"}


class TlsError(Exception):
    """The TLS material cannot be made or read; the message says which file and why."""


@dataclass(frozen=True)
class ServerTls:
    """What the gRPC server presents: its key and its chain (server certificate, then the CA's)."""

    key_pem: bytes
    chain_pem: bytes
    ca_pem: bytes  # the certificate clients pin; for an admin's certificate, the last of its chain
    ca_path: Path | None  # STATE_DIR/tls/ca.pem, or None for an admin's certificate
    generated: bool  # True: our private CA (clients verify SERVER_NAME); False: the admin's certificate

    @property
    def fingerprint(self) -> str:
        return fingerprint(self.ca_pem)


def tls_dir(state_dir: Path) -> Path:
    return state_dir / "tls"


def wanted_names(listen_host: str, extra: tuple[str, ...] = ()) -> set[str]:
    """The names and addresses the server certificate must cover."""
    names = {SERVER_NAME, "localhost", "127.0.0.1", "::1", socket.gethostname(), *extra}
    host = listen_host.strip("[]")
    if host not in WILDCARD_HOSTS:
        names.add(host)
    return {n for n in names if n}


def _san(name: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(name))
    except ValueError:
        return x509.DNSName(name)


def _names_of(cert: x509.Certificate) -> set[str]:
    try:
        ext = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return set()
    return {*ext.get_values_for_type(x509.DNSName), *(str(ip) for ip in ext.get_values_for_type(x509.IPAddress))}


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _write_private(path: Path, data: bytes) -> None:
    """Writes `path` as 0600 through a temporary file: a crash never leaves half a key."""
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, FILE_MODE)
    os.fchmod(fd, FILE_MODE)  # a .tmp left by a crash keeps its mode through O_CREAT
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def make_ca(common_name: str | None = None) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = ec.generate_private_key(ec.SECP256R1())
    # CA_MARKER in the name tells clients that this CA's servers answer to SERVER_NAME (dstack.tls).
    name = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "dstack"),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name or f"{CA_MARKER} {socket.gethostname()}"[:64]),
        ]
    )
    now = _now()
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - BACKDATE)
        .not_valid_after(now + CA_VALIDITY)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return key, cert


def make_server_cert(
    ca_key: ec.EllipticCurvePrivateKey, ca_cert: x509.Certificate, names: set[str]
) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = ec.generate_private_key(ec.SECP256R1())
    now = _now()
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, SERVER_NAME)]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - BACKDATE)
        .not_valid_after(min(now + SERVER_VALIDITY, ca_cert.not_valid_after_utc))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.SubjectAlternativeName([_san(n) for n in sorted(names)]), critical=False)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    return key, cert


def _server_cert_usable(cert: x509.Certificate, ca_cert: x509.Certificate, names: set[str]) -> str | None:
    """None if `cert` may be served as it is; else why it must be made anew."""
    if cert.issuer != ca_cert.subject:
        return "it was not signed by the CA in ca.pem"
    try:
        cert.verify_directly_issued_by(ca_cert)
    except (InvalidSignature, ValueError, TypeError):
        return "it was not signed by the CA in ca.pem"
    if cert.not_valid_after_utc - _now() < RENEW_BEFORE:
        return f"it expires on {cert.not_valid_after_utc:%Y-%m-%d}"
    missing = names - _names_of(cert)
    if missing:
        return f"it does not cover {', '.join(sorted(missing))}"
    return None


def ensure_server_tls(state_dir: Path, listen_host: str, extra_names: tuple[str, ...] = ()) -> ServerTls:
    """The private CA and a current server certificate in STATE_DIR/tls/, made when missing or stale."""
    d = tls_dir(state_dir)
    private_dir(d, log)
    ca_key_path, ca_path = d / "ca.key", d / "ca.pem"
    key_path, cert_path = d / "server.key", d / "server.pem"
    for p in (ca_key_path, key_path):
        tighten_file(p, log)
    try:
        if ca_path.exists() and ca_key_path.exists():
            ca_cert = x509.load_pem_x509_certificate(ca_path.read_bytes())
            ca_key = serialization.load_pem_private_key(ca_key_path.read_bytes(), password=None)
            if not isinstance(ca_key, ec.EllipticCurvePrivateKey):
                raise TlsError(f"{ca_key_path}: not an EC key; move {d} away to make a new CA")
        elif ca_path.exists() or ca_key_path.exists():
            raise TlsError(
                f"{d} holds only one of ca.pem and ca.key: restore the other, or move {d} away to make a new CA"
                " (clients and agents then need the new fingerprint)"
            )
        else:
            ca_key, ca_cert = make_ca()
            _write_private(ca_key_path, _key_pem(ca_key))
            _write_private(ca_path, ca_cert.public_bytes(serialization.Encoding.PEM))
            log.info("created a private CA in %s", ca_path)
        if ca_cert.not_valid_after_utc - _now() < RENEW_BEFORE:
            log.warning(
                "the CA in %s expires on %s: move %s away and restart to make a new one (clients and agents then"
                " need the new fingerprint)",
                ca_path,
                f"{ca_cert.not_valid_after_utc:%Y-%m-%d}",
                d,
            )
        names = wanted_names(listen_host, extra_names)
        why: str | None = "there is none"
        if cert_path.exists() and key_path.exists():
            why = _server_cert_usable(x509.load_pem_x509_certificate(cert_path.read_bytes()), ca_cert, names)
        if why is not None:
            key, cert = make_server_cert(ca_key, ca_cert, names)
            _write_private(key_path, _key_pem(key))
            _write_private(cert_path, cert.public_bytes(serialization.Encoding.PEM))
            log.info("made a new server certificate in %s: %s", cert_path, why)
        ca_pem = ca_path.read_bytes()
        # The chain carries the CA too: `--ca-fingerprint` clients find the certificate to pin in it.
        return ServerTls(key_path.read_bytes(), cert_path.read_bytes() + ca_pem, ca_pem, ca_path, generated=True)
    except (OSError, ValueError) as e:
        raise TlsError(f"TLS material in {d}: {e}") from None


def load_admin_tls(cert_file: Path, key_file: Path) -> ServerTls:
    """An admin's certificate (with its chain, leaf first) and key; the CA shown is the chain's last."""
    try:
        chain_pem = cert_file.read_bytes()
        key_pem = key_file.read_bytes()
        certs = x509.load_pem_x509_certificates(chain_pem)
        serialization.load_pem_private_key(key_pem, password=None)
    except (OSError, ValueError) as e:
        raise TlsError(f"--tls-cert {cert_file} / --tls-key {key_file}: {e}") from None
    if key_file.stat().st_mode & 0o077:
        log.warning("%s is readable by other users of this host: `chmod 600 %s`", key_file, key_file)
    ca_pem = certs[-1].public_bytes(serialization.Encoding.PEM)
    return ServerTls(key_pem, chain_pem, ca_pem, None, generated=False)


def main(argv: list[str] | None = None) -> None:
    """`python -m dstack.coordinator.tls fingerprint FILE`: the fingerprint clients pin (for scripts)."""
    import sys

    args = sys.argv[1:] if argv is None else argv
    if len(args) != 2 or args[0] != "fingerprint":
        print("usage: python -m dstack.coordinator.tls fingerprint CA.pem", file=sys.stderr)
        sys.exit(2)
    print(fingerprint(Path(args[1]).read_bytes()))


if __name__ == "__main__":
    main()
