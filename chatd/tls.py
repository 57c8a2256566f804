"""Native TLS for the chat port: the server's ``ssl.SSLContext`` from ``[server] tls_cert``
and ``tls_key``.

Shared by the configuration (``chatd --check`` and a reload load the files, so a certificate
that does not load is refused before any worker starts) and the worker (each new worker, of a
reload or replacing one that died, builds its context at start from the files: a renewed
certificate takes effect at ``chatctl reload``, with no restart). The TLS handshake must end
within ``hello_timeout`` (websockets passes it as ``ssl_handshake_timeout``). TLS 1.2 at
least, Python's default ciphers; no client certificates.
"""

from __future__ import annotations

import ssl


def server_context(cert: str, key: str) -> ssl.SSLContext:
    """A server context with the certificate chain ``cert`` and its private key ``key``.

    Raises:
        OSError: a file cannot be read.
        ssl.SSLError: the files are not a PEM certificate and its matching key.
    """
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(cert, key)
    return ctx
