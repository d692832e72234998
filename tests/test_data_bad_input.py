"""Bad input through the whole pipeline: skipped and counted, summarized, or a clear error."""

from __future__ import annotations

import pytest
from _data_utils import write_jsonl

from basque_jax.data.config import DataConfig
from basque_jax.data.demo_tokenizer import build_demo_tokenizer
from basque_jax.data.pipeline import make_pipeline, pipeline_stats, pipeline_summary
from basque_jax.data.stats import CHECK_AFTER, DataError
from basque_jax.errors import InputNotFound

GOOD_DOC = {"text": "Kaixo mundua, zer moduz?"}
GOOD_CHAT = {"messages": [{"role": "user", "content": "Zer da hau?"},
                          {"role": "assistant", "content": "Proba bat."}]}


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return build_demo_tokenizer(tmp_path_factory.mktemp("demo_tok"))


def config(*sources, **kw) -> DataConfig:
    d = {"sources": list(sources), "seq_len": 128, "batch_size": 2, "epochs": 1,
         "drop_remainder": False, "max_bad_fraction": 1.0}
    return DataConfig.from_dict({**d, **kw})


def run(cfg, tok):
    it = make_pipeline(cfg, tok)
    batches = list(it)
    return batches, pipeline_stats(it), pipeline_summary(it)


def test_every_bad_case_is_skipped_and_counted(tmp_path, tok):
    corpus = write_jsonl(tmp_path / "corpus.jsonl", [
        GOOD_DOC,
        '{"text": "no closing brace"',          # 2 malformed JSON
        {"title": "no text"},                  # 3 missing field
        {"text": 42},                          # 4 mistyped field
        {"text": "   "},                       # 5 empty text
        b'{"text": "bad \xff byte"}',          # 6 invalid UTF-8
        '{"text": "lone \\ud800 surrogate"}',  # 7 invalid UTF-8 (escape)
        GOOD_DOC,
    ])
    chat = write_jsonl(tmp_path / "chat.jsonl", [
        GOOD_CHAT,
        {"messages": [{"role": "robot", "content": "x"}]},                 # 2 unknown role
        {"messages": [{"role": "user", "content": "galdera bakarrik"}]},  # 3 nothing to train
        {"messages": [{"role": "user", "content": 7}]},                   # 4 mistyped
        GOOD_CHAT,
    ])
    cfg = config({"kind": "corpus", "path": str(corpus), "name": "corpus"},
                 {"kind": "chat", "path": str(chat), "name": "chat"})
    batches, stats, summary = run(cfg, tok)
    assert batches
    c, h = stats["corpus"], stats["chat"]
    assert (c["records"], c["valid"], c["bad"]) == (8, 2, 6)
    assert c["reasons"] == {"malformed JSON": 1, "missing field 'text'": 1,
                            "mistyped field 'text' (int)": 1, "empty text": 1, "invalid UTF-8": 2}
    assert (h["records"], h["valid"], h["bad"]) == (5, 2, 3)
    assert h["reasons"] == {"unknown role 'robot'": 1, "no trained tokens": 1,
                            "mistyped field 'content' (int)": 1}
    # the summary names the source and the file:line of the first bad records
    assert "corpus: 8 records, 2 valid, 6 skipped as bad" in summary
    assert f"{corpus}:2: malformed JSON" in summary
    assert f"{chat}:2: unknown role 'robot'" in summary
    assert len([line for line in summary.splitlines() if "first bad" in line]) == 5 + 3


def test_overlong_counted_truncated_or_dropped(tmp_path, tok):
    long_answer = {"messages": [{"role": "user", "content": "Idatzi luze."},
                                {"role": "assistant", "content": "bai " * 200}]}
    chat = write_jsonl(tmp_path / "chat.jsonl", [GOOD_CHAT, long_answer, GOOD_CHAT])
    corpus = write_jsonl(tmp_path / "c.jsonl", [{"text": "hitz " * 300}])
    sources = [{"kind": "chat", "path": str(chat), "name": "chat"},
               {"kind": "corpus", "path": str(corpus), "name": "corpus"}]
    for mode, truncated, dropped in [("truncate", 1, 0), ("drop", 0, 1)]:
        _, stats, summary = run(config(*sources, overlong=mode), tok)
        chat_stats = stats["chat"]
        assert (chat_stats["truncated"], chat_stats["dropped_overlong"]) == (truncated, dropped)
        assert stats["chat"]["bad"] == 0 and stats["corpus"]["split"] == 1
        assert f"{truncated} truncated, {dropped} dropped as over-long" in summary


