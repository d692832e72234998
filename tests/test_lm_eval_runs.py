"""lm-eval on a training run: `basque_jax` on the run dir (LoRA unmerged, the tokenizer and chat
template its export carries) equals lm-eval's `hf` backend on the run's merged export; the
live evaluator on the training states; the `eval_tasks:` config section; the `latxa` suite
against upstream lm-eval's task index."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from _data_utils import need
from _lm_eval_utils import (
    TASK_FILES,
    assert_same_generations,
    assert_same_loglikelihoods,
    build_instances,
    gen_task,
    hf_reference,
    mc_task,
    one_torch_thread,
    write_task_yaml,
)
from _model_utils import make_tiny_hf

from basque_jax.errors import ConfigError, UserError

REPO = Path(__file__).resolve().parents[1]
CHAT_DATA = ('data.sources=[{kind: corpus, path: "@embedded/eu_sample_corpus.jsonl"}, '
             '{kind: chat, path: "@embedded/eu_sample_chat.jsonl"}]')

torch_one_thread = pytest.fixture(scope="module", autouse=True)(one_torch_thread)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A 3-step LoRA run on a tiny HF backbone (demo tokenizer) over corpus + chat data, with a
    local multiple-choice task (``root/tasks``) evaluated at every step, and its merged float32
    export."""
    need(*TASK_FILES)
    from basque_jax.config import load_config
    from basque_jax.export import export
    from basque_jax.train.loop import run_training

    root = tmp_path_factory.mktemp("lm_eval_run")
    backbone = make_tiny_hf(root / "hf", seed=4)
    write_task_yaml(root / "tasks", mc_task())
    cfg = load_config(REPO / "configs" / "demo.yaml", [
        "data.seq_len=128", "train.progress_bar=false", "train.tensorboard=true",
        "eval_data=null", "train.eval_every=0", "train.save_every=0", "train.steps=3",
        "optim.lr=3e-2", "optim.warmup_ratio=0.0", f"train.output_dir={root / 'run'}",
        f"model.init_from={backbone}", "model.preset=null", "lora.rank=4", "lora.alpha=8",
        CHAT_DATA, f"eval_tasks={{every: 1, tasks: [tqa_eu_mc1_local], include_path: "
        f"[{root / 'tasks'}], limit: 2, num_fewshot: 1, apply_chat_template: true}}"])
    last = run_training(cfg)
    assert "lm_eval/tqa_eu_mc1_local/acc" in last
    export(root / "run", root / "export", dtype="float32")
    return root / "run", root / "export"


@pytest.fixture(scope="module")
def run_pair(run):
    from basque_jax.eval.harness import BasqueJaxLM

    run_dir, exported = run
    return BasqueJaxLM(str(run_dir), batch_size=8), hf_reference(exported)


def test_run_dir_equals_hf_on_its_export(run_pair):
    from basque_jax.model.lora import has_lora

    ours, hf = run_pair
    assert has_lora(ours.model.merged()) and ours.model.step == 3  # adapters unmerged
    assert ours.tokenizer.chat_template == hf.tokenizer.chat_template  # the shipped template
    assert "Today Date: 26 Jul 2024" in ours.apply_chat_template([{"role": "user",
                                                                    "content": "Kaixo"}])
    eos = hf.model.generation_config.eos_token_id
    assert ours.generation.stop_ids == tuple(eos if isinstance(eos, list) else [eos])
    for chat in (False, True):
        assert_same_loglikelihoods(ours, hf, mc_task(), limit=2, shots=1 if chat else 0,
                                   chat=chat)
    assert_same_generations(ours, hf, gen_task(max_gen_toks=10), limit=3, shots=1, chat=True)


def test_training_logs_lm_eval_tasks_on_live_weights(run, run_pair):
    """``eval_tasks:`` in the run config: every step's metrics.jsonl has the task's metrics
    (also in TensorBoard); the last step's equal lm-eval's hf backend on the merged export."""
    import json

    from basque_jax.eval.tasks import evaluate_tasks, flat_metrics, task_manager

    run_dir, _ = run
    _, hf = run_pair
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    scored = {r["step"]: {k: v for k, v in r.items() if k.startswith("lm_eval/")}
              for r in records if any(k.startswith("lm_eval/") for k in r)}
    assert sorted(scored) == [1, 2, 3]
    tm = task_manager(["tqa_eu_mc1_local"], [run_dir.parent / "tasks"])
    want = flat_metrics(evaluate_tasks(hf, ["tqa_eu_mc1_local"], tm=tm, num_fewshot=1, limit=2,
                                       apply_chat_template=True, bootstrap_iters=0))
    assert scored[3] == want and set(want) == {"lm_eval/tqa_eu_mc1_local/acc",
                                               "lm_eval/tqa_eu_mc1_local/acc_norm"}
    assert (run_dir / "lm_eval" / "step_2.json").is_file()
    events = b"".join(p.read_bytes() for p in (run_dir / "tensorboard").glob("events.*"))
    assert b"lm_eval/tqa_eu_mc1_local/acc_norm" in events


