"""Where the time of ``train_step.py``'s LoRA step goes, ours vs transformers + PEFT, by kind.

Ours: the compiled step under ``jax.profiler`` (XLA:CPU records one trace event per executed
HLO instruction -- a fusion, a dot, a copy); each instruction of the optimized HLO is put in a
category from its opcode and the shapes in it. Theirs: the same step under ``torch.profiler``
(self CPU time of every aten op, grouped by input shapes), put in the same categories. Both:
milliseconds per step. Event times are summed over threads, so a category's time is the
thread time its ops ran (XLA may run two independent instructions at once), and the "sum"
may differ from the wall time of the step. Prints one JSON line.

    python benchmarks/profile_step.py [train_step.py's flags: --steps 3 --preset --batch ...]

Categories: ``head`` (matmuls with a vocabulary-sized dimension: the output projection and its
gradients), ``vocab_elementwise`` (other ops over vocabulary-sized arrays: softmax
cross-entropy), ``lora`` (matmuls with a rank-sized dimension), ``attention`` (batched matmuls
and torch's fused attention), ``layer_matmul`` (the other matmuls: the frozen projections),
``copy`` (copies, transposes, concatenations, layout changes), ``other`` (norms, rotary,
SwiGLU, attention softmax, AdamW, ...).
"""

from __future__ import annotations

import collections
import glob
import gzip
import json
import os
import re
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from train_step import TARGETS, hf_peft_step, make_batch, our_setup, parse_args  # noqa: E402

INSTR = re.compile(r"^\s*(?:ROOT )?%?([\w.\-]+) = (.*?) ([a-z][\w\-]*)\((.*)$")
CALLS = re.compile(r"calls=%?([\w.\-]+)")
COPY_OPS = {"copy", "transpose", "concatenate", "slice", "dynamic-slice", "pad", "reshape",
            "bitcast", "dynamic-update-slice", "copy-start", "copy-done"}


def _dims(text: str) -> set[int]:
    return {int(d) for shape in re.findall(r"\[([\d,]+)\]", text) for d in shape.split(",")}


def categorize(dot: bool, batched: bool, text: str, vocab: int, rank: int,
               copy_like: bool) -> str:
    dims = _dims(text)
    if dot and vocab in dims:
        return "head"
    if dot and rank in dims:
        return "lora"
    if dot:
        return "attention" if batched else "layer_matmul"
    if vocab in dims:
        return "vocab_elementwise"
    return "copy" if copy_like else "other"


def hlo_categories(hlo: str, vocab: int, rank: int) -> dict[str, str]:
    """Instruction name -> category, for every instruction of the optimized HLO module."""
    comps: dict[str, list[tuple[str, str, str]]] = collections.defaultdict(list)
    current = ""
    for line in hlo.splitlines():
        if not line.startswith(" ") and "{" in line:
            current = line.split()[1 if line.startswith("ENTRY") else 0].lstrip("%")
            continue
        m = INSTR.match(line)
        if m:
            comps[current].append((m.group(1), m.group(3), line))
    out = {}
    for instrs in comps.values():
        for name, op, line in instrs:
            inner = instrs if op != "fusion" else []
            called = CALLS.search(line)
            if op == "fusion" and called:
                inner = comps.get(called.group(1), [])
            body = [i for i in inner if i[1] in ("dot", "convolution")] if op == "fusion" else (
                [(name, op, line)] if op in ("dot", "convolution") else [])
            text = " ".join(i[2] for i in body) if body else line
            batched = any(len(s.split(",")) > 2 for i in body
                          for s in re.findall(r"\[([\d,]+)\]", i[2].split("=")[1].split("(")[0]))
            ops = {i[1] for i in inner} - {"parameter", "constant", "bitcast", "tuple",
                                           "get-tuple-element"}
            copy_like = op in COPY_OPS or (op == "fusion" and bool(ops) and ops <= COPY_OPS)
            out[name] = categorize(bool(body), batched, text, vocab, rank, copy_like)
    return out


def profile_ours(args, batch_np, vocab: int) -> dict[str, float]:
    """Milliseconds per step by category of our compiled step."""
    import jax

    from basque_jax.sharding import use_sharding

    setup = our_setup(args)
    with use_sharding(setup.mesh, setup.rules):
        batch = setup.global_batch(batch_np)
        compiled = setup.step_fn.lower(setup.state, setup.frozen, batch).compile()
        cats = hlo_categories(compiled.as_text(), vocab, args.rank)
        state = setup.state
        for _ in range(2):
            state, m = compiled(state, setup.frozen, batch)
        jax.block_until_ready(m)
        with tempfile.TemporaryDirectory() as tmp:
            with jax.profiler.trace(tmp, create_perfetto_trace=True):
                t0 = time.perf_counter()
                for _ in range(args.steps):
                    state, m = compiled(state, setup.frozen, batch)
                jax.block_until_ready((state, m))
                wall = (time.perf_counter() - t0) / args.steps
            (path,) = glob.glob(f"{tmp}/**/*.trace.json.gz", recursive=True)
            with gzip.open(path) as f:
                events = json.load(f)
    events = events["traceEvents"] if isinstance(events, dict) else events
    ms: dict[str, float] = collections.Counter()
    for e in events:
        if e.get("ph") == "X" and e.get("name") in cats:
            ms[cats[e["name"]]] += e.get("dur", 0.0) / 1e3 / args.steps
    return {"wall_ms": 1e3 * wall, **ms}


def profile_hf(args, batch_np, vocab: int) -> dict[str, float]:
    """Milliseconds per step by category of transformers + PEFT (torch self CPU time)."""
    from torch.profiler import ProfilerActivity, profile

    step = hf_peft_step(args, batch_np)
    for _ in range(2):
        step()
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        t0 = time.perf_counter()
        for _ in range(args.steps):
            step()
        wall = (time.perf_counter() - t0) / args.steps
    ms: dict[str, float] = collections.Counter()
    matmuls = {"aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::linear"}
    copies = {"aten::copy_", "aten::clone", "aten::contiguous", "aten::cat", "aten::t",
              "aten::transpose", "aten::to", "aten::_to_copy"}
    for e in prof.key_averages(group_by_input_shape=True):
        text = str(e.input_shapes).replace(" ", "")
        if "scaled_dot_product" in e.key or "_flash_attention" in e.key:
            cat = "attention"
        else:
            cat = categorize(e.key in matmuls, e.key in ("aten::bmm", "aten::baddbmm"), text,
                             vocab, args.rank, e.key in copies)
        ms[cat] += e.self_cpu_time_total / 1e3 / args.steps
    return {"wall_ms": 1e3 * wall, **ms}


def main() -> int:
    args = parse_args()
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    import torch

    torch.set_num_threads(os.cpu_count() or 1)
    from basque_jax.model.config import LlamaConfig

    vocab = LlamaConfig.preset(args.preset).vocab_size
    batch = make_batch(args, vocab)
    result = {"benchmark": "lora_train_step_profile", "preset": args.preset,
              "batch": args.batch, "seq_len": args.seq_len, "rank": args.rank,
              "targets": len(TARGETS), "steps": args.steps, "load_avg_1m": os.getloadavg()[0]}
    for side, fn in (("ours", profile_ours), ("hf_peft", profile_hf)):
        prof = fn(args, batch, vocab)
        prof["sum_ms"] = sum(v for k, v in prof.items() if k != "wall_ms")
        result[side] = {k: round(v, 1) for k, v in sorted(prof.items())}
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
