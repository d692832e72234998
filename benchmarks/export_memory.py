"""Peak host memory and wall time of ``basque-jax export`` vs. loading the model to save it.

Exports a random Llama Hugging Face folder (float32, size set by the flags; default 376 MiB)
to bfloat16 shards in a fresh subprocess, two ways:

* ``streaming``: ``basque_jax.export.export`` (one tensor resident at a time);
* baseline ``load_then_save``: ``load_pretrained`` + ``save_pretrained`` (the whole model
  resident, as a merge-then-save export holds it).

Each subprocess first warms up on a tiny model (imports, JAX backend), resets its peak RSS
(``/proc/self/clear_refs``), then exports the big model; the growth of the peak is reported.
Prints one JSON line. Linux only.

    python benchmarks/export_memory.py [--layers 8 --hidden 1024 --intermediate 2816]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

CHILD = textwrap.dedent("""
    import json, re, sys, time
    from basque_jax.export import export
    from basque_jax.model.hf import load_pretrained, save_pretrained

    def status(key):
        text = open("/proc/self/status").read()
        return int(re.search(key + r":\\s+(\\d+) kB", text)[1]) * 1024

    def run(how, src, out):
        if how == "streaming":
            export(src, out, dtype="bfloat16", max_shard_bytes=2**30)
        else:
            save_pretrained(load_pretrained(src), out, dtype="bfloat16", max_shard_bytes=2**30)

    how, tiny, big, out = sys.argv[1:5]
    run(how, tiny, out + "_warm")
    before = status("VmRSS")
    open("/proc/self/clear_refs", "w").write("5")
    t0 = time.perf_counter()
    run(how, big, out)
    print(json.dumps({"growth": status("VmHWM") - before,
                      "seconds": time.perf_counter() - t0}))
""")


def make_folder(folder: Path, *, vocab: int, hidden: int, intermediate: int, layers: int,
                heads: int, kv_heads: int) -> int:
    import numpy as np

    from basque_jax.model.config import LlamaConfig
    from basque_jax.model.hf import param_shapes, write_pretrained

    config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate,
                         num_hidden_layers=layers, num_attention_heads=heads,
                         num_key_value_heads=kv_heads)
    shapes = param_shapes(config)
    rng = np.random.default_rng(0)
    write_pretrained(config, folder, lambda e, layer: rng.standard_normal(
        shapes[e.path][1:] if e.stacked else shapes[e.path], np.float32), dtype=np.float32)
    return sum(f.stat().st_size for f in folder.glob("*.safetensors"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--intermediate", type=int, default=2816)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--kv-heads", type=int, default=4)
    args = ap.parse_args()
    env = dict(os.environ, JAX_PLATFORMS=os.environ.get("JAX_PLATFORMS", "cpu"))
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model_bytes = make_folder(tmp / "big", vocab=args.vocab, hidden=args.hidden,
                                  intermediate=args.intermediate, layers=args.layers,
                                  heads=args.heads, kv_heads=args.kv_heads)
        make_folder(tmp / "tiny", vocab=256, hidden=64, intermediate=128, layers=2, heads=4,
                    kv_heads=2)
        results = {}
        for how in ("streaming", "load_then_save"):
            proc = subprocess.run([sys.executable, "-c", CHILD, how, str(tmp / "tiny"),
                                   str(tmp / "big"), str(tmp / f"out_{how}")], env=env,
                                  cwd=ROOT, capture_output=True, text=True, check=True)
            results[how] = json.loads(proc.stdout.strip().splitlines()[-1])
    print(json.dumps({
        "benchmark": "export_memory", "model_bytes": model_bytes,
        "streaming_peak_growth_bytes": results["streaming"]["growth"],
        "streaming_seconds": round(results["streaming"]["seconds"], 2),
        "baseline": "load_pretrained+save_pretrained",
        "baseline_peak_growth_bytes": results["load_then_save"]["growth"],
        "baseline_seconds": round(results["load_then_save"]["seconds"], 2),
        "memory_ratio": round(results["load_then_save"]["growth"]
                              / max(results["streaming"]["growth"], 1), 1),
    }))


if __name__ == "__main__":
    main()
