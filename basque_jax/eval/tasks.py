"""lm-eval tasks with a basque_jax model: by name, glob, YAML file or inline config; the
``latxa`` suite; results written as lm-eval's command line writes them.

:func:`evaluate_tasks` runs ``lm_eval.simple_evaluate`` on a :class:`BasqueJaxLM` (or any lm-eval
``LM``) after checking every task name and loading every task here, so that a bad name or an
unreachable data set is one :class:`UserError` line, not a traceback from deep inside lm-eval.
:func:`write_results` saves exactly what ``lm_eval --output_path FILE.json`` saves
(``EvaluationTracker``), under the given file name; per-sample logs
``samples_<task>_<date>.jsonl`` go next to it.

The ``latxa`` suite is the Latxa Instruct study's benchmark list as far as upstream lm-eval
0.4.13 has it, with the study's settings: 5-shot (4 for bbq), ``--apply-chat-template
--fewshot-as-multiturn``, metric ``acc``. The study's tasks upstream lacks
(:data:`LATXA_MISSING`) run only when ``--include-path`` provides YAMLs with those names (the
authors' lm-eval fork has them); otherwise they are listed as missing, never substituted.
"""

from __future__ import annotations

import difflib
import functools
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from basque_jax.errors import UserError

LATXA_SHOTS = 5
LATXA_PRESENT = (
    "arc_eu_challenge", "arc_eu_easy", "belebele_eus_Latn", "belebele_eng_Latn",
    "belebele_spa_Latn", "eus_exams_eu", "eus_proficiency", "eus_reading", "eus_trivia",
    "mgsm_native_cot_eu", "mgsm_native_cot_en", "mgsm_native_cot_es", "piqa_eu", "piqa",
    "xstorycloze_eu", "xstorycloze_en", "xstorycloze_es", "arc_challenge", "arc_easy",
    "openbookqa_es", "bbq",
)
# The study's tasks that upstream lm-eval 0.4.13 does not have, and what it has instead.
LATXA_MISSING: dict[str, str] = {
    "bertaqa_eu_global": "upstream bertaqa_eu has the local and global questions together",
    "bertaqa_eu_local": "upstream bertaqa_eu has the local and global questions together",
    "bertaqa_en_global": "upstream bertaqa_en has the local and global questions together",
    "bertaqa_en_local": "upstream bertaqa_en has the local and global questions together",
    "bl2mp": "no upstream task (multiblimp_eus is a different data set)",
    "mmlu_eu": "no upstream task (m_mmlu_eu is Okapi's machine translation)",
    "mmlu_en": "not under this name (upstream English MMLU is the group mmlu)",
    "basqbbq": "no upstream task (esbbq and cabbq are its Spanish and Catalan relatives)",
}
FEWER_SHOTS = {"bbq": 4, "basqbbq": 4}  # the study's bbq-like tasks
SUITES = {"latxa": (LATXA_PRESENT, LATXA_MISSING)}

TaskSpec = str | dict[str, Any]


@functools.lru_cache(maxsize=4)
def _task_manager(include_path: tuple[str, ...], include_defaults: bool):
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=list(include_path) or None,
                       include_defaults=include_defaults)


def _is_yaml(spec: TaskSpec) -> bool:
    return isinstance(spec, str) and spec.endswith((".yaml", ".yml"))


def task_manager(specs: Sequence[TaskSpec], include_path: Sequence[str | Path] = ()):
    """A TaskManager that knows ``specs``: only ``include_path`` when it has them all (seconds),
    else lm-eval's ~15 000 built-in tasks too (indexing them takes ~20 s; cached per process)."""
    paths = tuple(str(p) for p in include_path)
    for p in paths:
        if not Path(p).is_dir():
            raise UserError(f"--include-path {p}: not a directory")
    small = _task_manager(paths, False)
    names = [s for s in specs if isinstance(s, str) and not _is_yaml(s)]
    if all(small.match_tasks([n]) for n in names):
        return small
    return _task_manager(paths, True)


def expand_specs(specs: Sequence[TaskSpec], tm) -> list[TaskSpec]:
    """Names and globs → task names (UserError with close matches for an unknown one); YAML
    paths must exist; inline dict configs pass through."""
    out: list[TaskSpec] = []
    for spec in specs:
        if isinstance(spec, dict):
            out.append(spec)
        elif _is_yaml(spec):
            if not Path(spec).is_file():
                raise UserError(f"task file {spec}: not found")
            out.append(spec)
        elif matched := tm.match_tasks([spec]):
            out += [m for m in matched if m not in out]
        else:
            close = difflib.get_close_matches(spec, tm.all_tasks, n=3)
            hint = f"; did you mean {', '.join(close)}?" if close else ""
            raise UserError(f"unknown task {spec!r}{hint} (lm-eval's task names, globs, YAML "
                            "files, or tasks under --include-path)")
    return out


