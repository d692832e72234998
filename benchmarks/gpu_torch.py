"""The torch child of ``benchmarks/gpu.py``: the same LoRA step in transformers + PEFT (bf16,
``sdpa`` attention, gradient checkpointing when our remat is on) and the Magpie-like workload
through ``generate`` (static batches in arrival order). One JSON line per measurement."""

from __future__ import annotations

import gc
import time
from typing import Any

from gpu_common import (
    TARGETS,
    Settings,
    emit,
    guarded,
    magpie_requests,
    timed,
    train_batch,
    versions,
)


def device_record() -> dict[str, Any]:
    import torch

    cuda = torch.cuda.is_available()
    rec: dict[str, Any] = {"device": torch.cuda.get_device_name() if cuda else "cpu",
                           **versions("torch", "transformers", "peft")}
    if cuda:
        rec |= {"torch_cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version()}
    return rec


def hf_model(preset: str, attention: str):
    """A random-weight transformers Llama of ``preset``'s shape, bf16, built on the device."""
    import torch
    import transformers

    from basque_jax.model.config import LlamaConfig

    d = {k: v for k, v in LlamaConfig.preset(preset).to_hf_dict().items()
         if k not in ("architectures", "torch_dtype")}
    cfg = transformers.LlamaConfig(**d)
    torch.manual_seed(0)
    with torch.device(_device()):
        model = transformers.LlamaForCausalLM._from_config(
            cfg, dtype=torch.bfloat16, attn_implementation=attention)
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    return model


def _device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _sync() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _peak_memory() -> int | None:
    import torch

    return int(torch.cuda.max_memory_allocated()) if torch.cuda.is_available() else None


def _release() -> None:
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def train_hf(s: Settings, peak: float | None, preset: str, seq_len: int) -> dict[str, Any]:
    """Tokens/s and MFU of transformers + PEFT: forward, float32 cross-entropy, backward,
    clip, AdamW (torch's fused kernel on GPU) -- the same step as ours."""
    import peft
    import torch

    from basque_jax.model.config import LlamaConfig
    from basque_jax.train.flops import train_flops_per_token

    batch = s.batch_for(preset, seq_len)
    model = hf_model(preset, s.hf_attention)
    model.config.use_cache = False
    if s.remat != "none":
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model = peft.get_peft_model(model, peft.LoraConfig(
        r=s.rank, lora_alpha=2 * s.rank, target_modules=list(TARGETS), lora_dropout=0.0))
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    cuda = torch.cuda.is_available()
    opt = torch.optim.AdamW(params, lr=s.lr, betas=(0.9, 0.95), eps=1e-8,
                            weight_decay=s.weight_decay, fused=cuda)
    data = train_batch(model.config.vocab_size, batch, seq_len, s.seed)
    ids = torch.as_tensor(data["input_ids"], dtype=torch.long, device=_device())
    labels = torch.as_tensor(data["targets"], dtype=torch.long, device=_device())

    def step() -> torch.Tensor:
        logits = model(input_ids=ids).logits
        loss = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), labels.flatten())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, s.clip_norm)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.detach()

    first = timed(lambda: (step(), _sync()))[0]
    for _ in range(s.warmup_steps - 1):
        step()
    _sync()
    t0 = time.perf_counter()
    for _ in range(s.timed_steps):
        loss = step()
    _sync()
    step_s = (time.perf_counter() - t0) / s.timed_steps
    tokens = batch * seq_len
    flops = tokens * train_flops_per_token(LlamaConfig.preset(preset), seq_len,
                                           lora_rank=s.rank, lora_targets=TARGETS)
    rec = {"side": "hf_peft", "preset": preset, "seq_len": seq_len, "batch": batch,
           "attention": s.hf_attention, "gradient_checkpointing": s.remat != "none",
           "dtype": "bfloat16", "step_s": round(step_s, 5), "first_step_s": round(first, 2),
           "tokens_per_s": round(tokens / step_s, 1), "flops_per_step": flops,
           "mfu": None if peak is None else round(flops / step_s / peak, 4),
           "loss": round(float(loss), 4), "peak_bytes_allocated": _peak_memory()}
    return rec


def magpie_hf(s: Settings) -> dict[str, Any]:
    """The Magpie-like workload through ``generate``: batches of ``magpie_batch`` requests in
    arrival order, left-padded, each run to its longest budget (what static batching does);
    only each request's own budget counts as useful tokens, as on our side."""
    import torch

    model = hf_model(s.decode_preset, s.hf_attention).eval()
    work = magpie_requests(s, model.config.vocab_size)
    chunks = [work[i:i + s.magpie_batch] for i in range(0, len(work), s.magpie_batch)]

    def run(chunk: list[tuple[list[int], int]]) -> int:
        width = max(len(p) for p, _ in chunk)
        ids = torch.zeros((len(chunk), width), dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, (p, _) in enumerate(chunk):  # left padding, as decoder-only generate wants
            ids[i, width - len(p):] = torch.as_tensor(p)
            mask[i, width - len(p):] = 1
        n = max(b for _, b in chunk)
        with torch.no_grad():
            out = model.generate(ids.to(_device()), attention_mask=mask.to(_device()),
                                 do_sample=False, max_new_tokens=n, min_new_tokens=n,
                                 use_cache=True)
        _sync()
        return int(out.shape[0] * (out.shape[1] - width))

    first = timed(lambda: run([(p, 2) for p, _ in chunks[0]]))[0]
    t0 = time.perf_counter()
    computed = sum(run(c) for c in chunks)
    wall = time.perf_counter() - t0
    useful = sum(b for _, b in work)
    rec = {"side": "hf_generate", "preset": s.decode_preset, "requests": len(work),
           "batch": s.magpie_batch, "greedy": True, "cache": "DynamicCache",
           "attention": s.hf_attention, "useful_tokens": useful, "computed_tokens": computed,
           "wall_s": round(wall, 3), "warmup_s": round(first, 2),
           "tokens_per_s": round(useful / wall, 1), "peak_bytes_allocated": _peak_memory()}
    return rec


def run_group(s: Settings, deadline: float, peak: float | None) -> None:
    """Every torch section, in priority order, each guarded; a missing package is reported."""
    missing = [n for n, v in versions("torch", "transformers", "peft").items() if v is None]
    if missing:
        emit({"section": "device_torch", "error": f"not installed: {', '.join(missing)}",
              "missing": missing})
        return
    import torch

    if not torch.cuda.is_available() and not s.smoke:
        emit({"section": "device_torch", "error": "torch sees no CUDA device (a CPU build, "
              f"torch {torch.__version__}?): install a CUDA build of torch for the comparison; "
              "the torch sections are skipped"})
        return
    if not torch.cuda.is_available():
        # The smoke on a small shared CPU: torch's OpenMP threads stall each other there
        # (25x slower at 2 threads than at 1 when the cores are busy).
        torch.set_num_threads(1)
    guarded("device_torch", device_record, deadline)
    if peak is None:
        from basque_jax.topology import peak_flops

        peak = peak_flops(device_record()["device"])
    for preset in s.presets:
        for seq in s.seq_lens:
            guarded("train", lambda p=preset, t=seq: train_hf(s, peak, p, t), deadline)
            _release()  # the previous model and optimizer, now unreferenced
    guarded("magpie", lambda: magpie_hf(s), deadline)
    emit({"section": "done_torch"})
