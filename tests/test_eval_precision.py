"""``benchmarks/eval_precision.py`` on a tiny random Llama 3.1: every source reports over the
same tokens and the errors are the size float32 rounding gives. (torch's log-softmax bias
shows on a trained model's peaked distributions, not on these flat random ones.)"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

from _data_utils import need
from _lm_eval_utils import BHTC, LLAMA3_FILES, make_llama3_folder

ROOT = Path(__file__).resolve().parents[1]


def test_reports_each_source(tmp_path, capsys):
    need(*LLAMA3_FILES, BHTC)
    spec = importlib.util.spec_from_file_location("eval_precision",
                                                  ROOT / "benchmarks" / "eval_precision.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    folder = make_llama3_folder(tmp_path / "tiny")
    assert script.main(["--model", str(folder), "--docs", "3", "--max-tokens", "40",
                        "--window", "8"]) == 0
    rows = {r["source"]: r for r in map(json.loads, capsys.readouterr().out.splitlines())}
    assert set(rows) == {"forward/basque_jax", "forward/transformers",
                         "log_softmax/torch_cpu", "log_softmax/basque_jax"}
    assert all(r["tokens"] == rows["forward/basque_jax"]["tokens"] > 60 for r in rows.values())
    for source in ("forward/basque_jax", "forward/transformers"):
        assert 0 < rows[source]["max"] < 1e-4, rows[source]  # 2 layers of float32 rounding
    for source in ("log_softmax/basque_jax", "log_softmax/torch_cpu"):
        assert 0 < rows[source]["max"] < 5e-6, rows[source]
    assert script.main(["--data", str(tmp_path / "missing.jsonl")]) == 2
    assert script.main(["--model", str(tmp_path)]) == 2
