"""``[sessions]`` for Redis: the three URL forms, and ``min_replicas_acks``.

``chatd --check`` must refuse what the store would refuse when a worker connects, and the store
connects with what :func:`chatd.config_checks.parse_redis_url` made of the URL.
"""

from __future__ import annotations

import pytest

from chatd import config
from chatd.config_checks import RedisUrl, parse_redis_url
from chatd.errors import ConfigError
from chatd.store.redis_topology import redacted


@pytest.mark.parametrize(
    ("url", "want"),
    [
        ("redis://127.0.0.1:6379/0", RedisUrl("single", (("127.0.0.1", 6379),))),
        ("rediss://:s3cret@h/2", RedisUrl("single", (("h", 6379),), True, None, "s3cret", 2)),
        (
            "redis+sentinel://u:p%40ss@a:26380,b,[::1]:1/mymaster/3",
            RedisUrl(
                "sentinel",
                (("a", 26380), ("b", 26379), ("::1", 1)),
                False,
                "u",
                "p@ss",
                3,
                "mymaster",
            ),
        ),
        ("redis+sentinel://a/m/", RedisUrl("sentinel", (("a", 26379),), master="m")),
        (
            "rediss+cluster://a:7000,b:7001/0",
            RedisUrl("cluster", (("a", 7000), ("b", 7001)), tls=True),
        ),
        ("redis+cluster://a", RedisUrl("cluster", (("a", 6379),))),
    ],
)
def test_redis_url_forms(url: str, want: RedisUrl) -> None:
    assert parse_redis_url(url) == want
    assert config.parse(f'[sessions]\nstore = "{url}"').sessions.store == url


@pytest.mark.parametrize(
    ("url", "why"),
    [
        ("redis+sentinel://a,b", "is not /MASTER"),
        ("redis+sentinel://a/m/x", "is not /MASTER"),
        ("redis+cluster://a/1", "database 0 only"),
        ("redis+cluster://a,,b", "no host"),
        ("redis+cluster://a:99999", "port must be"),
        ("redis://h/0?x=1", "must be"),
        ("redis+ha://h", "must be"),
        ("redis+sentinel://a b/m", "is not a host name"),
    ],
)
def test_bad_redis_urls_are_refused_at_check(url: str, why: str) -> None:
    with pytest.raises(ConfigError) as err:
        config.parse(f'[sessions]\nstore = "{url}"')
    [problem] = err.value.problems
    assert "sessions.store" in problem and why in problem, problem


def test_passwords_never_in_messages() -> None:
    url = "redis+sentinel://:hunter2@a:1,b:2/m"
    assert "hunter2" not in repr(parse_redis_url(url))
    assert redacted(url) == "redis+sentinel://:***@a:1,b:2/m"


def test_min_replicas_acks_needs_redis() -> None:
    cfg = config.parse(
        '[sessions]\nstore = "redis+sentinel://a/m"\nmin_replicas_acks = 1\n'
        "min_replicas_timeout = 0.25\n"
    )
    assert (cfg.sessions.min_replicas_acks, cfg.sessions.min_replicas_timeout) == (1, 0.25)
    assert config.Config().sessions.min_replicas_acks == 0  # the default: the master alone
    with pytest.raises(ConfigError) as err:
        config.parse("[sessions]\nmin_replicas_acks = 1\nmin_replicas_timeout = 0\n")
    assert len(err.value.problems) == 2, err.value.problems
    assert "min_replicas_acks: needs a Redis store" in err.value.problems[1]
    assert "min_replicas_timeout: must be > 0" in err.value.problems[0]
