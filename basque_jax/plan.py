"""``basque-jax plan``: compile a run's real train and decode steps for a TPU slice, on any host.

Nothing is allocated: the model is built under ``nnx.eval_shape``, every array of the train state
is a ``ShapeDtypeStruct`` carrying the sharding its logical axes give on a mesh of the *target*
slice's devices (``jax.experimental.topologies.get_topology_desc``, which needs ``libtpu``:
``pip install 'basque-jax[aot]'``), and the step from ``train.loop`` is lowered and compiled by
the TPU compiler. The report compares per-device memory (arguments, outputs, temporaries) with
the chip's HBM and the compiled FLOPs with the analytic count, and estimates step time,
tokens/s and TPU chip-hours for the run's token budget at a stated MFU.

Compiled FLOPs: XLA's cost analysis counts the body of a loop once, whatever its trip count, so
the full step's count misses all but one of the scanned layers and micro-batches (and the TPU
compiler adds loops of its own around big sharded matmuls). Two more compiles of the same step
for one micro-batch with one and two layers, without any loop (layers unrolled, matmuls whole:
:data:`PROBE_OPTIONS`), give the cost of one layer ``S2 - S1`` and of everything else
``2 S1 - S2``; the step costs ``micro_batches * (S1 + (layers - 1) * (S2 - S1))`` (with several
micro-batches the optimizer update -- a few FLOPs per parameter -- is counted once for each).
With ``train.loss_chunk`` the probes compute the loss in one piece, so the count leaves out the
chunked loss's second computation of the logits in the backward pass. Attention run by the
Pallas splash kernel (TPU) is a custom call whose FLOPs XLA does not see; the report prints
the analytic attention FLOPs beside the count.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

from basque_jax.errors import UserError
from basque_jax.topology import Topology, parse_topology

if TYPE_CHECKING:
    from basque_jax.config import RunConfig


class PlanError(UserError):
    """The run cannot be planned (no topology, unknown architecture, libtpu missing, ...)."""


@dataclass
class Memory:
    """Per-device bytes of one compiled program (``compiled.memory_analysis()``)."""

    arguments: int
    outputs: int
    aliased: int  # outputs that reuse donated argument buffers
    temporaries: int
    code: int
    exhausted: bool = False  # the compiler gave up: temporaries is what it asked for

    @property
    def total(self) -> int:
        return self.arguments + self.outputs - self.aliased + self.temporaries + self.code


@dataclass
class PlanReport:
    """Everything ``basque-jax plan`` prints (``to_dict`` for JSON)."""

    config: str
    topology: str
    topology_shape: str
    chips: int
    chip: str
    hbm_bytes: int
    mesh: dict[str, int]
    mode: str
    attention: str
    parameters: int
    trainable_parameters: int
    batch_size: int
    seq_len: int
    micro_batches: int
    train_memory: Memory
    decode_memory: Memory | None
    decode_batch: int
    compiled_flops_per_step: float
    analytic_flops_per_step: float
    analytic_attention_flops_per_step: float
    tokens_per_step: int
    steps: int
    mfu: float
    peak_flops_per_chip: float

    @property
    def fits(self) -> bool:
        mems = [self.train_memory] + ([self.decode_memory] if self.decode_memory else [])
        return all(m.total <= self.hbm_bytes for m in mems)

    @property
    def step_seconds(self) -> float:
        return self.analytic_flops_per_step / (self.chips * self.peak_flops_per_chip * self.mfu)

    @property
    def tokens_per_second(self) -> float:
        return self.tokens_per_step / self.step_seconds

    @property
    def chip_hours(self) -> float:
        return self.chips * self.steps * self.step_seconds / 3600

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        for key in ("train_memory", "decode_memory"):
            mem = getattr(self, key)
            if mem is not None:
                d[key]["total"] = mem.total
        d.update(fits=self.fits, step_seconds=self.step_seconds,
                 tokens_per_second=self.tokens_per_second,
                 tokens_per_second_per_chip=self.tokens_per_second / self.chips,
                 chip_hours=self.chip_hours,
                 flops_ratio=self.compiled_flops_per_step / self.analytic_flops_per_step)
        return d


# ----------------------------------------------------------------------------- inputs
def topology_devices(topology: Topology) -> list:
    """The devices of ``topology`` (TPU device descriptions; no TPU needed on this host)."""
    try:
        import libtpu  # noqa: F401
    except ImportError:
        raise PlanError("planning for TPU needs libtpu: pip install 'basque-jax[aot]' "
                        "(the libtpu version jax[tpu] pins)") from None
    from jax.experimental import topologies

    # libtpu loads as if on a TPU VM: several planners on one host must not fight over its
    # single-user lock file, and it must not look for TPU VM metadata (this process never runs
    # anything on a TPU). Set only while it loads; the caller's environment is left as it was.
    quiet = {"ALLOW_MULTIPLE_LIBTPU_LOAD": "1", "TPU_SKIP_MDS_QUERY": "1",
             "TPU_ACCELERATOR_TYPE": topology.accelerator_type,
             "TPU_WORKER_HOSTNAMES": "localhost", "TPU_WORKER_ID": "0"}
    added = [k for k in quiet if k not in os.environ]
    os.environ.update({k: quiet[k] for k in added})
    try:
        desc = topologies.get_topology_desc(platform="tpu",
                                            topology_name=topology.topology_name)
    finally:
        for k in added:
            os.environ.pop(k, None)
    return list(desc.devices)


def resolve_architecture(cfg: RunConfig):
    """The ``LlamaConfig`` to plan with: the preset, ``init_from``'s config.json when readable,
    else ``plan.architecture``."""
    from etils import epath

    from basque_jax.model.config import LlamaConfig

    m = cfg.model
    if m.preset:
        return LlamaConfig.preset(m.preset)
    from basque_jax.model.gguf import NAMED_MODELS, model_path

    folder = model_path(m.init_from) if m.init_from in NAMED_MODELS else m.init_from
    path = epath.Path(folder) / "config.json"
    try:
        readable = path.exists()
    except Exception:  # noqa: BLE001  (no credentials / no gcsfs: fall back to the preset)
        readable = False
    if readable:
        return LlamaConfig.from_hf_dict(json.loads(path.read_text()))
    if cfg.plan.architecture:
        return LlamaConfig.preset(cfg.plan.architecture)
    raise PlanError(f"model.init_from {m.init_from!r}: no readable config.json here; set "
                    "plan.architecture to the model's preset (e.g. llama3.1-8b)")


_OOM = re.compile(r"HLO temporaries \(([\d.]+)([KMGT]?)\)")


# For the FLOP probes only: the TPU compiler splits large sharded matmuls into loops of
# partial products overlapped with the collectives ("windowed einsums"), whose bodies the cost
# analysis would count once. The probes keep each matmul whole; the arithmetic is the same.
PROBE_OPTIONS = {"xla_tpu_enable_windowed_einsum_for_all_gather": False,
                 "xla_tpu_enable_windowed_einsum_for_reduce_scatter": False}


def _compile(lowered, args, options: dict[str, Any] | None = None) -> tuple[Any, Memory]:
    """Compile; a program too large for HBM (the TPU compiler refuses it) comes back as
    ``(None, Memory(exhausted=True))`` with the temporaries the compiler asked for."""
    import jax

    try:
        compiled = lowered.compile(compiler_options=options)
    except jax.errors.JaxRuntimeError as e:
        m = _OOM.search(str(e))
        if "RESOURCE_EXHAUSTED" not in str(e) or m is None:
            raise
        scale = 1024 ** " KMGT".index(m.group(2) or " ")
        per_device = sum(math.prod(x.sharding.shard_shape(x.shape)) * x.dtype.itemsize
                         for x in jax.tree.leaves(args))
        return None, Memory(arguments=per_device, outputs=0, aliased=0,
                            temporaries=int(float(m.group(1)) * scale), code=0, exhausted=True)
    m = compiled.memory_analysis()
    return compiled, Memory(
        arguments=int(m.argument_size_in_bytes), outputs=int(m.output_size_in_bytes),
        aliased=int(m.alias_size_in_bytes), temporaries=int(m.temp_size_in_bytes),
        code=int(m.generated_code_size_in_bytes))


def _flops(compiled) -> float:
    """FLOPs per device from XLA's cost analysis; a loop left in the program would be counted
    once, so there must be none (the probes unroll theirs)."""
    loops = compiled.as_text().count(" while(")
    if loops:
        raise PlanError(f"the FLOP probe still holds {loops} loop(s) that XLA's cost analysis "
                        "would count once; no exact FLOP count (use --no-flops)")
    cost = compiled.cost_analysis()
    if isinstance(cost, list | tuple):
        cost = cost[0]
    return float(cost.get("flops", 0.0))


# ----------------------------------------------------------------------------- compile
def plan_run(cfg: RunConfig, topology: str | None = None, *, mfu: float | None = None,
             decode: bool = True, count_flops: bool = True, config_name: str = ""
             ) -> PlanReport:
    """AOT-compile ``cfg``'s train step (and decode step) for ``topology`` and report.

    ``count_flops=False`` skips the two small compiles that measure compiled FLOPs (reported
    as 0). A program that cannot fit makes the TPU compiler give up; that is reported as a
    train (or decode) memory of the size the compiler asked for.
    """
    import jax
    from flax import nnx

    from basque_jax.data.batch import BATCH_KEYS
    from basque_jax.model.attention import resolve_implementation
    from basque_jax.runs import construct
    from basque_jax.sharding import batch_shards, mesh_and_rules, use_sharding
    from basque_jax.train.flops import attention_flops_per_token, train_flops_per_token
    from basque_jax.train.setup import assemble_setup

    name = topology or cfg.plan.topology
    if not name:
        raise PlanError("no topology: pass --topology (e.g. v5p-32) or set plan.topology")
    try:
        topo = parse_topology(name)
    except ValueError as e:
        raise PlanError(str(e)) from None
    devices = topology_devices(topo)
    model_config = resolve_architecture(cfg)
    attention = cfg.model.attention
    if attention == "auto":
        attention = "splash"
    elif resolve_implementation(attention) in ("cudnn",):
        raise PlanError(f"model.attention {attention!r} is GPU-only; use auto/splash/xla")
    try:
        mesh, rules = mesh_and_rules(cfg.mesh, devices)
    except ValueError as e:
        raise PlanError(f"mesh on {topo.chips} chips of {name}: {e}") from None
    batch_size, seq_len = cfg.data.batch_size, cfg.data.seq_len
    def compile_train(config, unroll=1, run=cfg, options=None):
        model = nnx.eval_shape(lambda: construct(run, config, attention=attention,
                                                 scan_unroll=unroll))
        try:
            setup = assemble_setup(run, mesh, rules, model, abstract=True)
        except ValueError as e:
            raise PlanError(f"mesh {dict(mesh.shape)} on {name}: {e}") from None
        batch = {k: jax.ShapeDtypeStruct((run.data.batch_size, seq_len), dtype,
                                         sharding=setup.batch_sharding)
                 for k, dtype in BATCH_KEYS.items()}
        args = (setup.state, setup.frozen, batch)
        compiled, memory = _compile(setup.step_fn.lower(*args), args, options)
        return setup, compiled, memory

    # One micro-batch, the loss in one piece (micro-batches and loss chunks are loops too).
    micro = cfg.train.micro_batches
    whole_loss = dataclasses.replace(
        cfg, data=dataclasses.replace(cfg.data, batch_size=batch_size // micro),
        train=dataclasses.replace(cfg.train, loss_chunk=0, micro_batches=1))

    def probe_flops(layers: int) -> float:
        compiled = compile_train(model_config.replace(num_hidden_layers=layers),
                                 unroll=True, run=whole_loss, options=PROBE_OPTIONS)[1]
        if compiled is None:
            raise PlanError(f"a {layers}-layer copy of the step does not fit either; "
                            "no FLOP count (use count_flops=False / --no-flops)")
        return _flops(compiled)

    with use_sharding(mesh, rules):
        setup, _, train_memory = compile_train(model_config)
        s1 = s2 = 0.0
        if count_flops:
            s1, s2 = probe_flops(1), probe_flops(2)
        decode_batch = cfg.plan.decode_batch or batch_shards(mesh, rules)  # 1 row a shard
        decode_mem = decode_memory(setup, decode_batch, seq_len) if decode else None
    compiled_flops = len(devices) * micro * (s1 + (model_config.num_hidden_layers - 1)
                                             * (s2 - s1))
    n_params = model_config.num_parameters
    trainable = sum(x.size for x in jax.tree.leaves(setup.state.params))
    lora = setup.lora_meta  # what the model really has (a PEFT init_from sets its own rank)
    per_token = train_flops_per_token(model_config, seq_len,
                                      lora_rank=lora["rank"] if lora else None,
                                      lora_targets=lora["targets"] if lora else ())
    attention_per_token = 3 * attention_flops_per_token(model_config, seq_len)
    tokens = batch_size * seq_len
    return PlanReport(
        config=config_name, topology=name, topology_shape=topo.topology_name, chips=topo.chips,
        chip=devices[0].device_kind, hbm_bytes=topo.chip.hbm_bytes,
        mesh={k: int(v) for k, v in mesh.shape.items()}, mode=setup.mode, attention=attention,
        parameters=n_params, trainable_parameters=int(trainable), batch_size=batch_size,
        seq_len=seq_len, micro_batches=cfg.train.micro_batches, train_memory=train_memory,
        decode_memory=decode_mem, decode_batch=decode_batch,
        compiled_flops_per_step=compiled_flops,
        analytic_flops_per_step=per_token * tokens,
        analytic_attention_flops_per_step=attention_per_token * tokens, tokens_per_step=tokens,
        steps=_planned_steps(cfg), mfu=cfg.plan.mfu if mfu is None else mfu,
        peak_flops_per_chip=topo.chip.peak_bf16_flops)


def decode_memory(setup, batch: int, max_len: int) -> Memory:
    """Per-device memory of the sampler's decode program (what ``generate`` and ``translate``
    run) for ``batch`` rows against a ``max_len`` cache, on the set-up's (abstract) weights."""
    from basque_jax.sample.sampler import Sampler, SamplerConfig

    sampler = Sampler(None, SamplerConfig(batch_size=batch, max_len=max_len, unstack=False),
                      graphdef=setup.graphdef, params=(setup.state.params, setup.frozen),
                      mesh=setup.mesh, rules=setup.rules)
    return _compile(*sampler.lower_decode())[1]


