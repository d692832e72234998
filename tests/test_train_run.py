"""`basque-jax train` end to end: configs, checkpoints, SIGKILL resume, mesh change, divergence."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from basque_jax.checkpoint import Checkpointer
from basque_jax.config import ConfigError, load_config
from basque_jax.train.loop import TrainingDiverged, run_training
from basque_jax.train.setup import setup_training

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "configs" / "demo.yaml"
SHARED = REPO.parent / "shared" / "data"
SMALL = ["model.preset=tiny-demo", "data.seq_len=128", "data.batch_size=8",
         "train.progress_bar=false", "train.tensorboard=false", "eval_data=null",
         "train.eval_every=0", "optim.lr=3e-3"]


@pytest.fixture(autouse=True)
def tiny_demo_preset(monkeypatch):
    from basque_jax.model import config as model_config

    tiny = model_config.LlamaConfig.preset("demo").replace(hidden_size=64, intermediate_size=128,
                                                            num_hidden_layers=2)
    monkeypatch.setitem(model_config.PRESETS, "tiny-demo", tiny)


def _final_params(out_dir: Path) -> dict[str, np.ndarray]:
    ckpt = Checkpointer(out_dir / "checkpoints", async_save=False)
    step = ckpt.latest_step()
    restored = ckpt.manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore()))
    ckpt.close()
    return {k: np.asarray(v) for k, v in restored["state"].items()}


# ------------------------------------------------------------------ config validation
@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("train.stepz=3", r"train\.stepz: unknown key"),
        ("train.steps=ten", r"train\.steps: expected int or null, got str 'ten'"),
        ("train.steps=0", r"train\.steps: must be >= 1"),
        ("optim.lr=-1", r"optim\.lr: must be > 0"),
        ("optim.warmup_ratio=1.5", r"optim\.warmup_ratio: must be in \[0, 1\)"),
        ("model.remat=sometimes", r"model\.remat: expected one of"),
        ("model.scan_unroll=0", r"model\.scan_unroll: expected true or an integer >= 1"),
        ("model.init_from=/x", r"model: set exactly one of preset, init_from"),
        ("lora.targets=[q_proj,qq_proj]", r"lora\.targets: unknown \['qq_proj'\]"),
        ("lora.rank=0", r"lora\.rank: must be a positive integer"),
        ("train.micro_batches=3", r"train\.micro_batches: 3 does not divide data\.batch_size 8"),
        ("mesh.rules={bogus: data}", r"mesh\.rules\.bogus: unknown logical axis"),
        ("data.seq_len=1", r"seq_len must be >= 2"),
        ("eval_data=null", r"train\.eval_every: set eval_data"),
        ("nonsense", r"override 'nonsense': expected key=value"),
    ],
)
def test_bad_configs_name_the_key(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(DEMO, [override])


def test_config_file_errors(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed\n")
    with pytest.raises(ConfigError, match="invalid YAML"):
        load_config(bad)
    child = tmp_path / "child.yaml"
    child.write_text(f"base: {DEMO}\ntrain: {{steps: 7}}\n")
    cfg = load_config(child)
    assert cfg.train.steps == 7 and cfg.lora.enabled  # composed from the base


def test_scan_unroll_reaches_the_model():
    from basque_jax.model.config import LlamaConfig
    from basque_jax.runs import construct

    cfg = load_config(DEMO, ["model.scan_unroll=true"])
    assert construct(cfg, LlamaConfig.preset("tiny")).scan_unroll is True
    assert construct(load_config(DEMO), LlamaConfig.preset("tiny")).scan_unroll == 1


def test_impossible_mesh_is_reported():
    cfg = load_config(DEMO, [*SMALL, "mesh.data=3"])
    with pytest.raises(ValueError, match="3"):
        setup_training(cfg)


# ------------------------------------------------------------------ runs
def _train_cmd(out_dir: Path, *extra: str) -> list[str]:
    # A subprocess does not see the monkeypatched preset: use the shipped demo size.
    return [sys.executable, "-m", "basque_jax.cli", "train", str(DEMO), *SMALL,
            "model.preset=demo", f"train.output_dir={out_dir}", *extra]


def _env():
    env = dict(os.environ)
    env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
    env["JAX_PLATFORMS"] = "cpu"
    return env


def _wait_for_steps(proc, metrics: Path, steps: int) -> None:
    deadline = time.time() + 300
    while time.time() < deadline:
        assert proc.poll() is None, "training ended before the signal"
        if metrics.exists() and len(metrics.read_text().splitlines()) >= steps:
            return
        time.sleep(0.05)


@pytest.mark.slow
def test_sigterm_then_sigkill_and_restarts_are_bitwise_identical(tmp_path):
    """A preemption (SIGTERM) saves the current step and exits 75; a kill -9 loses only what
    came after the last checkpoint; both restarts end on the uninterrupted run's weights."""
    args = ("train.steps=24", "train.save_every=8", "train.log_every=1", "data.worker_count=0")
    ref_dir, run_dir = tmp_path / "ref", tmp_path / "interrupted"
    subprocess.run(_train_cmd(ref_dir, *args), check=True, env=_env(), capture_output=True)
    metrics = run_dir / "metrics.jsonl"

    proc = subprocess.Popen(_train_cmd(run_dir, *args), env=_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    _wait_for_steps(proc, metrics, 5)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=120) == 75, proc.stderr.read()
    assert "preempted: saved step" in proc.stderr.read()
    ckpt = Checkpointer(run_dir / "checkpoints", async_save=False)
    saved = ckpt.latest_step()
    ckpt.close()
    assert 5 <= saved < 8  # the step it was at, not the last multiple of save_every

    proc = subprocess.Popen(_train_cmd(run_dir, *args), env=_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    _wait_for_steps(proc, metrics, 18)  # past the resumed run's checkpoint at step 16
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    result = subprocess.run(_train_cmd(run_dir, *args), env=_env(), capture_output=True,
                            text=True, check=True)
    assert "resumed from" in result.stdout
    ref, resumed = _final_params(ref_dir), _final_params(run_dir)
    assert sorted(ref) == sorted(resumed)
    for k in ref:
        np.testing.assert_array_equal(resumed[k], ref[k], err_msg=k)


def test_resume_refuses_a_changed_config_unless_accepted(tmp_path):
    base = [*SMALL, "train.steps=2", f"train.output_dir={tmp_path}"]
    run_training(load_config(DEMO, base))
    changed = load_config(DEMO, [*base, "train.steps=4", "optim.lr=1e-2", "lora.rank=4",
                                 "train.log_every=1", "mesh.data=2", "mesh.fsdp=-1"])
    with pytest.raises(ConfigError, match=r"differs from the checkpoint's in 3 field\(s\): "
                       r"lora\.rank: 16 -> 4; optim\.lr: 0\.003 -> 0\.01; train\.steps: 2 -> 4"):
        run_training(changed)
    accepted = load_config(DEMO, [*base, "train.steps=4", "train.accept_config_changes=true"])
    assert run_training(accepted)["loss"] > 0  # logging cadence / mesh changes are free


def test_checkpoint_restores_onto_another_mesh(tmp_path):
    cfg = load_config(DEMO, [*SMALL, "train.steps=3", f"train.output_dir={tmp_path}"])
    run_training(cfg)
    saved = _final_params(tmp_path)
    other = load_config(DEMO, [*SMALL, "train.steps=3", f"train.output_dir={tmp_path}",
                               "mesh.data=1", "mesh.fsdp=4", "mesh.tensor=2",
                               "lora.enabled=true"])
    setup = setup_training(other)
    ckpt = Checkpointer(tmp_path / "checkpoints", async_save=False)
    state, meta = ckpt.restore(ckpt.latest_step(), setup.state, None)
    ckpt.close()
    assert meta["step"] == 3 and meta["lora"]["rank"] == 16
    leaves = jax.tree_util.tree_flatten_with_path(state)[0]
    for path, leaf in leaves:
        np.testing.assert_array_equal(np.asarray(leaf), saved[jax.tree_util.keystr(path)])
    kernel = state.params["layers"]["self_attn"]["q_proj"]["lora_b"]
    kernel = getattr(kernel, "value", kernel)
    assert kernel.sharding.mesh.shape == {"dcn": 1, "data": 1, "fsdp": 4, "tensor": 2}


def test_divergence_stops_and_keeps_last_good_checkpoint(tmp_path):
    cfg = load_config(DEMO, [*SMALL, "lora.enabled=false", "train.steps=40", "train.save_every=2",
                             "train.log_every=1", "optim.lr=1e30", "optim.clip_norm=null",
                             "optim.warmup_ratio=0.5", f"train.output_dir={tmp_path}"])
    with pytest.raises(TrainingDiverged, match=r"loss is (nan|inf).*last good checkpoint"):
        run_training(cfg)
    steps = Checkpointer(tmp_path / "checkpoints", async_save=False).manager.all_steps()
    assert steps, "no checkpoint kept"
    for step in steps:
        record = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()
                  if json.loads(x)["step"] == step]
        assert record and np.isfinite(record[0]["loss"])


