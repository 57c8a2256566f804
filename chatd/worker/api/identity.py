"""Who sends an API request: its bearer token checked, and the *key* it is queued under.

The key names the client for the master's slot queue (round robin across keys, bounded per
key) and for the per-key figures; it is never a secret:

* with ``[auth] tokens``, every request must carry one (``Authorization: Bearer T``, or HTTP
  Basic with the token as the password, which LangChain sends for ``user:pass@host`` URLs);
  the key is then the hash of the token, the same as the WebSocket sessions opened with it
  (:func:`chatd.worker.session.owner_of`), so a client counts once whatever it speaks;
* with ``[api] user_header`` set and the request coming from ``[api] trusted_proxies``, the
  user the proxy names (Open WebUI's ``X-OpenWebUI-User-Id``) is a client of its own: the key
  is the token's hash (or ``u``) followed by ``/`` and a hash of the user. A proxy holding one
  token for all its users would otherwise be one client;
* else the client's IP address.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import ipaddress
from collections.abc import Sequence

from websockets.datastructures import Headers

from chatd.config import Config
from chatd.worker.httpconn import single


def bearer(headers: Headers) -> str:
    """The token of ``Authorization: Bearer T`` (or of Basic auth: the password, else the
    user); "" when there is none."""
    auth = single(headers, "Authorization")
    scheme, _, value = auth.partition(" ")
    if scheme.lower() == "bearer":
        return value.strip()
    if scheme.lower() == "basic":
        try:
            user, _, password = (
                base64.b64decode(value.strip(), validate=True).decode().partition(":")
            )
        except (binascii.Error, UnicodeDecodeError):
            return ""
        return password or user
    return ""


def token_hash(token: str) -> str:
    """The key of a token (as the WebSocket side names it)."""
    return hashlib.sha256(token.encode()).hexdigest()[:32]


class Identity:
    """Checks tokens and names keys for one worker's configuration."""

    def __init__(self, cfg: Config) -> None:
        self._tokens = [t.encode() for t in cfg.auth.tokens]
        self._header = cfg.api.user_header
        self._trusted: Sequence[ipaddress.IPv4Network | ipaddress.IPv6Network] = [
            ipaddress.ip_network(n, strict=False) for n in cfg.api.trusted_proxies
        ]

    @property
    def auth_on(self) -> bool:
        return bool(self._tokens)

    def allowed(self, headers: Headers) -> bool:
        """Whether the request may use the APIs (always, when auth is off)."""
        if not self._tokens:
            return True
        got = bearer(headers).encode()
        # Every token compared, in constant time each: no early exit tells which matched.
        return any([hmac.compare_digest(got, t) for t in self._tokens]) and bool(got)

    def key(self, headers: Headers, peer: str) -> str:
        """The client's key (see the module); call after :meth:`allowed`."""
        base = token_hash(bearer(headers)) if self._tokens else peer
        if self._header and self._is_trusted(peer):
            user = single(headers, self._header)
            if user:
                digest = hashlib.sha256(user.encode()).hexdigest()[:16]
                return f"{base if self._tokens else 'u'}/{digest}"
        return base

    def _is_trusted(self, peer: str) -> bool:
        try:
            addr = ipaddress.ip_address(peer)
        except ValueError:
            return False
        return any(addr in net for net in self._trusted)