def _planned_steps(cfg: RunConfig) -> int:
    """``train.steps``, or for ``steps: null`` the exact count from the prepared data when it
    is readable here (0 -- no budget -- before ``basque-jax prepare``)."""
    if cfg.train.steps is not None:
        return cfg.train.steps
    from basque_jax.data.tokenizer import load_tokenizer
    from basque_jax.train.loop import with_exact_steps

    try:
        return with_exact_steps(cfg, load_tokenizer(cfg.data.tokenizer)).train.steps
    except (UserError, OSError) as e:
        print(f"[plan] no step count yet ({' '.join(str(e).split())[:200]}); the budget "
              "below is 0 until basque-jax prepare has run")
        return 0


# ----------------------------------------------------------------------------- report
def _gib(n: float) -> str:
    return f"{n / 1024**3:.2f} GiB"


def format_report(r: PlanReport) -> str:
    """Human-readable plan."""
    mesh = " × ".join(f"{k}={v}" for k, v in r.mesh.items() if v > 1) or "1 device"
    lines = [
        f"plan: {r.config or 'config'} on {r.topology} ({r.topology_shape}, {r.chips} × "
        f"{r.chip}, {_gib(r.hbm_bytes)} HBM each)",
        f"  mesh {mesh}; {r.mode} fine-tuning, {r.parameters / 1e9:.2f}B parameters "
        f"({r.trainable_parameters / 1e6:.1f}M trained), attention {r.attention}",
        f"  batch {r.batch_size} × {r.seq_len} tokens = {r.tokens_per_step:,} tokens/step, "
        f"{r.micro_batches} micro-batch(es)",
    ]
    for label, mem in (("train step", r.train_memory), ("decode step", r.decode_memory)):
        if mem is None:
            continue
        verdict = "fits" if mem.total <= r.hbm_bytes else "DOES NOT FIT"
        if mem.exhausted:
            verdict += " (the compiler gave up; temporaries = what it asked for)"
        extra = f" (batch {r.decode_batch}, cache {r.seq_len})" if label == "decode step" else ""
        lines.append(
            f"  {label}{extra} per device: arguments {_gib(mem.arguments)}, outputs "
            f"{_gib(mem.outputs)} (aliased {_gib(mem.aliased)}), temporaries "
            f"{_gib(mem.temporaries)}, code {_gib(mem.code)} -> {_gib(mem.total)} of "
            f"{_gib(r.hbm_bytes)} ({100 * mem.total / r.hbm_bytes:.0f}%): {verdict}")
    ratio = r.compiled_flops_per_step / r.analytic_flops_per_step
    compiled = (f"compiled {r.compiled_flops_per_step:.3e} vs analytic "
                f"{r.analytic_flops_per_step:.3e} (x{ratio:.2f})" if ratio else
                f"analytic {r.analytic_flops_per_step:.3e} (compiled count skipped)")
    if ratio and r.attention.startswith("splash"):
        compiled += (f"; the {r.analytic_attention_flops_per_step:.3e} of attention run in a "
                     "Pallas kernel XLA does not count")
    lines += [
        f"  FLOPs/step: {compiled}",
        f"  at {100 * r.mfu:.0f}% MFU ({r.peak_flops_per_chip / 1e12:.0f} TFLOP/s bf16 peak per "
        f"chip): {r.step_seconds:.2f} s/step, {r.tokens_per_second:,.0f} tokens/s "
        f"({r.tokens_per_second / r.chips:,.0f} per chip)",
        f"  budget: {r.steps:,} steps = {r.steps * r.tokens_per_step / 1e9:.2f}B tokens -> "
        f"{r.steps * r.step_seconds / 3600:.1f} h wall, {r.chip_hours:,.0f} TPU chip-hours",
        f"  verdict: {'fits' if r.fits else 'DOES NOT FIT in HBM'}",
    ]
    return "\n".join(lines)


