"""PEFT LoRA adapters on disk: ``adapter_model.safetensors`` + ``adapter_config.json``.

The format is the one ``peft.PeftModel.save_pretrained`` writes for a Llama: per layer and
projection ``base_model.model.model.layers.{i}.self_attn.q_proj.lora_A.weight`` ``[r, in]`` and
``...lora_B.weight`` ``[out, r]`` (module paths from the ONE key map in ``hf.py``), with
``scale = lora_alpha / r`` (``/ sqrt(r)`` with rsLoRA) exactly as in :mod:`basque_jax.model.lora`.
Our adapters are stacked over layers: ``A [L, in, r]``, ``B [L, r, out]``.

:func:`save_peft_adapter` writes such a folder; :func:`read_peft_adapter` reads one (with errors
naming the file and key); :func:`load_peft_adapter` attaches it to a model to continue training.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from basque_jax.errors import UserError
from basque_jax.model.hf import LAYER_KEYS
from basque_jax.model.lora import TARGETS, LoraConfig, _targeted, apply_lora
from basque_jax.model.safetensors_io import SafetensorsError, SafetensorsFile, write_safetensors
from basque_jax.yaml_config import read_json_object

ADAPTER_FILE = "adapter_model.safetensors"
CONFIG_FILE = "adapter_config.json"
# Adapters stacked over layers, per HF target name: (A [L, in, r], B [L, r, out]).
Adapters = Mapping[str, tuple[np.ndarray, np.ndarray]]


class AdapterError(UserError):
    """A PEFT adapter folder that cannot be read or does not fit the model."""


def module_path(layer: int, target: str) -> str:
    """HF module path of a projection, e.g. ``model.layers.3.self_attn.q_proj``."""
    hf = LAYER_KEYS[(TARGETS[target], target, "kernel")]
    return f"model.layers.{layer}.{hf.removesuffix('.weight')}"


def peft_keys(layer: int, target: str) -> tuple[str, str]:
    """The ``lora_A`` and ``lora_B`` keys peft uses for one layer's projection."""
    base = f"base_model.model.{module_path(layer, target)}"
    return f"{base}.lora_A.weight", f"{base}.lora_B.weight"


def adapter_config(cfg: LoraConfig, base_model: str | None) -> dict[str, Any]:
    """The ``adapter_config.json`` dict (the fields peft's ``LoraConfig`` reads)."""
    alpha: float | int = int(cfg.alpha) if float(cfg.alpha).is_integer() else cfg.alpha
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model,
        "r": cfg.rank,
        "lora_alpha": alpha,
        "lora_dropout": cfg.dropout,
        "target_modules": sorted(cfg.targets),
        "use_rslora": cfg.use_rslora,
        "use_dora": False,
        "bias": "none",
        "fan_in_fan_out": False,
        "inference_mode": True,
        "init_lora_weights": True,
        "modules_to_save": None,
        "layers_to_transform": None,
        "layers_pattern": None,
        "rank_pattern": {},
        "alpha_pattern": {},
        "revision": None,
    }


