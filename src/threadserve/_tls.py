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
        context.load_cert_chain(certfile, keyfile)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigurationError(
            f"cannot load TLS certificate {certfile!r}"
            + (f" with key {keyfile!r}" if keyfile else "")
            + f": {exc}"
        ) from exc
    if client_ca is not None:
        try:
            context.load_verify_locations(client_ca)
        except (OSError, ssl.SSLError) as exc:
            raise ConfigurationError(f"cannot load client CA {client_ca!r}: {exc}") from exc
        context.verify_mode = ssl.CERT_REQUIRED
    return context
