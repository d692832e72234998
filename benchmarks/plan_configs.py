"""``basque-jax plan`` for every shipped study config on its target TPU slice.

Compiles each distinct program once (the 17 runs of one size and method differ only in data and
backbone weights, not in shapes) and prints, per config, one JSON line: memory per device
against HBM, compiled FLOPs per step against the named baseline -- the analytic count of
``train.flops`` -- and estimated tokens/s per chip and TPU chip-hours for the run's token budget
at the configs' MFU (40%). Extra rows plan the 8B LoRA twin on a v5e-8 as well. Ends with the
Markdown table for BENCHMARKS.md.

    python benchmarks/plan_configs.py [--only lora] [--markdown out.md]

Needs libtpu (``pip install 'basque-jax[aot]'``); CPU only, about 5 minutes per distinct program
on 2 cores.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from basque_jax.config import load_config  # noqa: E402
from basque_jax.plan import PlanReport, plan_run  # noqa: E402

EXTRA = [("lora/llama3.1-8b-instruct_c_ien.yaml", "v5e-8")]


def signature(cfg, topology: str) -> str:
    """What the compiled programs depend on (not data sources, weights or paths)."""
    d = cfg.to_dict()
    d["data"] = {k: v for k, v in d["data"].items() if k in ("batch_size", "seq_len")}
    d["model"].pop("init_from", None)
    d["train"] = {k: d["train"][k] for k in ("micro_batches", "neftune_alpha", "z_loss")}
    d["plan"]["topology"] = topology
    return json.dumps(d, sort_keys=True)


def row(name: str, r: PlanReport) -> dict:
    d = r.to_dict()
    gib = 1024**3
    return {
        "config": name, "topology": r.topology, "chips": r.chips,
        "train_gib_per_device": round(r.train_memory.total / gib, 2),
        "decode_gib_per_device": round(r.decode_memory.total / gib, 2) if r.decode_memory else None,
        "hbm_gib": round(r.hbm_bytes / gib, 2), "fits": r.fits,
        "compiled_flops_per_step": r.compiled_flops_per_step,
        "baseline": "analytic train_flops_per_token x tokens/step",
        "analytic_flops_per_step": r.analytic_flops_per_step,
        "compiled_over_analytic": round(d["flops_ratio"], 3),
        "steps": r.steps, "step_seconds": round(r.step_seconds, 2),
        "tokens_per_s_per_chip": round(r.tokens_per_second / r.chips),
        "tpu_chip_hours": round(r.chip_hours), "mfu": r.mfu,
    }


def markdown(rows: list[dict]) -> str:
    head = ("| config | slice | train mem / device | decode mem / device | HBM | compiled / "
            "analytic FLOPs per step | tokens/s/chip @40% MFU | steps | TPU chip-hours |\n"
            "| --- | --- | --- | --- | --- | --- | --- | --- | --- |\n")
    lines = [
        f"| {r['config']} | {r['topology']} | {r['train_gib_per_device']} GiB | "
        f"{r['decode_gib_per_device']} GiB | {r['hbm_gib']:.0f} GiB | "
        f"{r['compiled_flops_per_step']:.3g} / {r['analytic_flops_per_step']:.3g} "
        f"(x{r['compiled_over_analytic']}) | {r['tokens_per_s_per_chip']:,} | {r['steps']:,} | "
        f"{r['tpu_chip_hours']:,} |"
        for r in rows]
    return head + "\n".join(lines) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", choices=("full", "lora"), help="one method only")
    ap.add_argument("--markdown", help="also write the table to this file")
    args = ap.parse_args()
    study = REPO / "configs" / "study"
    jobs = [(p, None) for mode in ("full", "lora") if args.only in (None, mode)
            for p in sorted((study / mode).glob("*.yaml"))]
    jobs += [(study / c, t) for c, t in EXTRA if args.only in (None, c.split("/")[0])]
    cache: dict[str, PlanReport] = {}
    rows = []
    for path, topology in jobs:
        cfg = load_config(path, ["vars.bucket=plan"])
        topo = topology or cfg.plan.topology
        key = signature(cfg, topo)
        name = f"{path.parent.name}/{path.stem}"
        if key not in cache:
            t0 = time.perf_counter()
            cache[key] = plan_run(cfg, topo, config_name=name)
            print(f"# compiled {name} for {topo} in {time.perf_counter() - t0:.0f} s",
                  file=sys.stderr, flush=True)
        report = dataclasses.replace(copy.copy(cache[key]), config=name, steps=cfg.train.steps)
        rows.append(row(name, report))
        print(json.dumps(rows[-1]), flush=True)
    table = markdown(rows)
    print(table)
    if args.markdown:
        Path(args.markdown).write_text(table)
    return 0 if all(r["fits"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
