"""Magpie generation (template ids, defaults, schema, kill-and-resume) and translation."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import SHARED_DATA

from basque_jax.data.chat import ChatEncoder
from basque_jax.data.config import ConfigError
from basque_jax.data.embedded import EMBEDDED_CHAT
from basque_jax.data.templates import make_chat_encoder
from basque_jax.data.tokenizer import load_tokenizer
from basque_jax.sample.config import load_generate_config, load_translate_config
from basque_jax.sample.shards import read_records, shard_paths
from basque_jax.sample.translate import run_translate, translation_encoder, translation_prompt

LLAMA3_TOKENIZER = SHARED_DATA / "llama3" / "tokenizer.model"
needs_llama3 = pytest.mark.skipif(not LLAMA3_TOKENIZER.exists(),
                                  reason=f"{LLAMA3_TOKENIZER} not present")

GENERATE_YAML = """\
model: {{preset: demo, tokenizer: demo, seed: 1}}
output: {{dir: {out}}}
num_samples: {n}
seed: 11
system_prompt: "Euskaraz bakarrik idatzi."
on_truncated_instruction: respond
instruction: {{max_new_tokens: 10}}
response: {{max_new_tokens: 14, top_p: 1.0}}
sampler: {{batch_size: 8, max_len: 192, chunk_steps: 4}}
filters: {{enabled: {filters}, language: null, keep_status: [ok, response_truncated]}}
"""


def _generate_config(tmp_path: Path, out: Path, n: int, filters: bool = False) -> Path:
    path = tmp_path / f"gen_{out.name}.yaml"
    path.write_text(GENERATE_YAML.format(out=out, n=n, filters=str(filters).lower()))
    return path


@needs_llama3
def test_pre_query_template_ids():
    tok = load_tokenizer(LLAMA3_TOKENIZER)
    # <|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\n (published Llama 3 ids)
    pre_query_ids = ChatEncoder(tok).pre_query_ids
    assert pre_query_ids() == [128000, 128006, 882, 128007, 271]
    system = "Erantzun beti euskaraz."
    text = (f"<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n{system}"
            "<|eot_id|><|start_header_id|>user<|end_header_id|>\n\n")
    want = tok.to_hf()(text, add_special_tokens=False)["input_ids"]  # parses special tokens
    assert pre_query_ids(system) == want


@needs_llama3
def test_defaults_are_magpies(tmp_path):
    cfg_path = tmp_path / "g.yaml"
    cfg_path.write_text(f"model: {{init_from: /nowhere, tokenizer: {LLAMA3_TOKENIZER}}}\n"
                        f"output: {{dir: {tmp_path}}}\nnum_samples: 3\n"
                        "instruction: {max_new_tokens: 100}\n")
    cfg = load_generate_config(cfg_path)
    tok = load_tokenizer(LLAMA3_TOKENIZER)
    enc = make_chat_encoder(tok, cfg.chat_template)  # auto: the Llama 3.1 format
    q = cfg.instruction.params(tok, enc.user_turn_stop_ids)
    r = cfg.response.params(tok, enc.stop_ids)
    assert (q.temperature, q.top_p, q.max_new_tokens) == (0.9, 1.0, 100)
    assert q.stop_ids == (128009, 128001, 128006, 128007)
    assert (r.temperature, r.top_p) == (0.6, 0.9)
    assert 128009 in r.stop_ids and 128001 in r.stop_ids


@pytest.mark.parametrize("override,message", [
    ("instruction.top_p=0", r"instruction: top_p must be in \(0, 1\]"),
    ("sampler.batch_size=0", r"sampler\.batch_size: must be >= 1"),
    ("num_samples=0", r"num_samples: must be >= 1"),
    ("model.preset=null", r"model: set exactly one of preset, init_from, train_dir"),
    ("filters.language=xx", r"'xx' is not an ISO 639-1 code"),
    ("bogus=1", r"bogus: unknown key"),
])
def test_bad_generate_configs_name_the_key(tmp_path, override, message):
    path = _generate_config(tmp_path, tmp_path / "out", 2)
    with pytest.raises(ConfigError, match=message):
        load_generate_config(path, [override])


def _env(cache: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
    env["JAX_PLATFORMS"] = "cpu"
    env["JAX_COMPILATION_CACHE_DIR"] = str(cache)  # the restart reuses the killed run's
    env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
    return env


def _record_set(folder: Path) -> list[str]:
    return sorted(json.dumps(r, sort_keys=True) for r in read_records(shard_paths(folder)))


def _generate(config: Path, cache: Path, **kw):
    cmd = [sys.executable, "-m", "basque_jax.cli", "generate", str(config)]
    return cmd, dict(env=_env(cache), **kw)


def test_generate_killed_and_restarted_equals_uninterrupted(tmp_path):
    n, cache = 32, tmp_path / "jit"
    ref_dir, run_dir = tmp_path / "ref", tmp_path / "killed"
    cmd, kw = _generate(_generate_config(tmp_path, ref_dir, n), cache)
    subprocess.run(cmd, capture_output=True, check=True, **kw)  # uninterrupted; fills cache
    ref = _record_set(ref_dir)
    assert len(ref) == n
    first = json.loads(ref[0])
    assert [t["role"] for t in first["conversations"]] == ["user", "assistant"]
    meta = first["metadata"]
    assert meta["generator"] == "magpie" and meta["model"] == "preset:demo"
    assert meta["instruction_sampling"]["temperature"] == 0.9
    assert meta["response_sampling"]["temperature"] == 0.6 and len(meta["sample_seeds"]) == 2

    cmd, kw = _generate(_generate_config(tmp_path, run_dir, n, filters=True), cache)
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, **kw)
    shard = run_dir / "shard-00000-of-00001.jsonl"
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if shard.exists() and shard.read_bytes().count(b"\n") >= 3:
            break
        time.sleep(0.002)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    written = shard.read_bytes().count(b"\n")
    assert 3 <= written < n, f"the kill landed after {written} records"
    restarted = subprocess.run(cmd, capture_output=True, text=True, check=True, **kw)
    assert f"{written} records already in" in restarted.stdout
    assert _record_set(run_dir) == ref  # same records: no duplicate, no gap
    indices = [r["index"] for r in read_records(shard_paths(run_dir))]
    assert sorted(indices) == list(range(n))
    report = json.loads((run_dir / "filter_report.json").read_text())
    assert report["input"] == n and report["kept"] + sum(report["removed"].values()) == n
    kept = (run_dir / "filtered.jsonl").read_text().splitlines()
    assert len(kept) == report["kept"]


TRANSLATE_YAML = """\
model: {{preset: demo, tokenizer: demo}}
output: {{dir: {out}}}
source: {{kind: chat, path: {src}}}
num_records: {n}
system_prompt: "Itzultzaile profesionala zara."
prompt: "Itzuli euskarara: {{text}}"
sampling: {{max_new_tokens: 6}}
sampler: {{batch_size: 8, max_len: 384, chunk_steps: 4}}
filters: {{enabled: false}}
"""


def test_translate_keeps_structure_and_resumes(tmp_path):
    out = tmp_path / "tr"
    path = tmp_path / "t.yaml"
    path.write_text(TRANSLATE_YAML.format(out=out, src=EMBEDDED_CHAT, n=3))
    first = run_translate(load_translate_config(path))
    assert first["written"] == 3
    again = run_translate(load_translate_config(path, ["num_records=5"]))
    assert (again["written"], again["resumed_with"]) == (2, 3)
    records = sorted(read_records(shard_paths(out)), key=lambda r: r["index"])
    assert [r["index"] for r in records] == list(range(5))
    source = [json.loads(x)["messages"] for x in EMBEDDED_CHAT.read_text().splitlines()[:5]]
    for rec, turns in zip(records, source, strict=True):
        assert rec["original"] == turns
        assert [t["role"] for t in rec["conversations"]] == [t["role"] for t in turns]
        assert rec["status"] in ("ok", "translation_truncated")
        assert rec["metadata"]["sampling"]["temperature"] == 0.0
        assert set(rec["metadata"]["finish_reasons"]) == {str(k) for k in range(len(turns))}
    assert any(t["role"] == "system" for t in records[2]["conversations"])


def test_translate_prompt_and_config_errors(tmp_path):
    path = tmp_path / "t.yaml"
    path.write_text(TRANSLATE_YAML.format(out=tmp_path / "o", src=EMBEDDED_CHAT, n=1))
    with pytest.raises(ConfigError, match=r"prompt: must contain the placeholder \{text\}"):
        load_translate_config(path, ["prompt=Translate this"])
    with pytest.raises(ConfigError, match=r"source\.kind: translate reads chat data"):
        load_translate_config(path, ["source.kind=corpus"])
    cfg = load_translate_config(path, ["prompt='Itzuli euskarara: {text}'"])
    tok = load_tokenizer("demo")
    text = tok.decode(translation_prompt(translation_encoder(cfg, tok), cfg.prompt,
                                         "Good morning!"))
    assert "Itzultzaile profesionala zara." in text
    assert text.endswith("<|start_header_id|>user<|end_header_id|>\n\nItzuli euskarara: Good "
                         "morning!<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n")


@pytest.mark.parametrize("command", ["generate", "translate"])
def test_cli_config_errors_exit_2(tmp_path, capsys, command):
    from basque_jax.cli import main

    path = tmp_path / "t.yaml"
    path.write_text(TRANSLATE_YAML.format(out=tmp_path / "o", src=EMBEDDED_CHAT, n=1))
    assert main([command, str(tmp_path / "missing.yaml")]) == 2
    assert f"basque-jax {command}: " in capsys.readouterr().err
    if command == "translate":
        assert main([command, str(path), "prompt=no placeholder"]) == 2
        assert "must contain the placeholder" in capsys.readouterr().err


CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "sample"


def test_shipped_sample_configs_validate():
    gen = load_generate_config(CONFIGS / "magpie_eu.yaml")
    assert (gen.instruction.temperature, gen.response.top_p) == (0.9, 0.9)
    assert gen.system_prompt and gen.filters.language == "eu"
    tr = load_translate_config(CONFIGS / "translate_eu.yaml")
    assert tr.source.hf_dataset == "HiTZ/Magpie-Llama-3.1-8B-Instruct-Filtered-1M"
    assert "{text}" in tr.prompt and tr.sampling.temperature == 0.0
