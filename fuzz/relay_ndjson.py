"""Fuzz target: Ollama's NDJSON stream as the relay decodes it (LineSplitter + OllamaDecoder).

    .venv/bin/python fuzz/relay_ndjson.py -max_total_time=60 fuzz/corpus/relay_ndjson/

Each input is a response body; see fuzz/_wire_oracle.py for what is checked. atheris is not
a dependency of chatd (``pip install atheris`` to run this).
"""

from __future__ import annotations

import sys

import atheris

with atheris.instrument_imports():
    from _wire_oracle import check

    from chatd.relay.wire import OllamaDecoder


def test_one_input(data: bytes) -> None:
    check(OllamaDecoder, data)


if __name__ == "__main__":
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()
