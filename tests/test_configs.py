"""The study grid in configs/study: the 17 + 1 runs the Latxa Instruct study released, each a
full fine-tuning config and a LoRA twin composed from shared bases; and the composition features
(``base:`` lists, ``key+:`` extension, ``${vars}``, steps from a token budget) they rely on."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from basque_jax.config import ConfigError, load_config
from basque_jax.topology import parse_topology

REPO = Path(__file__).resolve().parents[1]
STUDY = REPO / "configs" / "study"
RUNS = {mode: sorted((STUDY / mode).glob("*.yaml")) for mode in ("full", "lora")}
# hitz-zentroa/latxa-instruct model_training/train_configs: exp_<backbone>_<C><I_EU><I_EN>
RELEASED = {
    "llama3.1-8b": {"010", "011", "101", "110", "111"},
    "latxa3.1-8b": {"001", "010", "011", "101", "110", "111"},
    "llama3.1-8b-instruct": {"010", "011", "100", "101", "110", "111"},
}
HUB = {"llama3.1-8b": "meta-llama/Llama-3.1-8B", "latxa3.1-8b": "HiTZ/Latxa-Llama-3.1-8B",
       "llama3.1-8b-instruct": "meta-llama/Llama-3.1-8B-Instruct",
       "llama3.1-70b-instruct": "meta-llama/Llama-3.1-70B-Instruct"}
SOURCES = {"c": "HiTZ/latxa-corpus-v1.1",
           "ieu": "HiTZ/Magpie-Llama-3.1-8B-Instruct-Filtered-translated-1M",
           "ien": "HiTZ/Magpie-Llama-3.1-8B-Instruct-Filtered-1M"}


def _load(path: Path, *extra: str):
    return load_config(path, ["vars.bucket=bkt", *extra])


def test_the_grid_is_the_studys_17_runs_plus_70b():
    for mode, files in RUNS.items():
        grid: dict[str, set[str]] = {}
        for f in files:
            backbone, *parts = f.stem.split("_")
            if backbone == "llama3.1-70b-instruct":
                continue
            bits = "".join("1" if p in parts else "0" for p in ("c", "ieu", "ien"))
            grid.setdefault(backbone, set()).add(bits)
        assert grid == RELEASED, mode
        assert sum(map(len, grid.values())) == 17
        assert (STUDY / mode / "llama3.1-70b-instruct_c_ien.yaml") in files
        assert len(files) == 18


@pytest.mark.parametrize("path", RUNS["full"] + RUNS["lora"], ids=lambda p: f"{p.parent.name}/"
                         f"{p.stem}")
def test_every_run_loads_with_the_studys_recipe(path):
    cfg = _load(path)
    backbone, *parts = path.stem.split("_")
    is_70b = "70b" in backbone
    assert cfg.model.init_from == f"/mnt/gcs/bkt/models/{HUB[backbone]}"
    assert cfg.data.tokenizer == cfg.model.init_from
    names = {s.hf_dataset for s in cfg.data.sources}
    want = {SOURCES[p] for p in parts}
    if is_70b:
        want = {SOURCES["c"], "HiTZ/Magpie-Llama-3.1-70B-Instruct-Filtered-1M"}
    assert names == want
    assert len(cfg.data.sources) == len(parts) + (6 if "c" in parts else 0)  # 7 subsets of C
    # read once by `basque-jax prepare`, trained from the shards (exactly 4 passes)
    assert not any(s.streaming for s in cfg.data.sources)
    assert cfg.data.prepared == "/mnt/gcs/bkt/prepared"
    o = cfg.optim
    assert (o.b1, o.b2, o.eps, o.weight_decay, o.warmup_ratio, o.min_lr_ratio, o.clip_norm) == (
        0.9, 0.95, 1e-8, 0.1, 0.1, 0.33, 1.0)
    d, t = cfg.data, cfg.train
    assert (d.seq_len, d.epochs, d.seed, d.mixture, d.chat_template) == (
        8192, 4, 33, "concat", "llama31")
    assert (t.seed, t.neftune_alpha, cfg.model.dtype, cfg.model.remat) == (
        33, 5.0, "bfloat16", "full")
    assert d.batch_size == (512 if is_70b else 256)  # ~4.2M / ~2.1M tokens per step
    assert t.steps is None and t.epoch_tokens is None
    assert t.output_dir == f"gs://bkt/basque-jax/{path.parent.name}/{path.stem}"
    assert d.batch_size % t.micro_batches == 0
    topo = parse_topology(cfg.plan.topology)
    assert cfg.plan.architecture == ("llama3.1-70b" if is_70b else "llama3.1-8b")
    if path.parent.name == "full":
        assert not cfg.lora.enabled and (o.lr, cfg.model.param_dtype) == (1e-5, "float32")
    else:
        assert cfg.lora.enabled and cfg.lora.base_dtype == "bfloat16"
        assert len(cfg.lora.targets) == 7
        assert topo.chips <= 16 if is_70b else topo.accelerator_type in ("v6e-8",
                                                                         "v5litepod-8")


def test_twins_differ_only_in_the_fine_tuning_method():
    for full, lora in zip(RUNS["full"], RUNS["lora"], strict=True):
        a, b = _load(full).to_dict(), _load(lora).to_dict()
        assert a["data"] == b["data"] and a["model"]["init_from"] == b["model"]["init_from"]
        assert {k for k in a if a[k] != b[k]} <= {"model", "lora", "optim", "train", "mesh",
                                                  "plan"}


# ------------------------------------------------------------------ composition features
def test_lists_extend_numbers_add_and_vars_substitute(tmp_path):
    (tmp_path / "a.yaml").write_text(
        "vars: {root: /data, name: x}\n"
        "model: {preset: tiny}\n"
        "data: {sources: [{kind: corpus, path: '${root}/a.jsonl'}], batch_size: 2, "
        "seq_len: 8, epochs: 3}\n"
        "train: {epoch_tokens: 100}\n")
    (tmp_path / "b.yaml").write_text(
        "data: {sources+: [{kind: corpus, path: '${root}/b.jsonl'}]}\n"
        "train: {epoch_tokens+: 60, output_dir: 'runs/${name}/${config_name}'}\n")
    (tmp_path / "run.yaml").write_text("base: [a.yaml, b.yaml]\n")
    cfg = load_config(tmp_path / "run.yaml", ["vars.root=/mnt"])
    assert [s.path for s in cfg.data.sources] == ["/mnt/a.jsonl", "/mnt/b.jsonl"]
    assert cfg.train.epoch_tokens == 160 and cfg.train.steps == math.ceil(3 * 160 / 16)
    assert cfg.train.output_dir == "runs/x/run"
    # the config saved in checkpoints round-trips
    from basque_jax.config import RunConfig

    assert RunConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ConfigError, match="set either train.steps or train.epoch_tokens"):
        load_config(tmp_path / "run.yaml", ["train.steps=5"])
    assert load_config(tmp_path / "run.yaml", ["train.steps=5",
                                               "train.epoch_tokens=null"]).train.steps == 5
    with pytest.raises(ConfigError, match=r"train.output_dir: unknown variable \$\{nme\}"):
        load_config(tmp_path / "run.yaml", ["train.output_dir=${nme}"])
    (tmp_path / "bad.yaml").write_text("base: a.yaml\ndata: {batch_size+: [1]}\n")
    with pytest.raises(ConfigError, match=r"batch_size\+: cannot extend int 2"):
        load_config(tmp_path / "bad.yaml")


def test_plan_section_is_validated():
    with pytest.raises(ConfigError, match="plan.topology: unknown TPU generation"):
        _load(RUNS["lora"][0], "plan.topology=v9-8")
    with pytest.raises(ConfigError, match="plan.architecture: unknown preset"):
        _load(RUNS["lora"][0], "plan.architecture=llama9")
    with pytest.raises(ConfigError, match=r"plan.mfu: must be in \(0, 1\]"):
        _load(RUNS["lora"][0], "plan.mfu=1.5")


def test_training_stops_and_saves_when_the_epochs_run_out(tmp_path, monkeypatch, capsys):
    """An over-estimated token budget: the data ends first, the run stops there and saves."""
    from basque_jax.checkpoint import Checkpointer
    from basque_jax.model import config as model_config
    from basque_jax.train.loop import run_training

    tiny = model_config.LlamaConfig.preset("demo").replace(hidden_size=64, intermediate_size=128,
                                                            num_hidden_layers=1)
    monkeypatch.setitem(model_config.PRESETS, "tiny-demo", tiny)
    (tmp_path / "run.yaml").write_text(
        "model: {preset: tiny-demo}\n"
        "data:\n  tokenizer: demo\n  seq_len: 128\n  batch_size: 8\n  epochs: 1\n"
        "  sources: [{kind: corpus, path: '@embedded/eu_sample_corpus.jsonl', max_records: 30}]\n"
        "train: {epoch_tokens: 100000000, progress_bar: false, tensorboard: false}\n")
    cfg = load_config(tmp_path / "run.yaml", [f"train.output_dir={tmp_path}"])
    assert cfg.train.steps == math.ceil(1e8 / (8 * 128))
    run_training(cfg)
    out = capsys.readouterr().out
    assert "data exhausted after step" in out
    done = int(out.split("data exhausted after step ")[1].split()[0])
    assert 0 < done < cfg.train.steps
    ckpt = Checkpointer(tmp_path / "checkpoints", async_save=False)
    assert ckpt.latest_step() == done
    ckpt.close()
