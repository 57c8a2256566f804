"""Who an API request is: its token checked, its key (chatd.worker.api.identity)."""

from __future__ import annotations

import base64
import hashlib

from websockets.datastructures import Headers

from chatd.config import ApiConfig, AuthConfig, Config
from chatd.worker.api.identity import Identity, bearer, token_hash


def cfg(tokens: tuple[str, ...] = (), header: str = "", proxies: tuple[str, ...] = ()) -> Config:
    api = ApiConfig(user_header=header, trusted_proxies=proxies)
    return Config(auth=AuthConfig(tokens=tokens), api=api)


def basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


def test_bearer_and_basic() -> None:
    assert bearer(Headers({"Authorization": "Bearer abc "})) == "abc"
    assert bearer(Headers({"Authorization": "bearer abc"})) == "abc"
    assert bearer(Headers({"Authorization": basic("me", "tok")})) == "tok"
    assert bearer(Headers({"Authorization": basic("tok", "")})) == "tok"  # a key as user name
    assert bearer(Headers({"Authorization": "Basic !!!"})) == ""
    assert bearer(Headers({"Authorization": "Digest x"})) == ""
    assert bearer(Headers()) == ""


def test_auth_off_admits_everyone_under_their_address() -> None:
    ident = Identity(cfg())
    assert not ident.auth_on
    assert ident.allowed(Headers())
    assert ident.key(Headers({"Authorization": "Bearer made-up"}), "10.0.0.7") == "10.0.0.7"


def test_auth_on_needs_a_listed_token_and_keys_by_its_hash() -> None:
    ident = Identity(cfg(tokens=("t1", "t2")))
    assert not ident.allowed(Headers())
    assert not ident.allowed(Headers({"Authorization": "Bearer t3"}))
    assert not ident.allowed(Headers({"Authorization": "Bearer "}))
    assert ident.allowed(Headers({"Authorization": "Bearer t2"}))
    assert ident.allowed(Headers({"Authorization": basic("user", "t1")}))
    key = ident.key(Headers({"Authorization": "Bearer t2"}), "10.0.0.7")
    assert key == token_hash("t2") == hashlib.sha256(b"t2").hexdigest()[:32]
    assert "t2" not in key


def test_a_trusted_proxy_names_its_users() -> None:
    ident = Identity(cfg(header="X-OpenWebUI-User-Id", proxies=("10.1.0.0/16",)))
    alice = Headers({"X-OpenWebUI-User-Id": "alice"})
    bob = Headers({"X-OpenWebUI-User-Id": "bob"})
    a, b = ident.key(alice, "10.1.2.3"), ident.key(bob, "10.1.2.3")
    assert a != b and a.startswith("u/") and "alice" not in a
    # From elsewhere the header is not believed: the address is the key.
    assert ident.key(alice, "192.168.1.1") == "192.168.1.1"
    assert ident.key(alice, "not-an-ip") == "not-an-ip"
    assert ident.key(Headers(), "10.1.2.3") == "10.1.2.3"


def test_by_default_no_proxy_is_trusted() -> None:
    ident = Identity(cfg(header="X-User"))
    assert ident.key(Headers({"X-User": "mallory"}), "127.0.0.1") == "127.0.0.1"


def test_a_repeated_header_is_believed_in_neither_value() -> None:
    ident = Identity(cfg(tokens=("t",), header="X-User", proxies=("127.0.0.1/32",)))
    two_tokens = Headers([("Authorization", "Bearer t"), ("Authorization", "Bearer t")])
    assert not ident.allowed(two_tokens)
    two_users = Headers([("Authorization", "Bearer t"), ("X-User", "a"), ("X-User", "b")])
    assert ident.key(two_users, "127.0.0.1") == token_hash("t")


def test_with_auth_the_user_refines_the_tokens_key() -> None:
    ident = Identity(cfg(tokens=("t",), header="X-User", proxies=("127.0.0.1/32",)))
    h = Headers({"Authorization": "Bearer t", "X-User": "carol"})
    key = ident.key(h, "127.0.0.1")
    assert key.startswith(token_hash("t") + "/")
