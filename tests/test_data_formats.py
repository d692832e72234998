"""Record formats: corpus, chat (messages/conversations, ShareGPT), instruction pairs."""

from __future__ import annotations

import pytest

from basque_jax.data.formats import BadRecord, Conversation, Document, parse_record


def test_corpus_and_custom_field():
    assert parse_record(b'{"text": "Kaixo"}', "corpus") == Document("Kaixo")
    assert parse_record({"body": "Kaixo"}, "corpus", text_field="body") == Document("Kaixo")
    assert parse_record({"text": b"Kaixo"}, "corpus") == Document("Kaixo")  # TFDS bytes


def test_chat_messages_conversations_and_sharegpt():
    turns = [{"role": "system", "content": "S"}, {"role": "user", "content": "U"},
             {"role": "assistant", "content": "A"}]
    want = Conversation([("system", "S"), ("user", "U"), ("assistant", "A")])
    assert parse_record({"messages": turns}, "chat") == want
    assert parse_record({"conversations": turns}, "chat") == want
    share = [{"from": "human", "value": "U"}, {"from": "gpt", "value": "A"}]
    assert parse_record({"conversations": share}, "chat") == Conversation(
        [("user", "U"), ("assistant", "A")]
    )
    assert parse_record({"dialog": turns}, "chat", messages_field="dialog") == want


@pytest.mark.parametrize(
    ("record", "turns"),
    [
        ({"instruction": "Itzuli", "response": "Eginda"},
         [("user", "Itzuli"), ("assistant", "Eginda")]),
        ({"instruction": "Itzuli", "input": "cat", "output": "katua"},
         [("user", "Itzuli\n\ncat"), ("assistant", "katua")]),
        ({"instruction": "Itzuli", "input": "", "output": "x"},
         [("user", "Itzuli"), ("assistant", "x")]),
        ({"input": "Galdera", "output": "Erantzuna"},
         [("user", "Galdera"), ("assistant", "Erantzuna")]),
        ({"system": "S", "instruction": "I", "response": "R"},
         [("system", "S"), ("user", "I"), ("assistant", "R")]),
    ],
)
def test_instruction_pairs_map_onto_chat(record, turns):
    assert parse_record(record, "instruction") == Conversation(turns)


@pytest.mark.parametrize(
    ("payload", "kind", "reason"),
    [
        (b'{"text": "x"', "corpus", "malformed JSON"),
        (b"\xff\xfe{}", "corpus", "invalid UTF-8"),
        (b'{"text": "\\ud800"}', "corpus", "invalid UTF-8"),
        (b"   ", "corpus", "blank line"),
        (b"[1, 2]", "corpus", "not a JSON object (list)"),
        (b'{"txt": "x"}', "corpus", "missing field 'text'"),
        (b'{"text": null}', "corpus", "missing field 'text'"),
        (b'{"text": 5}', "corpus", "mistyped field 'text' (int)"),
        (b'{"text": " \\n "}', "corpus", "empty text"),
        (b'{"messages": []}', "chat", "empty conversation"),
        (b'{"messages": "hi"}', "chat", "mistyped field 'messages' (str)"),
        (b'{"turns": []}', "chat", "missing field 'messages/conversations'"),
        (b'{"messages": [{"role": "robot", "content": "x"}]}', "chat", "unknown role 'robot'"),
        (b'{"messages": [{"role": "user"}]}', "chat", "missing field 'content'"),
        (b'{"messages": [{"role": "user", "content": 1}]}', "chat",
         "mistyped field 'content' (int)"),
        (b'{"messages": [{"content": "x"}]}', "chat", "missing field 'from'"),
        (b'{"messages": ["x"]}', "chat", "mistyped turn (str)"),
        (b'{"instruction": "x"}', "instruction", "missing field 'output'"),
        (b'{"response": "x"}', "instruction", "missing field 'instruction'/'input'"),
        (b'{"instruction": " ", "response": "x"}', "instruction", "empty text"),
    ],
)
def test_bad_records_name_the_reason(payload, kind, reason):
    with pytest.raises(BadRecord) as e:
        parse_record(payload, kind)
    assert e.value.reason == reason
