"""``basque-jax eval`` as two processes x 4 CPU devices (jax.distributed, gloo): every
process scores its share of each batch and generates its share of the rows; the results JSON
(written once, by process 0) equals one process on 8 devices, request by request."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from _lm_eval_utils import (
    TASK_FILES,
    gen_task,
    make_llama3_folder,
    mc_task,
    rolling_task,
    write_task_yaml,
)
from _multihost_utils import finish, start_two

pytestmark = pytest.mark.slow
TASKS = "tqa_eu_mc1_local,bhtc_news_ppl,qnli_eu_gen"


def _samples(out: Path) -> dict[str, list]:
    """Per task, the responses of every document in doc order."""
    found = {}
    for path in out.parent.glob("samples_*.jsonl"):
        rows = sorted((json.loads(x) for x in path.read_text().splitlines()),
                      key=lambda r: r["doc_id"])
        task = path.name.removeprefix("samples_").rsplit("_", 1)[0]
        found[task] = [r["resps"] for r in rows]
    return found


def test_two_processes_equal_one(tmp_path):
    if not all(f.exists() for f in TASK_FILES):
        pytest.skip("shared task data not present")
    from basque_jax.cli import main

    model = make_llama3_folder(tmp_path / "llama3")
    tasks = tmp_path / "tasks"
    for config in (mc_task(), rolling_task(), gen_task(max_gen_toks=6)):
        write_task_yaml(tasks, config)
    argv = ["eval", str(model), "--tasks", TASKS, "--include-path", str(tasks), "--limit", "6",
            "--batch-size", "8", "--bootstrap-iters", "0", "--log-samples"]
    one = tmp_path / "one" / "results.json"
    assert main([*argv, "--out", str(one)]) == 0

    two = tmp_path / "two" / "results.json"
    outputs, codes = finish(start_two([*argv, "--out", str(two)], tmp_path / "jax_cache"),
                            timeout=420)
    assert codes == [0, 0], outputs[0][-3000:] + outputs[1][-3000:]
    assert "[distributed] process 1 of 2, 4 local / 8 devices" in outputs[1]
    assert "|tqa_eu_mc1_local|" in outputs[0] and "|tqa_eu_mc1_local|" not in outputs[1]
    assert [p.name for p in two.parent.iterdir() if p.suffix == ".json"] == ["results.json"]

    got, want = _samples(two), _samples(one)
    assert sorted(got) == sorted(want) == sorted(TASKS.split(","))
    for task in want:  # log-likelihoods, greedy flags, generations
        assert got[task] == want[task], task
    results = [json.loads(p.read_text())["results"] for p in (one, two)]
    assert results[0] == results[1]
