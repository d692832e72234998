"""``basque-jax prepare``: token counts against an independent count (tiktoken over the same
texts), a killed and restarted prepare gives byte-identical shards, hosts split the work, bad
records are counted, and a run with another tokenizer or template is refused."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from _data_utils import TQA_CHAT, need, write_jsonl
from conftest import SHARED_DATA

from basque_jax.cli import main
from basque_jax.config import load_config
from basque_jax.data.prepare import prepare
from basque_jax.data.prepared import NotPrepared, open_prepared, source_dir
from basque_jax.data.tokenizer import LLAMA3_PATTERN, LLAMA31_SPECIAL_TOKENS, load_tokenizer

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "configs" / "demo.yaml"
LLAMA3 = SHARED_DATA / "llama3" / "tokenizer.model"
BHTC = SHARED_DATA / "eu" / "bhtc_news_val.jsonl"  # 1,857 Basque news paragraphs


def _config(tmp_path: Path, *extra: str, tokenizer: str = "demo", records: int = 200):
    sources = (f"[{{kind: corpus, path: {BHTC}, name: bhtc}}, "
               f"{{kind: chat, path: {TQA_CHAT}, name: tqa}}]")
    return load_config(DEMO, [f"data.tokenizer={tokenizer}", f"data.sources={sources}",
                              f"data.prepared={tmp_path / 'prepared'}",
                              f"data.shard_records={records}", "eval_data=null",
                              "train.eval_every=0", *extra])


def _tiktoken_counts() -> tuple[int, int, int, int]:
    """(corpus tokens, corpus loss tokens, chat tokens, chat loss tokens), counted with tiktoken
    on the Llama 3 ranks: documents ``<|begin_of_text|> text <|end_of_text|>``, conversations
    in the Llama 3.1 format (dated system block; loss on assistant content + ``<|eot_id|>``)."""
    import tiktoken
    from tiktoken.load import load_tiktoken_bpe

    ranks = load_tiktoken_bpe(str(LLAMA3))
    enc = tiktoken.Encoding("llama3", pat_str=LLAMA3_PATTERN, mergeable_ranks=ranks,
                            special_tokens={t: len(ranks) + i
                                            for i, t in enumerate(LLAMA31_SPECIAL_TOKENS)})
    corpus = chat = chat_loss = 0
    corpus_loss = 0
    for line in BHTC.read_text().splitlines():
        n = 2 + len(enc.encode(json.loads(line)["text"], disallowed_special=()))
        corpus, corpus_loss = corpus + n, corpus_loss + n - 1
    system = ("<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nCutting Knowledge "
              "Date: December 2023\nToday Date: 26 Jul 2024\n\n<|eot_id|>")
    for line in TQA_CHAT.read_text().splitlines():
        text = system
        for m in json.loads(line)["messages"]:
            content = m["content"].strip()
            text += f"<|start_header_id|>{m['role']}<|end_header_id|>\n\n{content}<|eot_id|>"
            if m["role"] == "assistant":
                chat_loss += len(enc.encode(content, disallowed_special=())) + 1
        chat += len(enc.encode(text, allowed_special="all"))
    return corpus, corpus_loss, chat, chat_loss


def _manifest(cfg, name: str) -> dict:
    source = next(s for s in cfg.data.sources if s.name == name)
    return json.loads((source_dir(cfg.data.prepared, source) / "manifest.json").read_text())


@pytest.mark.slow
def test_token_counts_equal_tiktoken_on_real_basque_data(tmp_path):
    need(LLAMA3)
    cfg = _config(tmp_path, tokenizer=str(LLAMA3), records=700)
    summary = prepare(cfg.data, workers=2, progress=False)
    assert summary["shards"] == 3 + 2 and summary["waiting_for_other_hosts"] == 0
    corpus, corpus_loss, chat, chat_loss = _tiktoken_counts()
    c, t = _manifest(cfg, "bhtc"), _manifest(cfg, "tqa")
    assert (c["records"], c["examples"], c["bad"]) == (1857, 1857, 0)
    assert (c["tokens"], c["loss_tokens"]) == (corpus, corpus_loss)
    assert (t["records"], t["examples"], t["tokens"], t["loss_tokens"]) == (817, 817, chat,
                                                                             chat_loss)


def _shard_bytes(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes()
            for p in sorted(root.rglob("shard-*")) if p.is_file()}


def test_killed_and_restarted_prepare_gives_identical_shards(tmp_path):
    need(BHTC)
    once = _config(tmp_path / "once", records=150)
    prepare(once.data, progress=False)
    killed = tmp_path / "killed"
    cmd = [sys.executable, "-m", "basque_jax.cli", "prepare", str(DEMO), "data.tokenizer=demo",
           "eval_data=null", "train.eval_every=0",
           f"data.sources=[{{kind: corpus, path: {BHTC}, name: bhtc}}, "
           f"{{kind: chat, path: {TQA_CHAT}, name: tqa}}]",
           f"data.prepared={killed / 'prepared'}", "data.shard_records=150", "--workers", "1",
           "--no-progress"]
    proc = subprocess.Popen(cmd, env={**os.environ, "JAX_PLATFORMS": "cpu"}, cwd=REPO)
    deadline = time.time() + 120
    while time.time() < deadline and len(list(killed.rglob("shard-*.json"))) < 3:
        assert proc.poll() is None, "prepare ended before it could be killed"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done_before = len(list(killed.rglob("shard-*.json")))
    assert 3 <= done_before < 13 + 6, done_before  # stopped part-way
    assert main(cmd[3:]) == 0  # the restart finishes the rest
    assert _shard_bytes(killed / "prepared") == _shard_bytes(tmp_path / "once" / "prepared")
    assert len(_shard_bytes(killed / "prepared")) == 3 * (13 + 6)


def test_hosts_split_the_shards_and_the_last_writes_the_manifest(tmp_path):
    need(BHTC)
    cfg = _config(tmp_path, records=400)
    first = prepare(cfg.data, host_id=0, num_hosts=2, progress=False)
    assert first["manifests"] == [] or first["waiting_for_other_hosts"] > 0
    with pytest.raises(NotPrepared, match="is not prepared"):
        open_prepared(cfg.data, load_tokenizer("demo"))
    second = prepare(cfg.data, host_id=1, num_hosts=2, progress=False)
    assert second["waiting_for_other_hosts"] == 0 and len(second["manifests"]) == 2
    alone = _config(tmp_path / "alone", records=400)
    prepare(alone.data, progress=False)
    assert _shard_bytes(tmp_path / "prepared") == _shard_bytes(tmp_path / "alone" / "prepared")


def test_bad_records_are_counted_and_named(tmp_path):
    rows = [{"text": f"Testu zuzena {i}."} for i in range(20)]
    path = write_jsonl(tmp_path / "docs.jsonl", rows)
    with path.open("a") as f:
        f.write("{not json\n")
        f.write('{"other": 1}\n')
    cfg = load_config(DEMO, ["data.tokenizer=demo", f"data.prepared={tmp_path / 'p'}",
                             f"data.sources=[{{kind: corpus, path: {path}, name: docs}}]",
                             "data.max_bad_fraction=0.2", "eval_data=null",
                             "train.eval_every=0"])
    prepare(cfg.data, progress=False)
    m = _manifest(cfg, "docs")
    assert (m["records"], m["examples"], m["bad"]) == (22, 20, 2)
    assert all("docs.jsonl:2" in w for w in m["first_bad"]) and len(m["first_bad"]) == 2


def test_other_tokenizer_or_template_is_refused(tmp_path):
    need(BHTC)
    cfg = _config(tmp_path, records=2000)
    prepare(cfg.data, progress=False)
    open_prepared(cfg.data, load_tokenizer("demo"))  # the same: fine
    other = _config(tmp_path, "data.chat_date=1 Jan 2025", records=2000)
    with pytest.raises(NotPrepared, match="another chat template"):
        open_prepared(other.data, load_tokenizer("demo"))
    moved = _config(tmp_path, f"data.sources=[{{kind: corpus, path: {BHTC}, name: bhtc, "
                              "max_records: 5}]", records=2000)
    with pytest.raises(NotPrepared, match="not prepared"):  # a changed source is not stale
        open_prepared(moved.data, load_tokenizer("demo"))


def test_prepare_command_errors_are_one_line(tmp_path, capsys):
    assert main(["prepare", str(DEMO), "data.prepared=null"]) == 2
    assert capsys.readouterr().err.strip() == (
        "basque-jax prepare: data.prepared: set the folder to prepare the data into")
    assert main(["prepare", str(DEMO), f"data.prepared={tmp_path}", "--host-id", "3",
                 "--num-hosts", "2"]) == 2
    assert "--host-id 3 must be in [0, --num-hosts 2)" in capsys.readouterr().err
