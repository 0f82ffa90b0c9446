"""TLS configuration for the server side.

The handshake itself runs in each connection's own thread (see
``Connection._tls_handshake``), never on the accept loop, so a client that
connects and says nothing costs one thread until the handshake timeout, not
the whole server.
"""

from __future__ import annotations

import ssl

from ._exceptions import ConfigurationError


def server_tls_context(
    certfile: str, keyfile: str | None = None, client_ca: str | None = None
) -> ssl.SSLContext:
    """A server context with the ssl module's secure defaults.

    With ``client_ca``, clients must present a certificate signed by it.
    """
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    try:
        # A passphrase is never asked for: OpenSSL would prompt on the
        # terminal, blocking the start (and every worker would prompt again).
        context.load_cert_chain(certfile, keyfile, password=_refuse_passphrase)
    except _EncryptedKey:
        raise ConfigurationError(
            f"the private key in {keyfile or certfile!r} is encrypted; "
            "give a key without a passphrase"
        ) from None
    except (OSError, ssl.SSLError) as exc:
        raise ConfigurationError(
            f"cannot load TLS certificate {certfile!r}"
            + (f" with key {keyfile!r}" if keyfile else "")
            + f": {_what_is_missing(certfile, keyfile) or exc}"
        ) from exc
    if client_ca is not None:
        try:
            context.load_verify_locations(client_ca)
        except (OSError, ssl.SSLError) as exc:
            raise ConfigurationError(f"cannot load client CA {client_ca!r}: {exc}") from exc
        context.verify_mode = ssl.CERT_REQUIRED
    return context


class _EncryptedKey(Exception):
    pass


def _refuse_passphrase() -> str:
    raise _EncryptedKey


def _what_is_missing(certfile: str, keyfile: str | None) -> str | None:
    """Why loading failed, when a file lacks the PEM block it must hold; None otherwise.

    OpenSSL's own message for both cases is "PEM lib", which says neither
    which file nor what is missing.
    """
    try:
        with open(certfile, "rb") as cert:
            cert_text = cert.read()
        key_text = cert_text
        if keyfile is not None:
            with open(keyfile, "rb") as key:
                key_text = key.read()
    except OSError:
        return None  # Missing or unreadable: OpenSSL's message names the cause.
    if b"-----BEGIN CERTIFICATE-----" not in cert_text:
        return f"{certfile!r} holds no PEM certificate"
    if b"PRIVATE KEY-----" not in key_text:
        if keyfile is None:
            return f"{certfile!r} holds no private key; give the key file as well"
        return f"{keyfile!r} holds no PEM private key"
    return None