def suite_specs(name: str, tm) -> tuple[list[str], dict[str, int], list[str]]:
    """The tasks of suite ``name`` that ``tm`` has, their shots, and the study's tasks
    missing from it."""
    if name not in SUITES:
        raise UserError(f"unknown suite {name!r}; known: {', '.join(SUITES)}")
    present, missing = SUITES[name]
    absent = [t for t in present if t not in tm.all_tasks]
    if absent:
        raise UserError(f"suite {name}: this lm-eval has no task {', '.join(absent)} (the suite "
                        "follows lm-eval 0.4.13)")
    found = [t for t in missing if t in tm.all_tasks]
    tasks = [*present, *found]
    shots = {t: FEWER_SHOTS.get(t, LATXA_SHOTS) for t in tasks}
    return tasks, shots, [t for t in missing if t not in found]


def _spec_name(spec: TaskSpec) -> str:
    return str(spec.get("task", spec.get("group", "?"))) if isinstance(spec, dict) else spec


def load_tasks(specs: Sequence[TaskSpec], tm, shots: Mapping[str, int] | None = None) -> list:
    """lm-eval Task / Group objects of ``specs`` (top level of each), with ``shots[spec]``
    few-shot examples for every task of that spec (unless its config fixes 0). A data set
    that cannot be loaded is a UserError naming the task."""
    objects: list = []
    for spec in specs:
        name = _spec_name(spec)
        try:
            loaded = tm.load([spec])
        except (ConnectionError, FileNotFoundError) as e:
            raise UserError(f"task {name}: its data set cannot be loaded ({e}); without network "
                            "it must be in the Hugging Face cache (HF_HOME) or in local files"
                            ) from None
        children = {c for kids in loaded["group_map"].values() for c in kids}
        tops = [g for n, g in loaded["groups"].items() if n not in children]
        tops += [t for n, t in loaded["tasks"].items() if n not in children]
        if shots is not None and name in shots:
            for task in loaded["tasks"].values():
                if task.get_config("num_fewshot") != 0:
                    task.set_config(key="num_fewshot", value=shots[name])
        objects += tops
    return objects


def evaluate_tasks(lm, tasks: Sequence[Any], *, tm=None, num_fewshot: int | None = None,
                   limit: int | float | None = None, apply_chat_template: bool = False,
                   fewshot_as_multiturn: bool | None = None,
                   system_instruction: str | None = None, log_samples: bool = False,
                   gen_kwargs: str | dict | None = None, bootstrap_iters: int = 100000,
                   model_args: dict | None = None, evaluation_tracker=None,
                   fewshot_random_seed: int = 1234) -> dict:
    """``lm_eval.simple_evaluate`` of ``lm`` on ``tasks`` (names / globs / YAML paths / dicts,
    already expanded and loaded by :func:`load_tasks`, or Task objects). ``num_fewshot``
    overrides the tasks' own (as lm-eval's does). ``fewshot_as_multiturn`` defaults to
    ``apply_chat_template``, as on lm-eval's command line."""
    from lm_eval import simple_evaluate

    if fewshot_as_multiturn is None:
        fewshot_as_multiturn = bool(apply_chat_template)
    if fewshot_as_multiturn and not apply_chat_template:
        raise UserError("fewshot_as_multiturn needs apply_chat_template")
    return simple_evaluate(
        model=lm, model_args=model_args or {}, tasks=list(tasks), num_fewshot=num_fewshot,
        limit=limit, log_samples=log_samples, apply_chat_template=apply_chat_template,
        fewshot_as_multiturn=fewshot_as_multiturn, system_instruction=system_instruction,
        gen_kwargs=gen_kwargs, bootstrap_iters=bootstrap_iters, task_manager=tm,
        evaluation_tracker=evaluation_tracker, fewshot_random_seed=fewshot_random_seed)


def write_results(results: dict, tracker, out: str | Path, *, log_samples: bool) -> Path:
    """Save ``results`` as lm-eval's command line does (``tracker`` made with
    ``output_path=out``), renamed from lm-eval's ``<stem>_<date>.json`` to ``out``."""
    out = Path(out)
    samples = results.pop("samples", None)
    tracker.save_results_aggregated(results=results, samples=samples if log_samples else None)
    written = out.with_name(f"{out.stem}_{getattr(tracker, 'date_id', '')}.json")
    if not written.is_file():  # the tracker logs its error and carries on
        raise UserError(f"--out {out}: lm-eval could not write the results (see its warning)")
    written.replace(out)
    if log_samples and samples is not None:
        for task_name in results["configs"]:
            tracker.save_results_samples(task_name=task_name, samples=samples[task_name])
    return out


def results_table(results: dict) -> str:
    """lm-eval's markdown tables (tasks, then groups when there are any)."""
    from lm_eval.utils import make_table

    text = make_table(results)
    if results.get("groups"):
        text += "\n" + make_table(results, "groups")
    return text


def flat_metrics(results: dict, prefix: str = "lm_eval") -> dict[str, float]:
    """``{"<prefix>/<task>/<metric>": value}`` for every numeric metric of every task and group
    (``metric,filter`` keys: ``metric`` for filter ``none``, else ``metric_filter``; stderr
    left out)."""
    out: dict[str, float] = {}
    for section in ("results", "groups"):
        for task, metrics in (results.get(section) or {}).items():
            for key, value in metrics.items():
                if "," not in key or "_stderr" in key or isinstance(value, bool) or \
                        not isinstance(value, int | float):
                    continue
                metric, filt = key.split(",", 1)
                name = metric if filt == "none" else f"{metric}_{filt}"
                out[f"{prefix}/{task}/{name}"] = float(value)
    return out
