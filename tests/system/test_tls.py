"""Native TLS on the chat port (``[server] tls_cert``, ``tls_key``), with certificates made by
``trustme``: wss:// chats, https:// serves the endpoints, a plain client gets nothing, and a
renewed certificate takes effect at ``chatctl reload``, without a restart. ``chatd --check``
refuses a certificate that does not load.
"""

from __future__ import annotations

import socket
import ssl
import subprocess
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from chatd.dev.fake_ollama.main import FakeOllama, FakeOllamaThread, expected_reply
from tests.support import BIN, Chatd, Client, chatctl, running_chatd, t, wait_for

trustme = pytest.importorskip("trustme", reason="NOT TESTED: pip install trustme (make test)")
pytestmark = pytest.mark.system


@pytest.fixture(scope="module")
def fake() -> Iterator[FakeOllama]:
    with FakeOllamaThread(FakeOllama(["qwen2.5-coder:7b"], tokens=4)) as f:
        yield f


def issue(ca: trustme.CA, tmp: Path, name: str) -> tuple[Path, Path]:
    cert = ca.issue_cert("127.0.0.1", "localhost", common_name=name)
    cert_path, key_path = tmp / f"{name}.pem", tmp / f"{name}.key"
    cert.cert_chain_pems[0].write_to_path(str(cert_path))
    for extra in cert.cert_chain_pems[1:]:
        extra.write_to_path(str(cert_path), append=True)
    cert.private_key_pem.write_to_path(str(key_path))
    return cert_path, key_path


def client_context(ca: trustme.CA) -> ssl.SSLContext:
    ctx = ssl.create_default_context()
    ca.configure_trust(ctx)
    return ctx


def served_name(d: Chatd, ctx: ssl.SSLContext) -> str:
    """The common name of the certificate a new connection is served."""
    with (
        socket.create_connection(("127.0.0.1", d.port), timeout=t(5)) as raw,
        ctx.wrap_socket(raw, server_hostname="127.0.0.1") as s,
    ):
        cert = s.getpeercert()
    assert cert is not None
    return next(v for ((k, v),) in cert["subject"] if k == "commonName")


def test_wss_https_and_a_renewed_certificate_at_reload(tmp_path: Path, fake: FakeOllama) -> None:
    ca = trustme.CA()
    cert, key = issue(ca, tmp_path, "first")
    ctx = client_context(ca)
    with running_chatd(
        tmp_path,
        fake.url,
        workers=2,
        server={"tls_cert": str(cert), "tls_key": str(key)},
    ) as d:
        url = d.url.replace("ws://", "wss://")
        c = Client(url, ssl=ctx)
        c.hello()
        assert c.ask("t", "over tls")[-1]["text"] == expected_reply("over tls", 4)
        with urllib.request.urlopen(f"https://127.0.0.1:{d.port}/healthz", context=ctx) as r:
            assert r.status == 200 and r.read() == b"ok\n"
        # A client speaking plain HTTP to the TLS port gets no answer it can read.
        with socket.create_connection(("127.0.0.1", d.port), timeout=t(5)) as s:
            s.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
            assert not s.recv(100).startswith(b"HTTP/1.1 200")
        assert served_name(d, ctx) == "first"
        # Renew: new files in place, chatctl reload; new connections get the new certificate,
        # the open one is not cut.
        issue(ca, tmp_path, "second")
        Path(tmp_path / "second.pem").replace(cert)
        Path(tmp_path / "second.key").replace(key)
        r = chatctl(d, "reload")
        assert r.returncode == 0, r.stdout + r.stderr
        wait_for(lambda: served_name(d, ctx) == "second", 10, "the renewed certificate")
        c.close()


def test_check_refuses_a_certificate_that_does_not_load(tmp_path: Path) -> None:
    ca = trustme.CA()
    cert, key = issue(ca, tmp_path, "one")
    _, other_key = issue(ca, tmp_path, "two")
    cases = {
        "missing": (f'tls_cert = "{tmp_path}/nope.pem"\ntls_key = "{key}"', "cannot load"),
        "mismatch": (f'tls_cert = "{cert}"\ntls_key = "{other_key}"', "cannot load"),
        "half": (f'tls_cert = "{cert}"', "server.tls_key: tls_cert and tls_key go together"),
    }
    for name, (lines, want) in cases.items():
        config = tmp_path / f"{name}.toml"
        config.write_text(f'[server]\nbind = "127.0.0.1:8000"\n{lines}\n')
        r = subprocess.run(
            [str(BIN / "chatd"), "--check", "--config", str(config)],
            capture_output=True,
            text=True,
            timeout=t(30),
        )
        assert r.returncode == 78, (name, r.stdout, r.stderr)
        assert want in r.stderr and f"{config}:" in r.stderr, (name, r.stderr)
    good = tmp_path / "good.toml"
    good.write_text('[server]\ntls_cert = "one.pem"\ntls_key = "one.key"\n')  # relative
    r = subprocess.run(
        [str(BIN / "chatd"), "--check", "--config", str(good)], capture_output=True, text=True
    )
    assert r.returncode == 0, r.stderr