@pytest.mark.skipif(not (SHARED / "eu" / "bhtc_news_train.jsonl").exists(),
                    reason="../shared/data/eu (real Basque text) is absent")
def test_heldout_loss_falls_on_real_basque_text(tmp_path):
    cfg = load_config(DEMO, [
        *[o for o in SMALL if not o.startswith(("eval_data", "train.eval_every"))],
        f"data.sources=[{{kind: corpus, path: {SHARED}/eu/bhtc_news_train.jsonl}}]",
        f"eval_data.sources=[{{kind: corpus, path: {SHARED}/eu/bhtc_news_val.jsonl}}]",
        "eval_data.seq_len=128", "eval_data.batch_size=8", "train.eval_batches=4",
        "lora.enabled=false", "train.steps=60", "train.eval_every=30", "train.log_every=30",
        f"train.output_dir={tmp_path}", "optim.lr=3e-3",
    ])
    run_training(cfg)
    evals = [json.loads(x)["eval_loss"] for x in (tmp_path / "metrics.jsonl").read_text()
             .splitlines() if "eval_loss" in json.loads(x)]
    assert len(evals) == 3  # step 0, 30, 60
    assert evals[0] > 6.5  # ~ln(1272) for the random init
    assert evals[-1] < evals[0] - 1.2, evals
    assert evals[-1] < evals[1]


