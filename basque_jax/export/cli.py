"""``basque-jax export SOURCE OUT_DIR [--merged | --peft] [--dtype D] [--step N] [--overwrite]``."""

from __future__ import annotations

import argparse
import json
import re

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?i?B?)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "B": 1, "K": 10**3, "M": 10**6, "G": 10**9, "T": 10**12,
          "KI": 2**10, "MI": 2**20, "GI": 2**30, "TI": 2**40}


def parse_size(text: str) -> int:
    """``"5GB"`` → 5e9 bytes, ``"500MiB"`` → 500 * 2**20, ``"1000"`` → 1000."""
    m = _SIZE.match(text)
    unit = (m.group(2) or "").upper().removesuffix("B") if m else None
    if m is None or unit not in _UNITS:
        raise argparse.ArgumentTypeError(f"invalid size {text!r} (e.g. 5GB, 500MiB, 1000000)")
    size = int(float(m.group(1)) * _UNITS[unit])
    if size < 1:
        raise argparse.ArgumentTypeError(f"size must be positive, got {text!r}")
    return size


def add_export_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "export", help="export a run checkpoint or HF folder as a merged HF model or PEFT adapter",
        description="SOURCE: a training output directory (latest checkpoint, or --step), "
        "DIR/checkpoints/STEP, or a Hugging Face model folder. --merged (default) writes a "
        "Hugging Face model (LoRA folded in, in --dtype), streaming layer by layer; --peft "
        "writes the LoRA adapters as a PEFT folder (rank/alpha/targets from the checkpoint).")
    p.add_argument("source", help="training output dir, DIR/checkpoints/STEP, or HF folder")
    p.add_argument("out_dir", help="output folder (must be empty unless --overwrite)")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--merged", dest="mode", action="store_const", const="merged",
                      help="a Hugging Face model with adapters merged (default)")
    mode.add_argument("--peft", dest="mode", action="store_const", const="peft",
                      help="the LoRA adapters as adapter_model.safetensors + adapter_config.json")
    p.set_defaults(mode="merged")
    p.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32", "float16"),
                   help="dtype of the merged weights (default bfloat16; adapters stay float32)")
    p.add_argument("--step", type=int, default=None, help="checkpoint step (default: latest)")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty OUT_DIR")
    p.add_argument("--max-shard-size", type=parse_size, default="5GB",
                   help="largest safetensors shard (default 5GB)")
    p.set_defaults(func=_cmd_export)


def _cmd_export(args: argparse.Namespace) -> int:
    from basque_jax.export import export

    result = export(args.source, args.out_dir, mode=args.mode, dtype=args.dtype,
                    overwrite=args.overwrite, step=args.step, max_shard_bytes=args.max_shard_size)
    print(json.dumps({"out_dir": str(result.out_dir), "mode": result.mode,
                      "source": result.source, "files": result.files, "lora": result.lora}))
    return 0
