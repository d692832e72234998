"""lm-eval tasks on the weights being trained (the run config's ``eval_tasks:`` section).

The training loop hands over its live parameter states (trainable + frozen, on the mesh);
:class:`LiveEvaluator` wraps them in a :class:`~basque_jax.eval.harness.BasqueJaxLM` -- nothing
is reloaded or exported, the tokenizer and chat template are the ones the run's export will
carry -- and runs the tasks with ``lm_eval.simple_evaluate``. The task manager, the loaded tasks
and data sets, the jitted scorer and the samplers are built once and reused at every call.
Python's, NumPy's and (when installed) torch's global random states are restored after each
evaluation (lm-eval seeds them), so evaluating does not change what training does.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import jax
import numpy as np
from etils import epath

from basque_jax.errors import ConfigError, UserError

if TYPE_CHECKING:
    from flax import nnx
    from jax.sharding import Mesh

    from basque_jax.config import RunConfig
    from basque_jax.model.config import LlamaConfig


@dataclass
class EvalTasksConfig:
    """The run config's ``eval_tasks:`` section: every ``every`` steps (0: never) the lm-eval
    ``tasks`` (names, globs, YAML files, or the suite ``latxa``; ``include_path``: folders of
    task YAMLs) run on the live weights; metrics ``lm_eval/<task>/<metric>`` are logged.

    num_fewshot: overrides the tasks' own (the suite's: 5, bbq 4). limit: documents per task
    (a fraction if < 1). batch_size: scored rows / sampler slots. apply_chat_template /
    fewshot_as_multiturn (default: as apply_chat_template) / system_instruction: as lm-eval's.
    """

    every: int = 0
    tasks: list[str] = field(default_factory=list)
    include_path: list[str] = field(default_factory=list)
    num_fewshot: int | None = None
    limit: int | float | None = None
    batch_size: int = 8
    apply_chat_template: bool = False
    fewshot_as_multiturn: bool | None = None
    system_instruction: str | None = None

    def __post_init__(self) -> None:
        if self.every < 0:
            raise ConfigError(f"eval_tasks.every: must be >= 0, got {self.every}")
        if self.every and not self.tasks:
            raise ConfigError("eval_tasks.tasks: give at least one lm-eval task (or the suite "
                              f"latxa) to evaluate every {self.every} steps")
        if self.num_fewshot is not None and self.num_fewshot < 0:
            raise ConfigError(f"eval_tasks.num_fewshot: must be >= 0, got {self.num_fewshot}")
        if self.limit is not None and self.limit <= 0:
            raise ConfigError(f"eval_tasks.limit: must be > 0, got {self.limit}")
        if self.batch_size < 1:
            raise ConfigError(f"eval_tasks.batch_size: must be >= 1, got {self.batch_size}")
        if self.fewshot_as_multiturn and not self.apply_chat_template:
            raise ConfigError("eval_tasks.fewshot_as_multiturn: needs apply_chat_template: true")
        for p in self.include_path:
            if not Path(p).is_dir():
                raise ConfigError(f"eval_tasks.include_path: {p} is not a directory")


def resolve_specs(names: list[str], tm) -> tuple[list, dict[str, int] | None]:
    """Task specs of ``names`` (a suite name expands to its tasks) and the suite's shots."""
    from basque_jax.eval.tasks import SUITES, expand_specs, suite_specs

    specs: list = []
    shots: dict[str, int] = {}
    plain = [n for n in names if n not in SUITES]
    for n in names:
        if n in SUITES:
            tasks, suite_shots, _ = suite_specs(n, tm)
            specs += tasks
            shots.update(suite_shots)
    specs += expand_specs(plain, tm)
    return specs, shots or None


def _torch():
    """torch when installed (lm-eval seeds its global generator too), else None."""
    try:
        import torch
    except ImportError:
        return None
    return torch


class LiveEvaluator:
    """``evaluator(step, params, frozen) -> {"lm_eval/<task>/<metric>": value}``.

    graphdef / mesh / rules: the training set-up's (``nnx.merge(graphdef, params, frozen)`` is
    the model). run / model_config: the run's config and model config (for the tokenizer and
    chat template of its export). out_dir: also write each evaluation's full lm-eval results
    to ``out_dir/lm_eval/step_<N>.json`` (process 0).
    """

    def __init__(self, cfg: EvalTasksConfig, graphdef: nnx.GraphDef, mesh: Mesh,
                 rules: dict[str, Any], run: RunConfig, model_config: LlamaConfig, *,
                 out_dir: str | Path | epath.Path | None = None):
        from basque_jax.eval.hf_tokenizer import export_tokenizer
        from basque_jax.eval.tasks import load_tasks, task_manager
        from basque_jax.export.files import run_files

        self.cfg = cfg
        self.graphdef, self.mesh, self.rules = graphdef, mesh, rules
        self.name = str(run.train.output_dir)
        self.out_dir = None if out_dir is None else epath.Path(out_dir)
        self.tokenizer, self.generation = export_tokenizer(run_files(run, model_config),
                                                           name=self.name)
        try:
            self.tm = task_manager(cfg.tasks, cfg.include_path)
            specs, shots = resolve_specs(cfg.tasks, self.tm)
            self.tasks = load_tasks(specs, self.tm, shots if cfg.num_fewshot is None else None)
        except UserError as e:
            raise ConfigError(f"eval_tasks.tasks: {e}") from None
        self.lm = None

    def _lm(self, step: int, states: tuple[Any, ...]):
        from basque_jax.eval.harness import BasqueJaxLM, EvalModel

        if self.lm is None:
            model = EvalModel(self.graphdef, states, self.mesh, self.rules, self.tokenizer,
                              self.generation, self.name, step)
            self.lm = BasqueJaxLM(model, batch_size=self.cfg.batch_size)
        else:
            self.lm.set_states(*states)
            self.lm.model.step = step
        return self.lm

    def __call__(self, step: int, params: Any, frozen: Any) -> dict[str, float]:
        """Run the tasks on these weights; the flat metrics."""
        from basque_jax.eval.tasks import evaluate_tasks, flat_metrics

        torch = _torch()
        lm = self._lm(step, (params, frozen))
        saved = (random.getstate(), np.random.get_state(),
                 None if torch is None else torch.random.get_rng_state())
        try:
            cfg = self.cfg
            results = evaluate_tasks(
                lm, self.tasks, tm=self.tm, num_fewshot=cfg.num_fewshot, limit=cfg.limit,
                apply_chat_template=cfg.apply_chat_template,
                fewshot_as_multiturn=cfg.fewshot_as_multiturn,
                system_instruction=cfg.system_instruction, bootstrap_iters=0,
                model_args={"pretrained": self.name, "step": step})
        finally:
            random.setstate(saved[0])
            np.random.set_state(saved[1])
            if torch is not None:
                torch.random.set_rng_state(saved[2])
        if self.out_dir is not None and jax.process_index() == 0:
            from lm_eval.utils import handle_non_serializable

            path = self.out_dir / "lm_eval" / f"step_{step}.json"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(results, indent=2, default=handle_non_serializable,
                                       ensure_ascii=False))
        return flat_metrics(results)