def test_logged_flops_use_the_rank_of_the_adapter_the_run_has(tmp_path):
    """``lora.init_from`` brings its own rank (8): FLOPs/MFU count it, not the YAML's 16."""
    from basque_jax.export import export
    from basque_jax.model.config import LlamaConfig
    from basque_jax.train.flops import train_flops_per_token

    first = tmp_path / "rank8"
    run_training(load_config(DEMO, [*SMALL, "train.steps=1", f"train.output_dir={first}",
                                    "lora.rank=8"]))
    export(first, tmp_path / "adapter", mode="peft")
    second = tmp_path / "continued"
    cfg = load_config(DEMO, [*SMALL, "train.steps=2", "train.log_every=1", "lora.rank=16",
                             f"lora.init_from={tmp_path / 'adapter'}",
                             f"train.output_dir={second}"])
    run_training(cfg)
    record = json.loads((second / "metrics.jsonl").read_text().splitlines()[-1])
    per_token = record["tflops_per_device"] * 1e12 * jax.device_count() / record["tokens_per_s"]
    config = LlamaConfig.preset("tiny-demo")
    want = train_flops_per_token(config, 128, lora_rank=8, lora_targets=cfg.lora.targets)
    assert per_token == pytest.approx(want, rel=1e-9)
    assert per_token != pytest.approx(train_flops_per_token(
        config, 128, lora_rank=16, lora_targets=cfg.lora.targets), rel=1e-3)