# ----------------------------------------------------------------------------- command
def add_plan_parser(sub) -> None:
    """The ``basque-jax plan`` sub-command."""
    p = sub.add_parser("plan", help="AOT-compile a run for a TPU slice: memory, FLOPs, cost")
    p.add_argument("config", help="YAML run config")
    p.add_argument("overrides", nargs="*", help="key=value overrides")
    p.add_argument("--topology", help="TPU slice, e.g. v5p-32, v6e-8, v5e:2x2 "
                   "(default: the config's plan.topology)")
    p.add_argument("--mfu", type=float, help="assumed MFU for time/cost (default: plan.mfu)")
    p.add_argument("--no-decode", action="store_true", help="skip the decode-step compile")
    p.add_argument("--no-flops", action="store_true",
                   help="skip the two small compiles that count compiled FLOPs")
    p.add_argument("--json", action="store_true", help="print one JSON line instead")
    p.set_defaults(func=_cmd_plan)


def _cmd_plan(args) -> int:
    from pathlib import Path

    from basque_jax.config import ConfigError, load_config

    cfg = load_config(args.config, args.overrides)
    if args.mfu is not None and not 0 < args.mfu <= 1:
        raise ConfigError(f"--mfu: must be in (0, 1], got {args.mfu}")
    report = plan_run(cfg, args.topology, mfu=args.mfu, decode=not args.no_decode,
                      count_flops=not args.no_flops, config_name=Path(args.config).stem)
    print(json.dumps(report.to_dict()) if args.json else format_report(report))
    return 0 if report.fits else 1
