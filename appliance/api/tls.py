"""TLS for the HTTP listener (aiohttp and the fast path share one socket, so one context).

TLS 1.2 is the floor (1.0 and 1.1 are refused in the handshake); on 1.2 only forward-secret
AEAD suites (Mozilla's "intermediate" list: ECDHE with AES-GCM or ChaCha20-Poly1305, no CBC,
no RSA key exchange); TLS 1.3's suites are all AEAD and stay OpenSSL's default. With a client
CA, a client must present a certificate that CA signed (mutual TLS), else the handshake fails.
"""

from __future__ import annotations

import ssl

from ..config import Config
from ..errors import ConfigError

#: Mozilla's intermediate TLS 1.2 suites (https://wiki.mozilla.org/Security/Server_Side_TLS).
TLS12_CIPHERS = ":".join(
    (
        "ECDHE-ECDSA-AES128-GCM-SHA256",
        "ECDHE-RSA-AES128-GCM-SHA256",
        "ECDHE-ECDSA-AES256-GCM-SHA384",
        "ECDHE-RSA-AES256-GCM-SHA384",
        "ECDHE-ECDSA-CHACHA20-POLY1305",
        "ECDHE-RSA-CHACHA20-POLY1305",
    )
)


def server_context(cert: str, key: str, client_ca: str = "") -> ssl.SSLContext:
    """A server context for `cert` and `key` (PEM files); `client_ca`: require client
    certificates signed by it. A file that cannot be read or used is a ConfigError naming it."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.set_ciphers(TLS12_CIPHERS)
    ctx.options |= ssl.OP_NO_COMPRESSION | ssl.OP_NO_RENEGOTIATION
    try:
        ctx.load_cert_chain(cert, key)
    except FileNotFoundError as exc:
        raise ConfigError(f"server.tls_cert/tls_key: {exc.filename}: no such file") from None
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(
            f"server.tls_cert = {cert!r}, tls_key = {key!r}: not a usable certificate and "
            f"key (PEM): {exc}"
        ) from None
    if client_ca:
        try:
            ctx.load_verify_locations(cafile=client_ca)
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError(
                f"server.tls_client_ca = {client_ca!r}: not a usable CA file (PEM): {exc}"
            ) from None
        ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


def from_config(config: Config) -> ssl.SSLContext | None:
    """The HTTP listener's context, or None for plain HTTP."""
    server = config.server
    if not server.tls_cert:
        return None
    return server_context(server.tls_cert, server.tls_key, server.tls_client_ca)