def test_bad_fraction_exceeded_is_an_error(tmp_path, tok):
    path = write_jsonl(tmp_path / "c.jsonl", [GOOD_DOC] * 7 + ["{oops"] * 3)
    cfg = config({"kind": "corpus", "path": str(path), "name": "noisy"}, max_bad_fraction=0.2)
    with pytest.raises(DataError, match=r"source noisy: 3 of 10 records are bad .*0\.2"):
        run(cfg, tok)
    run(config({"kind": "corpus", "path": str(path)}, max_bad_fraction=0.3), tok)  # at the limit


def test_bad_fraction_checked_mid_stream(tmp_path, tok):
    n = CHECK_AFTER + 200
    path = write_jsonl(tmp_path / "c.jsonl", [GOOD_DOC, "{oops"] * (n // 2) + [GOOD_DOC] * 5000)
    cfg = config({"kind": "corpus", "path": str(path), "name": "noisy"},
                 max_bad_fraction=0.1, batch_size=64)
    it = make_pipeline(cfg, tok)
    with pytest.raises(DataError, match="source noisy: .* records are bad"):
        for _ in it:
            pass


def test_source_without_valid_record_fails_at_start(tmp_path, tok):
    path = write_jsonl(tmp_path / "c.jsonl", [{"body": "x"}] * 3)
    cfg = config({"kind": "corpus", "path": str(path), "name": "wrongfield"})
    with pytest.raises(DataError, match=r"source wrongfield: no valid record among the first 3"):
        make_pipeline(cfg, tok)
    with pytest.raises(DataError, match=f"{path}:1: missing field 'text'"):
        make_pipeline(cfg, tok)


def test_source_of_only_over_long_conversations_fails_at_start(tmp_path, tok):
    long = {"messages": [{"role": "user", "content": "luze " * 100},
                         {"role": "assistant", "content": "bai"}]}
    path = write_jsonl(tmp_path / "h.jsonl", [long] * 2)
    cfg = config({"kind": "chat", "path": str(path), "name": "long"}, overlong="drop")
    with pytest.raises(DataError, match=f"(?s)source long: no valid.*{path}:1: dropped_overlong"):
        make_pipeline(cfg, tok)


def test_missing_file_is_an_error(tmp_path, tok):
    cfg = config({"kind": "corpus", "path": str(tmp_path / "gone.jsonl"), "name": "gone"})
    with pytest.raises(InputNotFound, match=r"source gone: no file matches .*gone.jsonl"):
        make_pipeline(cfg, tok)


def test_special_strings_in_data_never_become_special_ids(tmp_path, tok):
    evil = "Kaixo <|eot_id|> eta <|end_of_text|> <|begin_of_text|>"
    corpus = write_jsonl(tmp_path / "c.jsonl", [{"text": evil}])
    chat = write_jsonl(tmp_path / "h.jsonl", [{"messages": [
        {"role": "user", "content": evil}, {"role": "assistant", "content": evil}]}])
    cfg = config({"kind": "corpus", "path": str(corpus)}, {"kind": "chat", "path": str(chat)},
                 seq_len=256)
    (batch,), _, _ = run(cfg, tok)
    specials = [int(i) for i in batch["input_ids"].ravel() if i in tok.special_ids]
    bos, eos, eot = tok.bos_id, tok.eos_id, tok.token_id("<|eot_id|>")
    hdr = {tok.token_id("<|start_header_id|>"), tok.token_id("<|end_header_id|>")}
    # corpus: BOS (EOS is the last target); chat: BOS, 3 headers (start+end) and 2 eot + 1 in
    # targets only -- nothing from the text
    assert specials.count(bos) == 2 and specials.count(eos) == 0
    assert sum(specials.count(h) for h in hdr) == 6 and specials.count(eot) == 2
    text = "".join(tok.decode(row.tolist()) for row in batch["input_ids"])
    assert text.count(evil) == 3
