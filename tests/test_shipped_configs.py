"""Every shipped config runs: hub sources swapped for local stand-ins from ../shared/data and
the backbone for a tiny model, every other setting kept (mixture, epochs, masks, template,
NEFTune, remat, micro-batches, LoRA, dtypes, mesh); ``prepare`` + two train steps, or the
sample job. Rows per step and sequence length shrink to what a CPU can do (the micro-batch
count is kept)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import jax
import pytest
from _data_utils import need
from _model_utils import make_tiny_hf
from conftest import SHARED_DATA

from basque_jax.config import load_config
from basque_jax.data.prepare import prepare
from basque_jax.data.tokenizer import load_tokenizer
from basque_jax.train.loop import run_training, with_exact_steps
from basque_jax.yaml_config import read_yaml

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs"
RUN_CONFIGS = sorted(p for p in CONFIGS.rglob("*.yaml")
                     if "_base" not in p.parts and "sample" not in p.parts)
SAMPLE_CONFIGS = sorted((CONFIGS / "sample").glob("*.yaml"))
CORPUS = SHARED_DATA / "eu" / "bhtc_news_val.jsonl"
CHAT = SHARED_DATA / "eu" / "truthfulqa_eu_chat.jsonl"
SEQ = 192  # room for the Llama 3.1 system block and a Q&A turn


@pytest.fixture(scope="module")
def stand_ins(tmp_path_factory):
    """A tiny backbone folder (demo tokenizer) and a chat file with ``conversations``."""
    need(CORPUS, CHAT)
    root = tmp_path_factory.mktemp("stand_ins")
    backbone = make_tiny_hf(root / "backbone", case="llama31")
    chats = root / "conversations.jsonl"
    rows = [json.loads(x)["messages"] for x in CHAT.read_text().splitlines()[:60]]
    chats.write_text("".join(json.dumps({"conversations": m}) + "\n" for m in rows))
    return backbone, chats


def _local(source: dict, chats: Path) -> dict:
    """A source of the config, pointed at a local stand-in of the same kind."""
    keep = {k: source[k] for k in ("kind", "name", "weight") if k in source}
    if source["kind"] == "corpus":
        return {**keep, "path": str(CORPUS), "max_records": 40}
    return {**keep, "path": str(chats), "messages_field": "conversations", "max_records": 30}


def _run_config(path: Path, tmp_path: Path, backbone: Path, chats: Path):
    cfg = load_config(path, ["vars.bucket=bkt", f"vars.out={tmp_path / 'out'}"])
    micro = cfg.train.micro_batches
    rows = math.lcm(micro, jax.device_count())
    sources = [_local({"kind": s.kind, "name": s.name, "weight": s.weight}, chats)
               for s in cfg.data.sources]
    model = [f"model.init_from={backbone}", "model.preset=null"]
    overrides = ["vars.bucket=bkt", f"vars.out={tmp_path / 'out'}", *model,
                 f"data.tokenizer={backbone}", f"data.sources={json.dumps(sources)}",
                 f"data.seq_len={SEQ}", f"data.batch_size={rows}",
                 f"train.output_dir={tmp_path / 'run'}", "train.progress_bar=false",
                 "train.tensorboard=false", "train.epoch_tokens=null", "train.save_every=0"]
    if cfg.data.prepared:
        overrides.append(f"data.prepared={tmp_path / 'prepared'}")
    if cfg.eval_data is not None:
        held = [_local({"kind": s.kind, "name": s.name}, chats) for s in cfg.eval_data.sources]
        overrides += [f"eval_data.tokenizer={backbone}", f"eval_data.sources={json.dumps(held)}",
                      f"eval_data.seq_len={SEQ}", f"eval_data.batch_size={rows}"]
    return cfg, load_config(path, overrides)


@pytest.mark.parametrize("path", RUN_CONFIGS, ids=lambda p: str(p.relative_to(CONFIGS)))
def test_run_config_prepares_and_trains(path, tmp_path, stand_ins):
    backbone, chats = stand_ins
    shipped, cfg = _run_config(path, tmp_path, backbone, chats)
    kept = ("mixture", "epochs", "chat_template", "overlong", "seed")
    assert [getattr(cfg.data, k) for k in kept] == [getattr(shipped.data, k) for k in kept]
    assert (cfg.train.neftune_alpha, cfg.train.micro_batches, cfg.model.remat, cfg.lora) == (
        shipped.train.neftune_alpha, shipped.train.micro_batches, shipped.model.remat,
        shipped.lora)
    if cfg.data.prepared:
        summary = prepare(cfg.data, progress=False)
        assert summary["waiting_for_other_hosts"] == 0
        assert with_exact_steps(cfg, load_tokenizer(cfg.data.tokenizer)).train.steps > 2
    cfg.train.steps = 2
    cfg.train.eval_every = min(cfg.train.eval_every, 2)
    result = run_training(cfg)
    assert math.isfinite(result["loss"]) and result["loss"] > 0


@pytest.mark.parametrize("path", SAMPLE_CONFIGS, ids=lambda p: p.name)
def test_sample_config_runs(path, tmp_path, stand_ins):
    from basque_jax.sample.config import load_generate_config, load_translate_config
    from basque_jax.sample.magpie import run_generate
    from basque_jax.sample.translate import run_translate

    backbone, chats = stand_ins
    shipped = read_yaml(path)
    # the tiny backbone's 4 heads / 2 KV heads split over at most 2 tensor shards
    mesh = [] if shipped.get("mesh", {}).get("tensor", 1) == 1 else [
        "mesh.data=-1", "mesh.fsdp=1", "mesh.tensor=2"]
    common = [*mesh, "vars.bucket=bkt", f"vars.out={tmp_path}", f"model.init_from={backbone}",
              f"output.dir={tmp_path / 'out'}", "sampler.batch_size=8", "sampler.max_len=160",
              "filters.language=null"]
    if "translate" in path.name:
        source = json.dumps({"kind": "chat", "path": str(chats),
                             "messages_field": "conversations"})
        cfg = load_translate_config(path, [*common, f"source={source}", "num_records=3",
                                           "sampling.max_new_tokens=12"])
        result = run_translate(cfg)
    else:
        cfg = load_generate_config(path, [*common, "num_samples=3",
                                          "instruction.max_new_tokens=12",
                                          "response.max_new_tokens=12"])
        result = run_generate(cfg)
    assert result["written"] == 3
