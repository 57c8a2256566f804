"""The oracle shared by the NDJSON and SSE fuzz targets (not a target itself).

Contracts checked (chatd.relay.wire's module docstring): any bytes give reply pieces or a
WireError of a documented kind, never another exception; the outcome does not depend on how
the bytes are cut into reads; a prefix of a body that decodes whole decodes to a prefix of
its pieces, or raises WireError("truncated").
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from chatd.relay.wire import OllamaDecoder, OpenAIDecoder, WireError, decode_body

KINDS = ("error", "malformed", "too_long", "truncated")
Decoder = OllamaDecoder | OpenAIDecoder


def outcome(make: Callable[[], Decoder], reads: list[bytes]) -> tuple[Any, ...]:
    decoder = make()
    try:
        pieces = decode_body(reads, decoder)
    except WireError as exc:
        assert exc.kind in KINDS, exc.kind
        return ("error", exc.kind)
    assert decoder.complete, "decode_body returned for a stream that is not complete"
    return ("ok", pieces, decoder.done_reason, decoder.eval_count)


def reads_of(data: bytes, size: int) -> list[bytes]:
    return [data[i : i + size] for i in range(0, len(data), size)]


def check(make: Callable[[], Decoder], data: bytes) -> None:
    whole = outcome(make, [data])
    for size in (1, 3, 61) if len(data) < 1024 else (61, 509):
        got = outcome(make, reads_of(data, size))
        assert got == whole, (size, got, whole)
    if whole[0] != "ok":
        return
    for k in {len(data) // 3, len(data) // 2, max(0, len(data) - 1)}:
        cut = outcome(make, [data[:k]])
        if cut[0] == "ok":
            assert whole[1][: len(cut[1])] == cut[1], (k, cut, whole)
        else:
            assert cut == ("error", "truncated"), (k, cut, whole)
