"""How the CLI and the agent reach a coordinator over TCP: TLS pinned to a CA, or plaintext when told so.

Standard library only (and grpc where a channel is made): the CLI imports this on every command that
talks to a team coordinator, and `cryptography` costs tens of milliseconds to import. The coordinator
makes its certificates with dstack.coordinator.tls.

- Fingerprints are `SHA256:` and 64 lowercase hex digits of the SHA-256 of the certificate's DER bytes
  (`openssl x509 -noout -fingerprint -sha256 -in ca.pem` prints the same digits, upper case with colons;
  both forms are accepted).
- Pinning by fingerprint reads the chain the server presents once, without verifying it (that is what
  the fingerprint is for), keeps the certificate whose fingerprint matches, and refuses when none does:
  nothing else is sent on that connection. From then on the saved CA is verified as usual.
- Servers of a coordinator's private CA (its subject holds CA_MARKER) are verified against the fixed
  name SERVER_NAME, which the coordinator puts in every server certificate: clients reach it by any
  address. An admin's own CA: the server is verified against the address's host name, as usual.
"""

from __future__ import annotations

import base64
import os
import re
import socket
from typing import TYPE_CHECKING, NamedTuple

# hashlib (OpenSSL's libcrypto, ~3 ms) and pathlib (~3 ms) are not needed to open a channel, which is all
# most commands do with this module: they are imported where a fingerprint is taken or a path is built.
if TYPE_CHECKING:
    import ssl
    from pathlib import Path

    import grpc

SERVER_NAME = "dstack-coordinator"
CA_MARKER = "dstack coordinator CA"
PREFIX = "SHA256:"
_PEM_CERT = re.compile(rb"-----BEGIN CERTIFICATE-----\s*(.+?)\s*-----END CERTIFICATE-----", re.S)


class TlsSetupError(Exception):
    """A CA file or fingerprint that cannot be used; the message says what to do."""


class FingerprintMismatch(TlsSetupError):
    """The server presented no certificate with the pinned fingerprint: not the coordinator it should be."""


def der_certs(pem: bytes) -> list[bytes]:
    """The DER bytes of each certificate in a PEM file (text around the blocks is ignored)."""
    return [base64.b64decode(b"".join(m.group(1).split())) for m in _PEM_CERT.finditer(pem)]


def der_to_pem(der: bytes) -> bytes:
    body = base64.encodebytes(der).decode().replace("\n", "")
    lines = [body[i : i + 64] for i in range(0, len(body), 64)]
    return ("-----BEGIN CERTIFICATE-----\n" + "\n".join(lines) + "\n-----END CERTIFICATE-----\n").encode()


def fingerprint_der(der: bytes) -> str:
    import hashlib

    return PREFIX + hashlib.sha256(der).hexdigest()


def fingerprint(pem: bytes) -> str:
    """The fingerprint of the first certificate in `pem`."""
    certs = der_certs(pem)
    if not certs:
        raise TlsSetupError("no PEM certificate in it")
    return fingerprint_der(certs[0])


def parse_fingerprint(text: str) -> str:
    """`SHA256:` + 64 hex digits (colons and case as openssl prints them are fine), normalized."""
    body = text.strip()
    if body.upper().startswith(PREFIX):
        body = body[len(PREFIX) :]
    digits = body.replace(":", "").lower()
    if not re.fullmatch(r"[0-9a-f]{64}", digits):
        raise TlsSetupError(
            f"{text!r} is not a CA fingerprint: expected SHA256: and 64 hex digits, as `dstack server` prints it"
        )
    return PREFIX + digits


def is_dstack_ca(pem: bytes) -> bool:
    """Whether `pem` is a coordinator's private CA (its servers answer to SERVER_NAME).

    A plain byte search of the certificate's name: the only thing it decides is the name verified, never
    whether the CA is trusted."""
    return any(CA_MARKER.encode() in der for der in der_certs(pem))


def split_address(address: str) -> tuple[str, int]:
    """HOST:PORT or [IPv6]:PORT (gRPC's `dns:///` prefix allowed) -> (host, port)."""
    addr = address.removeprefix("dns:///").removeprefix("dns:")
    host, sep, port = addr.rpartition(":")
    if not sep or not port.isdigit():
        raise TlsSetupError(f"{address!r} is not HOST:PORT")
    return host.strip("[]"), int(port)


