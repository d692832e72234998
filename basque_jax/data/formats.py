"""Record formats: a raw payload becomes a ``Document`` or a ``Conversation`` -- or ``BadRecord``.

- corpus: ``{"text": ...}`` (field name configurable);
- chat: ``{"messages" | "conversations": [{"role", "content"}, ...]}`` with an optional first
  system turn (ShareGPT ``{"from": "human"|"gpt", "value"}`` turns are accepted too);
- instruction: ``instruction`` (+ optional ``input``) with ``response`` or ``output``, or a bare
  ``input``/``output`` pair, optional ``system``; mapped onto a user/assistant conversation.

``BadRecord.reason`` is a short, stable category ("malformed JSON", "missing field 'text'")
used as the counter key in the skipped-record summary.
"""

from __future__ import annotations

import json
from typing import Any, NamedTuple

ROLES = ("system", "user", "assistant")
_ROLE_ALIASES = {"human": "user", "gpt": "assistant"}


class BadRecord(Exception):
    """The record cannot be used; ``reason`` says why."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


class Document(NamedTuple):
    """A corpus document."""

    text: str


class Conversation(NamedTuple):
    """Chat turns as ``(role, content)`` pairs, roles in ``ROLES``."""

    messages: list[tuple[str, str]]


def decode_payload(payload: bytes | str | dict) -> dict:
    """JSON bytes/str or a dict -> dict; raises ``BadRecord`` for bad UTF-8 or JSON."""
    if isinstance(payload, dict):
        return payload
    if isinstance(payload, bytes):
        try:
            payload = payload.decode("utf-8")
        except UnicodeDecodeError:
            raise BadRecord("invalid UTF-8") from None
    if not payload.strip():
        raise BadRecord("blank line")
    try:
        value = json.loads(payload)
    except json.JSONDecodeError:
        raise BadRecord("malformed JSON") from None
    if not isinstance(value, dict):
        raise BadRecord(f"not a JSON object ({type(value).__name__})")
    return value


def _string(value: Any, field: str) -> str:
    if isinstance(value, bytes):  # TFDS and plain-text sources give bytes
        try:
            value = value.decode("utf-8")
        except UnicodeDecodeError:
            raise BadRecord("invalid UTF-8") from None
    if not isinstance(value, str):
        raise BadRecord(f"mistyped field '{field}' ({type(value).__name__})")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise BadRecord("invalid UTF-8") from None  # lone surrogate from a \ud800 escape
    return value


def _field(record: dict, field: str) -> str:
    if field not in record or record[field] is None:
        raise BadRecord(f"missing field '{field}'")
    return _string(record[field], field)


def parse_document(record: dict, text_field: str = "text") -> Document:
    """A corpus record; empty or whitespace-only text is bad."""
    text = _field(record, text_field)
    if not text.strip():
        raise BadRecord("empty text")
    return Document(text)


def parse_chat(record: dict, messages_field: str | None = None) -> Conversation:
    """A chat record: a non-empty list of turns with known roles and string contents."""
    fields = [messages_field] if messages_field else ["messages", "conversations"]
    name = next((f for f in fields if f in record and record[f] is not None), None)
    if name is None:
        raise BadRecord(f"missing field '{'/'.join(fields)}'")
    turns = record[name]
    if not isinstance(turns, list):
        raise BadRecord(f"mistyped field '{name}' ({type(turns).__name__})")
    if not turns:
        raise BadRecord("empty conversation")
    messages = []
    for turn in turns:
        if not isinstance(turn, dict):
            raise BadRecord(f"mistyped turn ({type(turn).__name__})")
        role_key, content_key = ("role", "content") if "role" in turn else ("from", "value")
        role = turn.get(role_key)
        if not isinstance(role, str):
            raise BadRecord(f"missing field '{role_key}'" if role is None else "mistyped role")
        role = _ROLE_ALIASES.get(role, role)
        if role not in ROLES:
            raise BadRecord(f"unknown role '{role}'")
        messages.append((role, _field(turn, content_key)))
    return Conversation(messages)


def parse_instruction(record: dict) -> Conversation:
    """``instruction`` [+ ``input``] -> ``response``/``output``, or ``input`` -> ``output``."""
    answer_field = "response" if "response" in record else "output"
    if "instruction" in record:
        prompt = _field(record, "instruction")
        extra = record.get("input")
        if extra is not None and _string(extra, "input").strip():
            prompt = f"{prompt}\n\n{_string(extra, 'input')}"
    elif "input" in record:
        prompt = _field(record, "input")
    else:
        raise BadRecord("missing field 'instruction'/'input'")
    answer = _field(record, answer_field)
    if not prompt.strip() or not answer.strip():
        raise BadRecord("empty text")
    messages = [("user", prompt), ("assistant", answer)]
    if record.get("system") is not None:
        messages.insert(0, ("system", _string(record["system"], "system")))
    return Conversation(messages)


def parse_record(
    payload: bytes | str | dict,
    kind: str,
    *,
    text_field: str = "text",
    messages_field: str | None = None,
) -> Document | Conversation:
    """Decodes and parses one record of the given ``kind``; raises ``BadRecord``."""
    record = decode_payload(payload)
    if kind == "corpus":
        return parse_document(record, text_field)
    if kind == "chat":
        return parse_chat(record, messages_field)
    if kind == "instruction":
        return parse_instruction(record)
    raise ValueError(f"unknown source kind {kind!r}")