def save_peft_adapter(folder: str | Path, cfg: LoraConfig, adapters: Adapters, *,
                      base_model: str | None = None) -> list[Path]:
    """Write ``adapters`` (float32) and their config into ``folder``; returns the files."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    missing = sorted(set(cfg.targets) - set(adapters))
    if missing:
        raise AdapterError(f"no adapter arrays for targets {missing}")
    num_layers = {a.shape[0] for a, _ in adapters.values()}
    if len(num_layers) != 1:
        raise AdapterError(f"adapters disagree on the number of layers: {sorted(num_layers)}")
    layers = num_layers.pop()
    tensors: dict[str, np.ndarray] = {}
    for target in sorted(cfg.targets):
        a, b = adapters[target]
        if a.shape[-1] != cfg.rank or b.shape[-2] != cfg.rank:
            raise AdapterError(f"{target}: adapter shapes {a.shape}, {b.shape} do not have "
                               f"rank {cfg.rank}")
        for i in range(layers):
            key_a, key_b = peft_keys(i, target)
            tensors[key_a] = np.ascontiguousarray(np.asarray(a[i], np.float32).T)
            tensors[key_b] = np.ascontiguousarray(np.asarray(b[i], np.float32).T)
    specs = [(k, v.shape, v.dtype) for k, v in sorted(tensors.items())]
    write_safetensors(folder / ADAPTER_FILE, specs, tensors.__getitem__)
    config = adapter_config(cfg, base_model)
    (folder / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
    return [folder / ADAPTER_FILE, folder / CONFIG_FILE]


# ------------------------------------------------------------------------------ reading
# adapter_config keys whose non-default values we cannot load (DoRA, biases, patterns, ...).
_UNSUPPORTED = ("use_dora", "bias", "fan_in_fan_out", "modules_to_save", "layers_to_transform",
                "rank_pattern", "alpha_pattern")


def _read_config(path: Path) -> tuple[LoraConfig, dict[str, Any]]:
    if not path.is_file():
        raise AdapterError(f"{path}: adapter_config.json not found")
    d = read_json_object(path, AdapterError)
    if d.get("peft_type", "LORA") != "LORA":
        raise AdapterError(f"{path}: peft_type {d.get('peft_type')!r} is not LORA")
    for key in ("r", "lora_alpha", "target_modules"):
        if key not in d:
            raise AdapterError(f"{path}: missing key {key!r}")
    for key in _UNSUPPORTED:
        value = d.get(key)
        if value not in (None, False, "none") and value != {} and value != []:
            raise AdapterError(f"{path}: {key}={value!r} is not supported")
    targets = d["target_modules"]
    if isinstance(targets, str):
        targets = [targets]
    if not isinstance(targets, list) or not all(isinstance(t, str) for t in targets):
        raise AdapterError(f"{path}: target_modules must be a list of projection names")
    unknown = [t for t in targets if t not in TARGETS]
    if unknown:
        raise AdapterError(f"{path}: target_modules {unknown} are not Llama projections "
                           f"(supported: {sorted(TARGETS)})")
    try:
        cfg = LoraConfig(rank=d["r"], alpha=float(d["lora_alpha"]),
                         dropout=float(d.get("lora_dropout") or 0.0), targets=tuple(targets),
                         use_rslora=bool(d.get("use_rslora", False)),
                         base_model=d.get("base_model_name_or_path"))
    except (TypeError, ValueError) as e:
        raise AdapterError(f"{path}: {e}") from None
    return cfg, d


def read_peft_adapter(folder: str | Path, num_layers: int | None = None
                      ) -> tuple[LoraConfig, dict[str, tuple[np.ndarray, np.ndarray]]]:
    """``(LoraConfig, {target: (A [L, in, r], B [L, r, out])})`` from a PEFT folder.

    ``num_layers`` (default: inferred from the keys) fixes the layers every target must have.
    Unexpected tensors (embedding adapters, DoRA magnitudes, biases) are errors.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise AdapterError(f"{folder}: adapter folder does not exist")
    cfg, _ = _read_config(folder / CONFIG_FILE)
    path = folder / ADAPTER_FILE
    if not path.is_file():
        pickles = [p.name for p in folder.glob("adapter_model.bin")]
        hint = " (adapter_model.bin is a pickle and is never loaded)" if pickles else ""
        raise AdapterError(f"{path}: not found{hint}")
    try:
        f = SafetensorsFile(path)
    except SafetensorsError as e:
        raise AdapterError(str(e)) from None
    keys = {k.replace(".default.weight", ".weight") if ".lora_" in k else k: k for k in f}
    if num_layers is None:
        parts = [k.split(".") for k in keys]
        layer_ids = {int(p[4]) for p in parts if len(p) > 4 and p[:4] == [
            "base_model", "model", "model", "layers"] and p[4].isdigit()}
        num_layers = max(layer_ids) + 1 if layer_ids else 0
    expected: set[str] = set()
    adapters: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for target in cfg.targets:
        a_layers, b_layers = [], []
        for i in range(num_layers):
            key_a, key_b = peft_keys(i, target)
            expected.update((key_a, key_b))
            for key in (key_a, key_b):
                if key not in keys:
                    raise AdapterError(f"{path}: missing tensor {key!r}")
            a = f.read(keys[key_a]).astype(np.float32)
            b = f.read(keys[key_b]).astype(np.float32)
            if a.ndim != 2 or b.ndim != 2 or a.shape[0] != cfg.rank or b.shape[1] != cfg.rank:
                raise AdapterError(f"{path}: {key_a!r} {a.shape} / {key_b!r} {b.shape} do not "
                                   f"have rank r={cfg.rank} from {CONFIG_FILE}")
            a_layers.append(a.T)
            b_layers.append(b.T)
        if num_layers == 0:
            raise AdapterError(f"{path}: no tensors for target {target!r}")
        adapters[target] = (np.stack(a_layers), np.stack(b_layers))
    extra = sorted(set(keys) - expected)
    if extra:
        raise AdapterError(f"{path}: unexpected tensor {keys[extra[0]]!r} (only lora_A/lora_B of "
                           f"{list(cfg.targets)} in {num_layers} layers are supported)")
    return cfg, adapters


def load_peft_adapter(model: nnx.Module, folder: str | Path, *, dropout: float | None = None,
                      base_model: str | None = None) -> LoraConfig:
    """Attach the adapters of a PEFT folder to ``model`` (in place) and return their config.

    Rank, alpha, targets and rsLoRA come from ``adapter_config.json``; ``dropout`` (a training
    choice) overrides the file's when given. Adapters are placed on the sharding
    :func:`apply_lora` derives from each kernel. A model that already has adapters must have
    the same rank and targets (their values are replaced).
    """
    config = getattr(model, "config", None)
    num_layers = getattr(config, "num_hidden_layers", None)
    cfg, adapters = read_peft_adapter(folder, num_layers)
    if dropout is not None or base_model is not None:
        cfg = dataclasses.replace(cfg, dropout=cfg.dropout if dropout is None else dropout,
                                  base_model=base_model or cfg.base_model)
    existing = getattr(model, "lora_config", None)
    if existing is None:
        apply_lora(model, cfg, rngs=nnx.Rngs(0))
    elif (existing.rank, set(existing.targets)) != (cfg.rank, set(cfg.targets)) or \
            not math.isclose(existing.scale, cfg.scale):
        raise AdapterError(f"{folder}: adapter (r={cfg.rank}, targets={sorted(cfg.targets)}) "
                           f"differs from the model's (r={existing.rank}, "
                           f"targets={sorted(existing.targets)})")
    for target, linear in _targeted(model, cfg.targets):
        a, b = adapters[target]
        for var, value, name in ((linear.lora_a, a, "lora_A"), (linear.lora_b, b, "lora_B")):
            current = var.get_value()
            if tuple(current.shape) != value.shape:
                raise AdapterError(f"{folder / ADAPTER_FILE}: {target}.{name} stacks to "
                                   f"{value.shape}, the model expects {tuple(current.shape)}")
            value = value.astype(current.dtype)
            if isinstance(current, jax.Array) and not isinstance(current, jax.core.Tracer):
                var.set_value(jax.device_put(value, current.sharding))
            else:  # abstract model (nnx.eval_shape)
                var.set_value(jnp.asarray(value))
        linear.lora_dropout = cfg.dropout
    model.lora_config = cfg
    return cfg
