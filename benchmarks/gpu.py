"""GPU performance where users run: one command, JSON lines, well inside 8 minutes on one
H100/H200.

    python benchmarks/gpu.py                 # the GPU run (needs jax[cuda12]; torch for HF)
    python benchmarks/gpu.py --smoke         # the same code on CPU with tiny shapes (seconds)
    python benchmarks/gpu.py --memory-only   # 8B LoRA step at 8192: compiled memory vs 80 GiB

Sections (each guarded: a failure is one JSON line with its error, the others still run):

* ``train``: LoRA rank 16 on all seven projections, bf16 weights and compute, remat as the
  study configs set it (``full``), random weights, for the Llama-3.2-1B and Llama-3.1-8B shapes
  at 4096 and 8192 tokens -- ours (cuDNN flash attention: ``model.attention: auto``) and
  transformers + PEFT (``sdpa``, gradient checkpointing) on the same card; tokens/s and MFU
  (analytic FLOPs of ``train/flops.py``; causal attention counted as MaxText's
  ``calculate_tflops_training_per_device`` does, ``6 * layers * seq * heads * head_dim`` per
  token; the bf16 peak of the device kind from ``basque_jax.topology``);
* ``decode``: our sampler's decode step for the 8B shape at batch 1, 8, 64, with the fraction
  of the HBM roofline (weights + KV cache bytes read per step / step time / bandwidth);
* ``magpie``: a Magpie-like workload (shared prefix, mixed output lengths) through our
  continuous-batching sampler vs transformers ``generate``;
* ``train_extra``: packed rows through the first shape's compiled step (the masked attention
  branch) and, when time is left, remat ``dots_no_batch`` (saves the matmul outputs).

Each framework runs in its own child process (JAX first, then torch: JAX holds most of the card
while it lives); the driver relays their lines and ends with a ``summary`` line (ratios). A
missing torch / transformers / peft is reported, not fatal. No network needed.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(1, str(HERE.parent))

from gpu_common import Settings, emit, versions  # noqa: E402

CHILD_ENV = {
    # JAX keeps 75% of the card by default; the 8B step wants more headroom than that.
    "XLA_PYTHON_CLIENT_MEM_FRACTION": "0.92",
    "TF_CPP_MIN_LOG_LEVEL": "2",
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--smoke", action="store_true", help="tiny shapes on CPU (a test)")
    p.add_argument("--memory-only", action="store_true",
                   help="only the compiled memory analysis of the 8B step (CPU backend)")
    p.add_argument("--budget-s", type=float, default=None,
                   help="wall-clock budget; sections past it are skipped (default 390 on GPU)")
    p.add_argument("--remat", help="override the configured remat policy (full)")
    p.add_argument("--loss-chunk", type=int, help="train.loss_chunk (default 0: whole)")
    p.add_argument("--no-extras", action="store_true", help="skip the train_extra probes")
    p.add_argument("--compile-cache", default=str(Path.home() / ".cache/basque_jax/xla_gpu"),
                   help="persistent JAX compilation cache for the GPU run ('' for none)")
    p.add_argument("--child", choices=("jax", "torch", "memory"), help=argparse.SUPPRESS)
    p.add_argument("--settings", help=argparse.SUPPRESS)
    p.add_argument("--deadline", type=float, help=argparse.SUPPRESS)
    p.add_argument("--peak", type=float, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def make_settings(args: argparse.Namespace) -> Settings:
    s = Settings.for_smoke() if args.smoke else Settings()
    over: dict[str, Any] = {}
    if args.remat:
        over["remat"] = args.remat
    if args.loss_chunk is not None:
        over["loss_chunk"] = args.loss_chunk
    if args.no_extras:
        over["extras"] = False
    return Settings(**{**s.__dict__, **over}) if over else s


# ----------------------------------------------------------------------------- children
def child_main(args: argparse.Namespace) -> int:
    s = Settings.from_json(args.settings)
    if args.child == "jax":
        if args.compile_cache and not s.smoke:
            import jax

            jax.config.update("jax_compilation_cache_dir", args.compile_cache)
            jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
        from gpu_jax import run_group

        run_group(s, args.deadline)
    elif args.child == "torch":
        from gpu_torch import run_group

        run_group(s, args.deadline, args.peak)
    else:
        from gpu_common import guarded
        from gpu_memory import dense_logits_bytes, memory_cases, step_memory

        for case in memory_cases(s):
            guarded("memory", lambda c=case: step_memory(s, **c), args.deadline)
        c = memory_cases(s)[0]
        emit({"section": "memory_note", "dense_attention_logits_bytes_per_layer":
              dense_logits_bytes(c["preset"], c["seq_len"], c["batch"])})
    return 0


def run_child(kind: str, s: Settings, deadline: float, args: argparse.Namespace,
              extra_env: dict[str, str], peak: float | None = None) -> list[dict[str, Any]]:
    """Run one child to ``deadline`` (+ a grace period), relaying and returning its lines.
    A crash or a kill is reported as one more line; what it printed before is kept."""
    cmd = [sys.executable, str(HERE / "gpu.py"), "--child", kind, "--settings", s.to_json(),
           "--deadline", str(deadline), "--compile-cache", args.compile_cache]
    if peak is not None:
        cmd += ["--peak", str(peak)]
    env = {**os.environ, **CHILD_ENV, **extra_env}
    env["PYTHONPATH"] = os.pathsep.join([str(HERE.parent), env.get("PYTHONPATH", "")])
    lines: list[dict[str, Any]] = []
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, env=env)
    grace = 600.0 if s.smoke else 45.0  # a section started just before the deadline
    killed = threading.Event()

    def kill() -> None:
        killed.set()
        proc.kill()

    watchdog = threading.Timer(max(1.0, deadline + grace - time.time()), kill)
    watchdog.start()
    try:
        assert proc.stdout is not None
        for raw in proc.stdout:
            raw = raw.strip()
            try:
                rec = json.loads(raw) if raw.startswith("{") else None
            except json.JSONDecodeError:
                rec = None
            if not isinstance(rec, dict):
                print(raw, file=sys.stderr)  # a library's own print: not ours to parse
                continue
            rec.setdefault("child", kind)
            lines.append(rec)
            emit(rec)
        rc = proc.wait()
    finally:
        watchdog.cancel()
    if rc != 0:
        why = "killed at the time budget" if killed.is_set() else f"exit status {rc}"
        rec = {"section": f"child_{kind}", "child": kind,
               "error": f"{why} (its stderr above); the sections it printed are kept"}
        lines.append(rec)
        emit(rec)
    return lines


# ----------------------------------------------------------------------------- summary
def summarize(lines: list[dict[str, Any]]) -> dict[str, Any]:
    """Ratios of the two sides per shape, the decode rows and the Magpie comparison."""
    ok = [r for r in lines if "error" not in r and "skipped" not in r]
    train: dict[tuple, dict[str, Any]] = {}
    for r in ok:
        if r.get("section") == "train":
            row = train.setdefault((r["preset"], r["seq_len"]), {
                "preset": r["preset"], "seq_len": r["seq_len"], "batch": r["batch"]})
            side = "ours" if r["side"] == "ours" else "hf_peft"
            row[f"{side}_tokens_per_s"] = r["tokens_per_s"]
            row[f"{side}_mfu"] = r["mfu"]
    for row in train.values():
        if "ours_tokens_per_s" in row and "hf_peft_tokens_per_s" in row:
            row["speedup_vs_hf_peft"] = round(row["ours_tokens_per_s"]
                                              / row["hf_peft_tokens_per_s"], 3)
    magpie = {r["side"]: r["tokens_per_s"] for r in ok if r.get("section") == "magpie"}
    if "ours" in magpie and "hf_generate" in magpie:
        magpie["speedup_vs_generate"] = round(magpie["ours"] / magpie["hf_generate"], 3)
    decode = [{k: r.get(k) for k in ("batch", "step_ms", "tokens_per_s", "roofline_fraction",
                                     "useful_roofline_fraction")}
              for r in ok if r.get("section") == "decode"]
    extra = [{k: r.get(k) for k in ("preset", "seq_len", "docs_per_row", "remat",
                                    "tokens_per_s", "mfu", "peak_bytes_in_use")}
             for r in ok if r.get("section") == "train_extra"]
    failed = [{k: r.get(k) for k in ("section", "child", "preset", "seq_len", "error",
                                     "skipped") if r.get(k) is not None}
              for r in lines if "error" in r or "skipped" in r]
    return {"section": "summary", "train": list(train.values()), "decode": decode,
            "magpie_tokens_per_s": magpie, "train_extra": extra, "failed_or_skipped": failed}


def driver(args: argparse.Namespace) -> int:
    s = make_settings(args)
    t0 = time.time()
    budget = args.budget_s or (3600.0 if (args.smoke or args.memory_only) else 390.0)
    deadline = t0 + budget
    cpu = {"JAX_PLATFORMS": "cpu"} if (args.smoke or args.memory_only) else {}
    emit({"section": "settings", "mode": "memory-only" if args.memory_only else (
        "smoke" if args.smoke else "gpu"), "budget_s": budget, **s.__dict__,
        "child_env": CHILD_ENV, **versions("jax", "jaxlib", "jax-cuda12-plugin", "flax",
                                           "torch", "transformers", "peft")})
    if args.memory_only or args.smoke:
        from gpu_memory import MEMORY_XLA_FLAGS

        flags = f"{os.environ.get('XLA_FLAGS', '')} {MEMORY_XLA_FLAGS}".strip()
        lines = run_child("memory", s, deadline, args, {"JAX_PLATFORMS": "cpu",
                                                        "XLA_FLAGS": flags})
        if args.memory_only:
            return 0
    else:
        lines = []
    # JAX first, to ~2/3 of the budget (it holds the card until it exits), then torch.
    jax_lines = run_child("jax", s, t0 + 0.65 * budget, args, cpu)
    peak = next((r.get("peak_flops") for r in jax_lines if r.get("section") == "device_jax"),
                None)
    torch_lines = run_child("torch", s, deadline, args, cpu, peak)
    lines += jax_lines + torch_lines
    summary = summarize(lines)
    summary["wall_s"] = round(time.time() - t0, 1)
    emit(summary)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    return child_main(args) if args.child else driver(args)


if __name__ == "__main__":
    sys.exit(main())
