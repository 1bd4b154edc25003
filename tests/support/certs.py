"""A self-made PKI for TLS tests (the `cryptography` package; nothing is downloaded): a CA, a
server certificate for localhost and 127.0.0.1, a client certificate signed by the CA, and a
client certificate signed by another CA (one the server must not trust)."""

from __future__ import annotations

import datetime as dt
import ipaddress
from pathlib import Path
from typing import Any


def make_pki(out: Path) -> dict[str, Path]:
    """Files `ca.crt`, `server.crt`/`.key`, `client.crt`/`.key`, `stranger.crt`/`.key` (the
    last signed by `other-ca.crt`) in `out`, by name."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    out.mkdir(parents=True, exist_ok=True)
    now = dt.datetime.now(dt.timezone.utc)

    def name(cn: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])

    def cert(cn: str, key: Any, issuer: x509.Name, issuer_key: Any, ca: bool = False,
             san: list[x509.GeneralName] | None = None) -> x509.Certificate:  # fmt: skip
        b = (
            x509.CertificateBuilder()
            .subject_name(name(cn))
            .issuer_name(issuer)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        )
        if ca:
            usage = dict.fromkeys(
                ("digital_signature", "content_commitment", "key_encipherment",
                 "data_encipherment", "key_agreement", "encipher_only", "decipher_only"),
                False,
            )  # fmt: skip
            b = b.add_extension(
                x509.KeyUsage(**usage, key_cert_sign=True, crl_sign=True), critical=True
            )
        if san:
            b = b.add_extension(x509.SubjectAlternativeName(san), critical=False)
        return b.sign(issuer_key, hashes.SHA256())

    files: dict[str, Path] = {}

    def write(stem: str, key: Any, certificate: x509.Certificate) -> None:
        files[f"{stem}.key"] = out / f"{stem}.key"
        files[f"{stem}.key"].write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
        files[f"{stem}.crt"] = out / f"{stem}.crt"
        files[f"{stem}.crt"].write_bytes(certificate.public_bytes(serialization.Encoding.PEM))

    def key() -> Any:
        return ec.generate_private_key(ec.SECP256R1())

    ca_key, other_key = key(), key()
    write("ca", ca_key, cert("test ca", ca_key, name("test ca"), ca_key, ca=True))
    write("other-ca", other_key, cert("other ca", other_key, name("other ca"), other_key, ca=True))
    san: list[x509.GeneralName] = [
        x509.DNSName("localhost"),
        x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
    ]
    server_key = key()
    write("server", server_key, cert("localhost", server_key, name("test ca"), ca_key, san=san))
    client_key = key()
    write("client", client_key, cert("client", client_key, name("test ca"), ca_key))
    stranger_key = key()
    write("stranger", stranger_key, cert("client", stranger_key, name("other ca"), other_key))
    return files