def _unverified_context() -> ssl.SSLContext:
    import ssl  # here: the CLI's common commands never need it

    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE  # reading the chain to compare fingerprints: nothing is trusted yet
    ctx.set_alpn_protocols(["h2"])  # as gRPC's clients do
    return ctx


def presented_chain(address: str, timeout: float = 10.0) -> list[bytes]:
    """The DER certificates the server at `address` presents, leaf first; OSError/SSLError if it cannot."""
    host, port = split_address(address)
    with socket.create_connection((host, port), timeout=timeout) as raw:
        with _unverified_context().wrap_socket(raw, server_hostname=SERVER_NAME) as tls:
            public = getattr(tls, "get_unverified_chain", None)  # Python 3.13+
            if public is not None:
                return [bytes(c) for c in public()]
            # 3.11 and 3.12 have it on the C object only (it became public API in 3.13).
            chain = tls._sslobj.get_unverified_chain()  # type: ignore[attr-defined]
            import _ssl

            return [c.public_bytes(_ssl.ENCODING_DER) for c in chain or []]


def pin_by_fingerprint(address: str, expected: str, timeout: float = 10.0) -> bytes:
    """The PEM of the certificate in the server's chain whose fingerprint is `expected`.

    FingerprintMismatch when none is; OSError (or ssl.SSLError) when the server cannot be reached or does
    not speak TLS. Nothing but the handshake is sent."""
    expected = parse_fingerprint(expected)
    chain = presented_chain(address, timeout)
    for der in chain:
        if fingerprint_der(der) == expected:
            return der_to_pem(der)
    seen = ", ".join(fingerprint_der(d) for d in chain) or "none"
    raise FingerprintMismatch(
        f"the certificate of the coordinator at {address} does not match the pinned CA: expected {expected},"
        f" it presented {seen}. Check the fingerprint `dstack server` printed; if it is right, something"
        " between you and the coordinator is answering in its place"
    )


def speaks_tls(address: str, timeout: float = 3.0) -> bool:
    """Whether a TLS handshake with `address` completes (for error messages only)."""
    try:
        presented_chain(address, timeout)
    except (OSError, TlsSetupError):
        return False
    return True


def save_pem(path: Path, pem: bytes) -> None:
    """Writes a pinned CA as 0600 (replacing any older one at once)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.fchmod(fd, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(pem)
    os.replace(tmp, path)


def read_ca_file(path: str | os.PathLike[str]) -> bytes:
    try:
        with open(path, "rb") as f:
            pem = f.read()
    except OSError as e:
        raise TlsSetupError(f"CA file {path}: {e.strerror or e}") from None
    if not der_certs(pem):
        raise TlsSetupError(f"CA file {path}: no PEM certificate in it (give the coordinator's STATE_DIR/tls/ca.pem)")
    return pem


class Transport(NamedTuple):
    """How to reach a coordinator over TCP.

    insecure: plaintext. Else TLS, verified against `ca_pem` when given, else against the system's roots."""

    insecure: bool = False
    ca_pem: bytes | None = None
    ca_source: str = ""  # where ca_pem came from, for error messages

    @property
    def server_name(self) -> str | None:
        return SERVER_NAME if self.ca_pem is not None and is_dstack_ca(self.ca_pem) else None

    def options(self) -> list[tuple[str, str]]:
        name = self.server_name
        return [("grpc.ssl_target_name_override", name)] if name and not self.insecure else []

    def credentials(self) -> grpc.ChannelCredentials:
        import grpc

        return grpc.ssl_channel_credentials(root_certificates=self.ca_pem)


# gRPC's words for handshake failures (its UNAVAILABLE details carry BoringSSL's reason).
_UNTRUSTED = ("CERTIFICATE_VERIFY_FAILED", "certificate verify failed", "Peer name", "is not in peer certificate")
_NOT_TLS = ("WRONG_VERSION_NUMBER", "wrong version number", "PACKET_LENGTH_TOO_LONG", "RECORD_TOO_LARGE")


def handshake_failure(details: str) -> str | None:
    """'untrusted' (the server's certificate failed verification), 'plaintext' (the server does not speak
    TLS), or None when `details` is not a handshake failure."""
    if any(w in details for w in _UNTRUSTED):
        return "untrusted"
    if any(w in details for w in _NOT_TLS):
        return "plaintext"
    return None