def test_eval_tasks_config_errors():
    from basque_jax.eval.live import EvalTasksConfig
    from basque_jax.yaml_config import build

    for d, message in [
        ({"every": -1}, "eval_tasks.every: must be >= 0"),
        ({"every": 10}, "eval_tasks.tasks: give at least one lm-eval task"),
        ({"tasks": ["x"], "limit": 0}, "eval_tasks.limit: must be > 0"),
        ({"tasks": ["x"], "batch_size": 0}, "eval_tasks.batch_size: must be >= 1"),
        ({"tasks": ["x"], "fewshot_as_multiturn": True},
         "eval_tasks.fewshot_as_multiturn: needs apply_chat_template"),
        ({"tasks": ["x"], "include_path": ["/nowhere"]}, "eval_tasks.include_path: /nowhere"),
        ({"tasks": "x"}, "eval_tasks.tasks: expected a list"),
        ({"task": ["x"]}, "eval_tasks.task: unknown key"),
    ]:
        with pytest.raises(ConfigError, match=message):
            build(EvalTasksConfig, d, "eval_tasks")


def test_live_evaluator_on_training_states(run, run_pair, tmp_path, monkeypatch):
    """The training loop's view: graphdef + trainable / frozen states on the mesh. Metrics
    equal lm-eval's with the hf backend on the export; the second call reuses every compiled
    program; new weights give new scores."""
    import jax
    from flax import nnx

    import basque_jax.eval.tasks as tasks_module
    from basque_jax.eval.live import EvalTasksConfig, LiveEvaluator
    from basque_jax.eval.tasks import evaluate_tasks, flat_metrics
    from basque_jax.model.lora import trainable_filter
    from basque_jax.runs import load_model

    only_include_path = tasks_module._task_manager.__wrapped__
    monkeypatch.setattr(tasks_module, "_task_manager",
                        lambda paths, include_defaults: only_include_path(paths, False))
    run_dir, _ = run
    _, hf = run_pair
    write_task_yaml(tmp_path / "tasks", mc_task())
    write_task_yaml(tmp_path / "tasks", gen_task(max_gen_toks=6))
    cfg = EvalTasksConfig(every=1, tasks=["tqa_eu_mc1_local", "qnli_eu_gen"],
                          include_path=[str(tmp_path / "tasks")], limit=2, num_fewshot=1,
                          apply_chat_template=True, batch_size=8)
    loaded = load_model(run_dir)
    with pytest.raises(ConfigError, match="eval_tasks.tasks: unknown task 'nope'"):
        LiveEvaluator(EvalTasksConfig(tasks=["nope"]), None, None, None, loaded.run,
                      loaded.model.config)
    graphdef, params, frozen = nnx.split(loaded.model, trainable_filter("lora"), ...)
    live = LiveEvaluator(cfg, graphdef, loaded.mesh, loaded.rules, loaded.run,
                         loaded.model.config, out_dir=tmp_path / "out")
    first = live(3, params, frozen)
    want = flat_metrics(evaluate_tasks(hf, ["tqa_eu_mc1_local", "qnli_eu_gen"], tm=live.tm,
                                       num_fewshot=1, limit=2, apply_chat_template=True,
                                       bootstrap_iters=0))
    assert set(first) == {"lm_eval/tqa_eu_mc1_local/acc", "lm_eval/tqa_eu_mc1_local/acc_norm",
                          "lm_eval/qnli_eu_gen/exact_match_strip"}
    assert first == want
    assert (tmp_path / "out" / "lm_eval" / "step_3.json").is_file()
    scorer = live.lm.model.compiled["scorer"]
    assert live(4, params, frozen) == first and live.lm.model.compiled["scorer"] is scorer
    _, instances = build_instances(mc_task(), limit=1)
    before = live.lm.loglikelihood(instances[:2])
    live.lm.set_states(jax.tree.map(lambda x: x * 3.0, params), frozen)
    after = live.lm.loglikelihood(instances[:2])
    assert not np.allclose([b[0] for b in before], [a[0] for a in after])


@pytest.mark.slow
def test_latxa_suite_against_upstream_task_index(run, tmp_path, capsys, monkeypatch):
    """Every study task the suite names exists in lm-eval 0.4.13's own index (~20 s to
    build), none of those it lists as missing does; offline, the suite fails on its first
    data set with one line; a missing task given by --include-path joins the suite."""
    import datasets.config
    import huggingface_hub.constants

    from basque_jax.cli import main
    from basque_jax.eval.tasks import LATXA_MISSING, LATXA_PRESENT, suite_specs, task_manager

    fork = tmp_path / "fork"  # where the authors' YAML of a missing task would be
    write_task_yaml(fork, mc_task("bl2mp"))
    tm = task_manager(list(LATXA_PRESENT), [fork])
    assert all(t in tm.all_tasks for t in LATXA_PRESENT)
    assert not any(t in tm.all_tasks for t in LATXA_MISSING if t != "bl2mp")
    upstream = Path(tm.task_index["arc_eu_easy"].yaml_path).parents[1]
    assert not list(upstream.rglob("bl2mp*"))
    specs, shots, missing = suite_specs("latxa", tm)
    assert specs == [*LATXA_PRESENT, "bl2mp"] and missing == [t for t in LATXA_MISSING
                                                              if t != "bl2mp"]
    assert shots["bbq"] == 4 and {shots[t] for t in specs if t != "bbq"} == {5}
    with pytest.raises(UserError, match="suite latxa: this lm-eval has no task arc_eu"):
        suite_specs("latxa", task_manager(["bl2mp"], [fork]))
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    assert main(["eval", str(run[0]), "--suite", "latxa", "--include-path", str(fork)]) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("basque-jax eval: task arc_eu_challenge: its data set cannot be "
                           "loaded (Couldn't reach 'HiTZ/ARC-eu' on the Hub"), last
