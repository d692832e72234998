"""Multi-host training: two processes x 4 CPU devices (jax.distributed, gloo collectives, a
local coordinator) train LoRA, checkpoint, resume, and match one process on 8 devices."""

from __future__ import annotations

import argparse
import json
import subprocess
import time
from pathlib import Path

import jax
import numpy as np
import pytest
from _multihost_utils import finish, start_two

from basque_jax import distributed
from basque_jax.config import load_config
from basque_jax.data.pipeline import make_pipeline
from basque_jax.data.tokenizer import load_tokenizer
from basque_jax.sharding import use_sharding
from basque_jax.train.setup import setup_training

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "configs" / "demo.yaml"
# Constant learning rate: a 2-step run resumed to 4 steps follows the same schedule as 4 steps.
RUN = ["data.seq_len=128", "data.batch_size=8", "data.worker_count=0",
       "eval_data=null", "train.eval_every=0", "train.progress_bar=false",
       "train.tensorboard=false", "train.log_every=1", "optim.lr=3e-3",
       "optim.warmup_ratio=0.0", "optim.min_lr_ratio=1.0", "mesh.data=-1"]


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> str:
    """A small random model as a Hugging Face folder (loaded shard by shard on every host)."""
    from flax import nnx

    from basque_jax.model.config import LlamaConfig
    from basque_jax.model.hf import save_pretrained
    from basque_jax.model.llama import Llama

    config = LlamaConfig.preset("demo").replace(hidden_size=64, intermediate_size=128,
                                                 num_hidden_layers=2)
    folder = tmp_path_factory.mktemp("tiny_hf")
    save_pretrained(Llama(config, rngs=nnx.Rngs(7)), folder)
    return str(folder)


def _start_two(out_dir: Path, *args: str) -> list[subprocess.Popen]:
    """``basque-jax train`` of the demo config as processes 0 and 1 of 2."""
    return start_two(["train", str(DEMO), *RUN, *args, f"train.output_dir={out_dir}"],
                     out_dir.parent / "jax_cache")


def _launch_two(out_dir: Path, steps: int, model: str, *extra: str) -> list[str]:
    outputs, codes = finish(_start_two(out_dir, "model.preset=null", f"model.init_from={model}",
                                        f"train.steps={steps}", *extra))
    for out, code in zip(outputs, codes, strict=True):
        assert code == 0, out[-3000:]
    return outputs


def _reference_losses(steps: int, model: str
                      ) -> tuple[list[float], list[list[dict[str, np.ndarray]]]]:
    """One process, 8 devices: the same steps on the union of both hosts' rows (host 0 first,
    as ``make_global_batch`` lays them out)."""
    cfg = load_config(DEMO, [*RUN, "model.preset=null", f"model.init_from={model}",
                             f"train.steps={steps}"])
    setup = setup_training(cfg)
    tok = load_tokenizer(cfg.data.tokenizer)
    hosts = [make_pipeline(cfg.data, tok, process_index=i, process_count=2) for i in range(2)]
    state, losses, first = setup.state, [], []
    with use_sharding(setup.mesh, setup.rules):
        for _ in range(steps):
            rows = [next(h) for h in hosts]
            first.append(rows)
            batch = {k: np.concatenate([r[k] for r in rows]) for k in rows[0]}
            state, metrics = setup.step_fn(state, setup.frozen, setup.global_batch(batch))
            losses.append(float(metrics["loss"]))
    return losses, first


