"""``basque-jax arena ratings | export`` and the arena config: outputs, user errors (one line,
exit 2, naming file:line or the key) and that the arena never imports jax."""

from __future__ import annotations

import gzip
import json
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from basque_jax.arena.cli import main
from basque_jax.arena.config import STUDY_SYSTEM_PROMPT, load_arena_config
from basque_jax.arena.store import VoteStore, database_url
from basque_jax.arena.votes import Vote
from basque_jax.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]
VOTES = [("alpha", "beta", "a")] * 6 + [("beta", "alpha", "a")] * 2 + [
    ("beta", "gamma", "a")] * 5 + [("gamma", "beta", "tie")] * 2 + [
    ("alpha", "gamma", "both_bad"), ("gamma", "alpha", "b"), ("gamma", "alpha", "a")]


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_ratings_from_jsonl_with_plot(tmp_path):
    rows = [{"model_a": a, "model_b": b, "winner": w} for a, b, w in VOTES]
    rows[0]["winner"] = "model_a"  # FastChat / ebaluatoia spellings are accepted
    rows.append({"model_a": "alpha", "model_b": "alpha", "winner": "tie"})  # skipped, counted
    votes = write_jsonl(tmp_path / "votes.jsonl", rows)
    out, plot = tmp_path / "ratings.json", tmp_path / "ratings.png"
    code = main(["ratings", str(votes), "--out", str(out), "--plot", str(plot),
                 "--bootstrap", "50", "--seed", "1"])
    assert code == 0
    report = json.loads(out.read_text())
    names = [m["name"] for m in report["models"]]
    assert names == ["alpha", "beta", "gamma"]  # alpha beats beta beats gamma
    ratings = [m["rating"] for m in report["models"]]
    assert ratings == sorted(ratings, reverse=True)
    assert all(m["ci_low"] <= m["rating"] <= m["ci_high"] for m in report["models"])
    assert {k for m in report["models"] for k in m} >= {"name", "rating", "ci_low", "ci_high",
                                                        "votes"}
    assert report["votes"] == len(VOTES) and report["skipped_self_pairs"] == 1
    assert report["bootstrap"] == {"rounds": 50, "ci": 0.95, "seed": 1,
                                   "resampling": "votes with replacement, same count"}
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and plot.stat().st_size > 5000


def test_ratings_read_the_studys_public_vote_format(tmp_path):
    """``HiTZ/ebaluatoia`` rows (gzipped JSONL, ``winner`` spelled model_a/model_b/tie, the
    conversations and participant fields alongside) rate as they are."""
    rows = [{"id": f"{i}", "username": "-642850952", "user_language": "C1-C2",
             "timestamp": f"2025-03-19T07:{i:02d}:00", "model_a": a, "model_b": b,
             "conv_a": [{"role": "user", "content": "Kaixo"}], "conv_b": [],
             "winner": {"a": "model_a", "b": "model_b"}.get(w, "tie"),
             "winner_content": "tie", "winner_language": "model_a"}
            for i, (a, b, w) in enumerate(VOTES)]
    path = tmp_path / "25-03.jsonl.gz"
    with gzip.open(path, "wt", encoding="utf-8") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    out = tmp_path / "r.json"
    assert main(["ratings", str(path), "--out", str(out), "--bootstrap", "0"]) == 0
    report = json.loads(out.read_text())
    assert [m["name"] for m in report["models"]] == ["alpha", "beta", "gamma"]
    assert report["votes"] == len(VOTES)


@pytest.mark.parametrize("line, message", [
    ('{"model_a": "x", "model_b": "y", "winner": "maybe"}', "winner must be one of"),
    ('{"model_a": "x", "winner": "a"}', "model_b must be a non-empty string"),
    ("not json", "invalid JSON"),
    ('["x", "y", "a"]', "expected a JSON object"),
])
def test_bad_line_is_a_user_error_naming_file_and_line(tmp_path, capsys, line, message):
    votes = tmp_path / "votes.jsonl"
    votes.write_text('{"model_a": "x", "model_b": "y", "winner": "a"}\n\n' + line + "\n")
    code = main(["ratings", str(votes), "--out", str(tmp_path / "r.json")])
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith(f"basque-jax arena: {votes}:3: ") and message in err
    assert err.count("\n") == 1


def test_missing_or_unknown_votes_source(tmp_path, capsys):
    assert main(["ratings", str(tmp_path / "nope.db"), "--out", "x.json"]) == 2
    assert "no such file" in capsys.readouterr().err
    (tmp_path / "notes.txt").write_text("hello")
    assert main(["export", str(tmp_path / "notes.txt"), str(tmp_path / "o.jsonl")]) == 2
    assert "not an SQLite database" in capsys.readouterr().err


