"""The ``class`` field of the slot messages: named once here, absent for chat."""

from __future__ import annotations

from typing import Any

import pytest

from chatd.proto import control as proto


def test_the_class_names_are_fixed() -> None:
    """Workers and the master of one daemon agree on them; scripts see them in the docs."""
    assert (proto.SLOT_CLASS, proto.SLOT_CLASS_CHAT, proto.SLOT_CLASS_EMBED) == (
        "class",
        "chat",
        "embed",
    )
    assert proto.SLOT_CLASSES == ("chat", "embed")


def test_a_chat_message_gets_no_field_and_keeps_its_bytes() -> None:
    msg = {proto.T: proto.SLOT_ACQUIRE, "rid": 1, "exclude": []}
    before = proto.encode(msg)
    assert proto.with_class(msg, proto.SLOT_CLASS_CHAT) is msg
    assert proto.encode(msg) == before
    embed = proto.with_class(dict(msg), proto.SLOT_CLASS_EMBED)
    assert embed == {**msg, "class": "embed"}


@pytest.mark.parametrize(
    ("msg", "kind"),
    [
        ({proto.T: proto.SLOT_GRANT}, "chat"),
        ({proto.T: proto.SLOT_GRANT, "class": "chat"}, "chat"),  # tolerated, never sent
        ({proto.T: proto.SLOT_GRANT, "class": "embed"}, "embed"),
        ({proto.T: proto.SLOT_GRANT, "class": "Embed"}, None),
        ({proto.T: proto.SLOT_GRANT, "class": None}, None),
        ({proto.T: proto.SLOT_GRANT, "class": ["embed"]}, None),
    ],
)
def test_slot_class_of_a_message(msg: dict[str, Any], kind: str | None) -> None:
    assert proto.slot_class(msg) == kind
