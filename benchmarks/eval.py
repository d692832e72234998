"""Requests/s of lm-eval's ``basque_jax`` model vs lm-eval's own ``hf`` backend (HFLM, torch,
CPU), on the same model folder, the same task requests and the same machine, in one run.

Workloads (offline task YAMLs of the tests, over ``../shared/data/eu``):

* ``loglikelihood``: the multiple-choice requests of TruthfulQA-eu (one per choice), 0-shot,
  and again ``--mc-fewshot``-shot (5, the study's setting: long contexts shared by the choices,
  which ``basque_jax`` runs once per question);
* ``generate_until``: greedy generation over QNLI-eu with stop strings ``\\n`` / ``.`` and
  ``--max-gen-toks`` new tokens, 1-shot.

Model: SmolLM2-135M-Instruct (``--model``: any HF folder or named model), float32 on both
sides, batch ``--batch-size`` on both. Each side runs every workload once to warm up (our
compilation, torch's first-call costs), then ``--repeats`` timed runs alternate between the
sides and the best of each counts. The outputs are compared too (max |delta log-likelihood|,
identical generations), so the two sides do the same work. One JSON line per workload (with
the 1-minute load average), then a summary line.

    python benchmarks/eval.py [--limit 4 --repeats 2 --batch-size 8 --max-gen-toks 8
                              --mc-fewshot 5]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # the task configs


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--limit", type=int, default=4, help="documents per workload")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-gen-toks", type=int, default=8)
    p.add_argument("--mc-fewshot", type=int, default=5,
                   help="few-shot examples of the second loglikelihood workload")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    import numpy as np
    import torch
    from _lm_eval_utils import TASK_FILES, build_instances, gen_task, hf_reference, mc_task

    from basque_jax.eval.harness import BasqueJaxLM
    from basque_jax.model.gguf import model_path

    missing = [str(f) for f in TASK_FILES if not f.is_file()]
    if missing:
        print(f"missing task data: {', '.join(missing)}", file=sys.stderr)
        return 2
    folder = model_path(args.model)
    t0 = time.perf_counter()
    ours = BasqueJaxLM(str(folder), dtype="float32", batch_size=args.batch_size)
    load_ours = time.perf_counter() - t0
    t0 = time.perf_counter()
    hf = hf_reference(folder, batch_size=args.batch_size)
    load_hf = time.perf_counter() - t0
    _, ll_requests = build_instances(mc_task(), limit=args.limit)
    _, ll_shot_requests = build_instances(mc_task(), limit=args.limit,
                                          num_fewshot=args.mc_fewshot)
    _, gen_requests = build_instances(gen_task(max_gen_toks=args.max_gen_toks),
                                      limit=args.limit, num_fewshot=1)
    workloads = {"loglikelihood": ("loglikelihood", ll_requests),
                 f"loglikelihood_{args.mc_fewshot}shot": ("loglikelihood", ll_shot_requests),
                 "generate_until": ("generate_until", gen_requests)}
    print(json.dumps({"section": "settings", "model": str(folder), "limit": args.limit,
                      "batch_size": args.batch_size, "repeats": args.repeats,
                      "max_gen_toks": args.max_gen_toks, "torch_threads": torch.get_num_threads(),
                      "cpus": os.cpu_count(), "load_s": {"ours": round(load_ours, 2),
                                                         "hf": round(load_hf, 2)}}), flush=True)
    summary = {}
    for name, (method, requests) in workloads.items():
        times: dict[str, list[float]] = {"ours": [], "hf": []}
        outputs = {}
        t0 = time.perf_counter()
        getattr(ours, method)(requests)  # warm-up: compiles every shape it needs
        warm_ours = time.perf_counter() - t0
        getattr(hf, method)(requests)
        for _ in range(args.repeats):
            for side, lm in (("ours", ours), ("hf", hf)):
                t0 = time.perf_counter()
                outputs[side] = getattr(lm, method)(requests)
                times[side].append(time.perf_counter() - t0)
        if method == "loglikelihood":
            agree = {"max_abs_delta": float(np.max(np.abs(
                np.array([o[0] for o in outputs["ours"]]) - [o[0] for o in outputs["hf"]])))}
        else:
            agree = {"identical_generations": outputs["ours"] == outputs["hf"]}
        rate = {s: len(requests) / min(t) for s, t in times.items()}
        row = {"section": name, "requests": len(requests),
               "ours_requests_per_s": round(rate["ours"], 2),
               "hf_requests_per_s": round(rate["hf"], 2),
               "speedup": round(rate["ours"] / rate["hf"], 2),
               "ours_s": [round(t, 3) for t in times["ours"]],
               "hf_s": [round(t, 3) for t in times["hf"]],
               "ours_first_call_s": round(warm_ours, 2), **agree,
               "load_avg_1m": round(os.getloadavg()[0], 2)}
        summary[name] = row["speedup"]
        print(json.dumps(row), flush=True)
    print(json.dumps({"section": "summary", "speedup": summary}), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