def test_export_jsonl_and_parquet_and_ratings_from_the_database(tmp_path):
    db = tmp_path / "arena.db"
    store = VoteStore(database_url(str(db)))
    for i, (a, b, w) in enumerate(VOTES):
        store.record(Vote(id=f"v{i:02d}", session_id=f"s{i % 3}", model_a=a, model_b=b,
                          winner=w, prompt=f"galdera {i} ñ", answer_a="A", answer_b="B"))
    store.close()
    assert main(["export", str(db), str(tmp_path / "votes.jsonl")]) == 0
    rows = [json.loads(line) for line in (tmp_path / "votes.jsonl").read_text().splitlines()]
    assert [r["id"] for r in rows] == [f"v{i:02d}" for i in range(len(VOTES))]
    assert rows[0]["prompt"] == "galdera 0 ñ" and rows[0]["created_at"].endswith("+00:00")
    assert main(["export", str(db), str(tmp_path / "votes.parquet")]) == 0
    table = pq.read_table(tmp_path / "votes.parquet")
    assert table.num_rows == len(VOTES) and "session_id" in table.column_names
    # the exports rate exactly like the database they came from
    reports = []
    for source in (db, tmp_path / "votes.jsonl", tmp_path / "votes.parquet"):
        out = tmp_path / f"{source.suffix}.json"
        assert main(["ratings", str(source), "--out", str(out), "--bootstrap", "20"]) == 0
        report = json.loads(out.read_text())
        reports.append([(m["name"], m["rating"], m["online_elo"]) for m in report["models"]])
    assert reports[0] == reports[1] == reports[2]


def test_arena_imports_no_jax():
    script = ("import sys, basque_jax.arena.cli, basque_jax.arena.sources, "
              "basque_jax.arena.ratings, basque_jax.arena.plot, basque_jax.arena.store; "
              "print(sorted({'jax', 'flax', 'torch'} & set(sys.modules)))")
    proc = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"  # the server process is checked in test_arena_server


def write_config(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "arena.yaml"
    path.write_text(text)
    return path


MODELS = """models:
  - {name: alpha, base_url: "http://127.0.0.1:9/v1"}
  - {name: beta, base_url: "http://127.0.0.1:9/v1", model: served-beta, api_key_env: BETA_KEY}
"""


def test_config_defaults_follow_the_study(tmp_path, monkeypatch):
    monkeypatch.setenv("BETA_KEY", "k-123")
    config = load_arena_config(write_config(tmp_path, MODELS + "database: votes.db\n"))
    assert config.system_prompt == STUDY_SYSTEM_PROMPT and "{date}" in config.system_prompt
    assert (config.max_tokens, config.temperature, config.top_p) == (2048, 0.9, 0.95)
    assert config.pairing == "uniform" and config.host == "127.0.0.1"
    assert config.database == str(tmp_path / "votes.db")  # relative to the config file
    assert config.models[0].model == "alpha" and config.models[0].api_key == "EMPTY"
    assert config.models[1].model == "served-beta" and config.models[1].api_key == "k-123"
    over = load_arena_config(tmp_path / "arena.yaml", ["port=9999", "pairing=adaptive"])
    assert over.port == 9999 and over.pairing == "adaptive" and over.host == "127.0.0.1"


@pytest.mark.parametrize("extra, message", [
    ("temperature: hot\n", "temperature: expected float, got str 'hot'"),
    ("port: '80'\n", "port: expected int, got str '80'"),
    ("pairing: elo\n", "pairing: expected one of"),
    ("colour: red\n", "colour: unknown key (known: admin_token, admin_token_env, "),
    ("port: 0\n", "port: must be in [1, 65535]"),
    ("admin_token: a\nadmin_token_env: B\n", "set admin_token or admin_token_env, not both"),
])
def test_config_errors_name_the_key(tmp_path, extra, message):
    path = write_config(tmp_path, MODELS + extra)
    with pytest.raises(ConfigError) as info:
        load_arena_config(path)
    assert str(info.value).startswith(f"{path}: ") and message in str(info.value)


@pytest.mark.parametrize("models, message", [
    ('models:\n  - {name: a, base_url: "http://x/v1", key: 1}\n  - {name: b, base_url: '
     '"http://x/v1"}\n', "models[0].key: unknown key (known: api_key_env, base_url, model, "),
    ('models:\n  - {name: a, base_url: 5}\n  - {name: b, base_url: "http://x/v1"}\n',
     "models[0].base_url: expected str, got int 5"),
    ('models:\n  - {name: a, base_url: "http://x/v1"}\n  - {name: b}\n',
     "models[1]: required key 'base_url' missing"),
    ('models:\n  - {name: a, base_url: "x"}\n  - {name: b, base_url: "http://x/v1"}\n',
     "models[0]: base_url: expected an http(s) URL"),
    ('models:\n  - {name: a, base_url: "http://x/v1"}\n', "models: give at least two models"),
])
def test_model_errors_name_the_entry(tmp_path, models, message):
    with pytest.raises(ConfigError) as info:
        load_arena_config(write_config(tmp_path, models))
    assert message in str(info.value)


def test_serve_with_a_bad_config_exits_2(tmp_path, capsys):
    code = main(["serve", str(write_config(tmp_path, MODELS + "max_tokens: 0\n"))])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("basque-jax arena: ") and "max_tokens: must be >= 1" in err