@pytest.mark.slow
def test_two_processes_match_one_and_resume(tmp_path, tiny_model):
    out_dir = tmp_path / "run"
    first = _launch_two(out_dir, steps=2, model=tiny_model)
    assert any("[distributed] process 0 of 2, 4 local / 8 devices" in o for o in first)
    assert any("[distributed] process 1 of 2, 4 local / 8 devices" in o for o in first)
    second = _launch_two(out_dir, 4, tiny_model, "train.accept_config_changes=true")
    assert all("resumed from" in o for o in second), second[0][-2000:]
    # both processes restore the data iterator they saved
    saved = (out_dir / "checkpoints" / "2" / "data").iterdir()
    assert sorted(p.name for p in saved if p.name.startswith("process_")) == [
        "process_0-of-2.json", "process_1-of-2.json"]

    records = [json.loads(x) for x in (out_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3, 4]  # process 0 only writes
    ref, rows = _reference_losses(4, tiny_model)
    np.testing.assert_allclose([r["loss"] for r in records], ref, rtol=2e-5)

    # the hosts read disjoint data: no row of host 0 is a row of host 1
    for host0, host1 in rows:
        a = {r.tobytes() for r in host0["input_ids"]}
        b = {r.tobytes() for r in host1["input_ids"]}
        assert not a & b


def _uneven_corpus(tmp_path: Path) -> tuple[list[str], list[int]]:
    """Overrides reading records whose packing gives the two hosts different numbers of
    batches, and those numbers."""
    rng = np.random.default_rng(0)
    words = ["mendi", "itsaso", "etxe", "herri", "kale", "ibai", "zuhaitz", "lore"]
    rows = [{"text": " ".join(rng.choice(words, int(rng.integers(3, 40))))} for _ in range(40)]
    path = tmp_path / "uneven.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    tok = load_tokenizer("demo")
    for seed in range(50):
        args = [f"data.sources=[{{kind: corpus, path: {path}}}]", "data.epochs=1",
                "data.seq_len=64", f"data.seed={seed}", "train.steps=20"]
        cfg = load_config(DEMO, [*RUN, *args])
        counts = [sum(1 for _ in make_pipeline(cfg.data, tok, process_index=i,
                                               process_count=2)) for i in range(2)]
        if counts[0] != counts[1]:
            return args, counts
    raise AssertionError("no seed gives uneven shards")


@pytest.mark.slow
def test_hosts_with_uneven_data_stop_together_in_training_and_eval(tmp_path, tiny_model):
    """Host A runs out of batches before host B: both stop at A's last step (training and
    held-out loss alike) instead of B waiting forever in a collective."""
    args, counts = _uneven_corpus(tmp_path)
    sources = args[0].split("=", 1)[1]
    eval_args = [f"eval_data={{tokenizer: demo, sources: {sources}, seq_len: 64, epochs: 1, "
                 f"batch_size: 8, seed: {args[3].split('=')[1]}}}", "train.eval_every=1",
                 "train.eval_batches=100"]
    outputs, codes = finish(_start_two(tmp_path / "run", "model.preset=null",
                                        f"model.init_from={tiny_model}", *args, *eval_args),
                             timeout=420)
    assert codes == [0, 0], outputs[0][-2000:] + outputs[1][-2000:]
    assert all(f"data exhausted after step {min(counts)} " in o for o in outputs), counts


@pytest.mark.slow
def test_a_preempted_host_makes_every_host_save_the_same_step(tmp_path, tiny_model):
    out = tmp_path / "run"
    procs = _start_two(out, "model.preset=null", f"model.init_from={tiny_model}",
                       "train.steps=200", "data.epochs=null")
    metrics = out / "metrics.jsonl"
    deadline = time.time() + 300
    while not (metrics.exists() and len(metrics.read_text().splitlines()) >= 3):
        assert time.time() < deadline and all(p.poll() is None for p in procs)
        time.sleep(0.1)
    procs[1].send_signal(15)  # SIGTERM to one host only
    outputs, codes = finish(procs, timeout=300)
    assert codes == [75, 75], outputs[0][-2000:] + outputs[1][-2000:]
    steps = [int(o.split("preempted: saved step ")[1].split()[0]) for o in outputs]
    assert steps[0] == steps[1] and 3 <= steps[0] < 200
    from basque_jax.checkpoint import Checkpointer

    ckpt = Checkpointer(out / "checkpoints", async_save=False)
    assert ckpt.latest_step() == steps[0]
    ckpt.close()


# ------------------------------------------------------------------ settings
def _args(**kw) -> argparse.Namespace:
    return argparse.Namespace(**{"coordinator": None, "num_processes": None, "process_id": None,
                                 **kw})


def test_explicit_settings_from_flags_or_environment():
    env = {distributed.ENV_COORDINATOR: "10.0.0.1:1234", distributed.ENV_NUM_PROCESSES: "4",
           distributed.ENV_PROCESS_ID: "3"}
    assert distributed.plan(_args(), env) == distributed.Explicit("10.0.0.1:1234", 4, 3)
    flags = _args(coordinator="h:1", num_processes=2, process_id=0)
    assert distributed.plan(flags, env) == distributed.Explicit("h:1", 2, 0)  # flags win
    with pytest.raises(ValueError, match="also give --num-processes, --process-id"):
        distributed.plan(_args(coordinator="h:1"), {})
    with pytest.raises(ValueError, match=r"process id 2 is not in \[0, 2\)"):
        distributed.plan(_args(coordinator="h:1", num_processes=2, process_id=2), {})
    with pytest.raises(ValueError, match="HOST:PORT"):
        distributed.plan(_args(coordinator="h", num_processes=2, process_id=0), {})
    with pytest.raises(ValueError, match="BASQUE_JAX_PROCESS_ID: expected an integer"):
        distributed.plan(_args(), {**env, distributed.ENV_PROCESS_ID: "one"})


def test_tpu_vms_initialize_automatically(tmp_path):
    assert distributed.on_cloud_tpu_vm({}, sysfs=str(tmp_path)) is False
    device = tmp_path / "devices" / "0000:00:04.0"
    device.mkdir(parents=True)
    (device / "vendor").write_text("0x1ae0\n")  # Google's PCI vendor id: a TPU chip
    assert distributed.on_cloud_tpu_vm({}, sysfs=str(tmp_path)) is True
    assert distributed.on_cloud_tpu_vm({"TPU_WORKER_HOSTNAMES": "a,b"}, sysfs="/none") is True
    assert distributed.plan(_args(), {"TPU_WORKER_HOSTNAMES": "a,b"}) == "auto"
    assert distributed.plan(_args(), {"TPU_WORKER_HOSTNAMES": "a,b",
                                      distributed.ENV_MODE: "off"}) is None
    assert distributed.plan(_args(), {distributed.ENV_MODE: "auto"}) == "auto"
    assert distributed.initialize(_args(), {distributed.ENV_MODE: "off"}) == "single process"
    assert jax.process_count() == 1
