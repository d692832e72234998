"""The KV-cache sampler against transformers' ``generate`` / peft, continuous batching, the
token filters on constructed logits, stop handling, and sharding on a data × tensor mesh."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import peft
import pytest
import torch
from flax import nnx
from transformers import LlamaForCausalLM

from basque_jax import Llama, LlamaConfig, load_pretrained
from basque_jax.model.lora import TARGETS, LoraConfig, apply_lora, merge_lora
from basque_jax.sample import PromptTooLong, Request, Sampler, SamplingParams
from basque_jax.sample.sampler import SamplerConfig
from basque_jax.sample.sampling import RowParams, select_tokens, sort_mode
from basque_jax.sharding import MeshConfig, make_mesh, use_sharding

GREEDY = SamplingParams(temperature=0.0, max_new_tokens=12)
LENGTHS = (5, 11, 2, 8)


def _prompts(vocab: int, lengths=LENGTHS, seed: int = 0) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, vocab, n).tolist() for n in lengths]


def _hf_greedy(hf, prompts: list[list[int]], n: int, stop: list[int] | None = None
               ) -> list[list[int]]:
    """transformers ``generate(do_sample=False)`` on a left-padded batch, cut after a stop."""
    width = max(map(len, prompts))
    ids = torch.zeros((len(prompts), width), dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):] = torch.tensor(p)
        mask[i, width - len(p):] = 1
    with torch.no_grad():
        out = hf.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=n,
                          eos_token_id=stop, pad_token_id=0)
    rows = []
    for row in out[:, width:].tolist():
        cut = next((k for k, t in enumerate(row) if stop and t in stop), None)
        rows.append(row if cut is None else row[:cut + 1])
    return rows


@pytest.mark.parametrize("case", ["llama31", "llama32_tied", "odd_shapes"])
def test_greedy_equals_transformers_generate(hf_checkpoint, case):
    folder = hf_checkpoint(case)
    hf = LlamaForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    model = load_pretrained(folder)
    prompts = _prompts(model.config.vocab_size)
    ref = _hf_greedy(hf, prompts, GREEDY.max_new_tokens)
    sampler = Sampler(model, SamplerConfig(batch_size=4, max_len=32))
    ours = sampler.generate(prompts, GREEDY)
    assert [c.tokens for c in ours] == ref
    assert all(c.finish_reason == "length" for c in ours)
    if case == "llama31":  # weights sliced inside the program instead of copied: same tokens
        sliced = Sampler(model, SamplerConfig(batch_size=4, max_len=32, unstack=False)
                         ).generate(prompts, GREEDY)
        assert [c.tokens for c in sliced] == ref
        # stop ids end rows exactly where transformers' eos does; kept or stripped
        stop = [ref[0][3], ref[2][6]]
        want = _hf_greedy(hf, prompts, GREEDY.max_new_tokens, stop)
        kept = sampler.generate(prompts, SamplingParams(0.0, max_new_tokens=12, stop_ids=stop,
                                                        include_stop=True))
        assert [c.tokens for c in kept] == want
        stripped = sampler.generate(prompts, SamplingParams(0.0, max_new_tokens=12,
                                                            stop_ids=stop))
        for c, w in zip(stripped, want, strict=True):
            if w[-1] in stop:
                assert (c.tokens, c.finish_reason, c.stop_id) == (w[:-1], "stop", w[-1])
            else:
                assert (c.tokens, c.finish_reason, c.stop_id) == (w, "length", None)


def _peft_copy(folder, ours: Llama, targets, rank: int, alpha: float):
    """A peft model holding exactly our adapters (ours ``[L, in, r]`` → peft ``[r, in]``)."""
    base = LlamaForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    cfg = peft.LoraConfig(r=rank, lora_alpha=alpha, target_modules=list(targets),
                          lora_dropout=0.0)
    theirs = peft.get_peft_model(base, cfg).eval()
    layers = theirs.base_model.model.model.layers
    with torch.no_grad():
        for t in targets:
            lin = getattr(getattr(ours.layers, TARGETS[t]), t)
            a, b = np.asarray(lin.lora_a.get_value()), np.asarray(lin.lora_b.get_value())
            for i, layer in enumerate(layers):
                mod = getattr(getattr(layer, TARGETS[t]), t)
                mod.lora_A["default"].weight.copy_(torch.from_numpy(a[i].T.copy()))
                mod.lora_B["default"].weight.copy_(torch.from_numpy(b[i].T.copy()))
    return theirs


def test_lora_unmerged_and_merged_equal_peft(hf_checkpoint):
    folder = hf_checkpoint("llama31")
    targets = ("q_proj", "v_proj", "o_proj", "down_proj")
    model = load_pretrained(folder)
    apply_lora(model, LoraConfig(rank=4, alpha=8.0, targets=targets), rngs=nnx.Rngs(3))
    rng = np.random.default_rng(1)
    for t in targets:  # B starts at zero: make the adapters change the output
        b = getattr(getattr(model.layers, TARGETS[t]), t).lora_b
        b.set_value(jnp.asarray(0.3 * rng.standard_normal(b.get_value().shape), jnp.float32))
    theirs = _peft_copy(folder, model, targets, 4, 8.0)
    prompts = _prompts(model.config.vocab_size, seed=5)
    ref = _hf_greedy(theirs, prompts, GREEDY.max_new_tokens)
    base = _hf_greedy(LlamaForCausalLM.from_pretrained(folder, dtype=torch.float32).eval(),
                      prompts, GREEDY.max_new_tokens)
    assert ref != base  # the adapters matter
    small = SamplerConfig(batch_size=4, max_len=32)
    unmerged = Sampler(model, small).generate(prompts, GREEDY)
    assert [c.tokens for c in unmerged] == ref
    merged = Sampler(merge_lora(model), small).generate(prompts, GREEDY)
    assert [c.tokens for c in merged] == ref


@pytest.fixture(scope="module")
def tiny() -> Llama:
    return Llama(LlamaConfig.preset("tiny"), rngs=nnx.Rngs(0))


@pytest.fixture(scope="module")
def slots3(tiny) -> Sampler:
    """Three row slots, shared by the tests below (compiled programs are reused)."""
    return Sampler(tiny, SamplerConfig(batch_size=3, max_len=40, chunk_steps=2))


def test_continuous_batching_equals_one_at_a_time(tiny, slots3):
    prompts = _prompts(512, lengths=(3, 15, 6, 9, 1, 12, 4))
    budgets = (9, 2, 14, 5, 11, 1, 7)  # very different output lengths force many refills
    reqs = [Request(p, SamplingParams(0.0, max_new_tokens=n))
            for p, n in zip(prompts, budgets, strict=True)]
    one = Sampler(tiny, SamplerConfig(batch_size=1, max_len=40))
    alone = [one.generate([r])[0] for r in reqs]
    batched = slots3.generate(reqs)
    assert [c.tokens for c in batched] == [c.tokens for c in alone]
    assert [len(c.tokens) for c in batched] == list(budgets)
    # sampled rows too: a request's tokens depend on its seed, not on its batch neighbours
    hot = [Request(p, SamplingParams(0.8, top_p=0.9, max_new_tokens=n), seed=40 + i)
           for i, (p, n) in enumerate(zip(prompts, budgets, strict=True))]
    forward = [c.tokens for c in slots3.generate(hot)]
    backward = [c.tokens for c in slots3.generate(hot[::-1])][::-1]
    assert forward == backward
    assert forward != [c.tokens for c in batched]  # sampling did happen


def test_fine_prompt_buckets_pad_less_and_change_nothing(tiny):
    from basque_jax.config import ConfigError
    from basque_jax.sample.requests import bucket

    assert [bucket(n, 4096) for n in (1, 16, 17, 33, 100, 1000)] == [16, 16, 32, 64, 128, 1024]
    assert [bucket(n, 4096, 4) for n in (1, 17, 33, 49, 65, 100, 129, 1000)] == [
        16, 32, 48, 64, 80, 112, 160, 1024]
    assert bucket(300, 200, 4) == 200
    assert all(n <= bucket(n, 4096, 4) <= max(n + 15, 1.25 * n) for n in range(1, 3000))
    prompts = _prompts(512, lengths=(33, 17, 40, 21))  # widths 64 / 32 vs 48 / 32 / 48 / 32
    params = SamplingParams(0.0, max_new_tokens=6)
    coarse = Sampler(tiny, SamplerConfig(batch_size=2, max_len=64))
    fine = Sampler(tiny, SamplerConfig(batch_size=2, max_len=64, prompt_buckets=4))
    assert [c.tokens for c in fine.generate(prompts, params)] == [
        c.tokens for c in coarse.generate(prompts, params)]
    with pytest.raises(ConfigError, match=r"sampler\.prompt_buckets: must be a power of two"):
        SamplerConfig(prompt_buckets=3)


def test_decode_windows_are_exact_and_follow_the_load(tiny):
    """Decode chunks run on the busy rows and used cache slots only (powers of two): the
    tokens equal whole-batch decoding, also when a row's context grows past a window (60 +
    20 tokens: the 64-slot window, then 128) and as staggered rows come and go."""
    import collections

    cfg = dict(batch_size=8, max_len=256, chunk_steps=4)
    windowed = Sampler(tiny, SamplerConfig(**cfg))
    whole = Sampler(tiny, SamplerConfig(**cfg, adaptive=False))
    seen: list[tuple[int, int]] = []
    pick = windowed._window
    windowed._window = lambda *a: seen.append(pick(*a)[:2]) or pick(*a)
    reqs = [Request(p, SamplingParams(0.0, max_new_tokens=n)) for p, n in zip(
        _prompts(512, lengths=(60, 3, 30, 9, 17, 2, 45, 5, 11, 1)),
        (20, 3, 40, 6, 9, 2, 12, 4, 25, 7), strict=True)]
    alone = [c.tokens for _, c in windowed.stream(collections.deque(reqs[:1]))]  # chunks of 4
    assert seen == [(1, 64)] + [(1, 128)] * 4
    assert alone == [c.tokens for c in whole.generate(reqs[:1])]
    seen.clear()
    got = [c.tokens for c in windowed.generate(reqs)]
    assert got == [c.tokens for c in whole.generate(reqs)]
    assert [len(t) for t in got] == [r.params.max_new_tokens for r in reqs]
    assert seen[0] == (8, 64) and (8, 128) in seen and min(seen)[0] < 8  # fewer rows at the end


def test_warm_up_compiles_every_decode_window(tiny):
    sampler = Sampler(tiny, SamplerConfig(batch_size=6, max_len=200, chunk_steps=4))
    assert sampler.windows() == [(r, n) for r in (1, 2, 4, 6) for n in (64, 128, 200)]
    assert sampler.warm_up() == 12 and sampler._decode._cache_size() == 12
    prompts = _prompts(512, lengths=(150, 3, 30, 9, 17, 2, 45))
    sampler.generate(prompts, SamplingParams(0.0, max_new_tokens=40))
    assert sampler._decode._cache_size() == 12  # nothing compiled while serving
    assert Sampler(tiny, SamplerConfig(batch_size=6, max_len=200, adaptive=False)
                   ).windows() == [(6, 200)]


def test_watch_sees_progress_and_stops_rows_early(tiny, slots3):
    """``watch`` sees each running row after every chunk; stopping one (e.g. on a string)
    leaves the others exactly as they would have run."""
    import collections

    prompts = _prompts(512, lengths=(3, 15, 6, 9))
    reqs = [Request(p, SamplingParams(0.0, max_new_tokens=12), tag=i)
            for i, p in enumerate(prompts)]
    full = [c.tokens for c in slots3.generate(reqs)]
    seen: dict[int, list[int]] = collections.defaultdict(list)

    def watch(req, tokens):
        seen[req.tag].append(len(tokens))
        return req.tag == 1 and len(tokens) >= 4  # checked every chunk_steps=2 tokens

    got = dict((r.tag, c) for r, c in slots3.stream(collections.deque(reqs), watch=watch))
    n = len(got[1].tokens)
    assert got[1].finish_reason == "stop" and 4 <= n < 12 and got[1].tokens == full[1][:n]
    assert [got[i].tokens for i in (0, 2, 3)] == [full[i] for i in (0, 2, 3)]
    assert seen[0] == sorted(seen[0]) and seen[0][-1] == 12 and len(seen[0]) >= 6


def test_temperature_zero_is_greedy_whatever_the_filters(slots3):
    prompts = _prompts(512, lengths=(4, 7))
    greedy = [c.tokens for c in slots3.generate(prompts, SamplingParams(0.0,
                                                                         max_new_tokens=8))]
    filtered = SamplingParams(0.0, top_k=3, top_p=0.5, min_p=0.2, max_new_tokens=8)
    assert [c.tokens for c in slots3.generate(prompts, filtered)] == greedy
    # a greedy row keeps its tokens next to sampled rows in the same batch
    mixed = [Request(prompts[0], SamplingParams(0.0, max_new_tokens=8)),
             Request(prompts[1], SamplingParams(1.5, top_p=0.99, max_new_tokens=8), seed=1),
             Request(prompts[1], SamplingParams(1.0, top_k=5, max_new_tokens=8), seed=2)]
    out = slots3.generate(mixed)
    assert out[0].tokens == greedy[0]
    assert out[1].tokens != greedy[1]


# --------------------------------------------------------------------- constructed logits
def _draws(logits: np.ndarray, n: int = 3000, mode=None, **kw) -> np.ndarray:
    b = n
    lg = jnp.broadcast_to(jnp.asarray(logits, jnp.float32), (b, logits.shape[-1]))
    p = SamplingParams(**{"temperature": 1.0, **kw})
    rp = RowParams(*(jnp.full((b,), v, dtype) for v, dtype in (
        (p.temperature, jnp.float32), (p.top_k, jnp.int32), (p.top_p, jnp.float32),
        (p.min_p, jnp.float32))))
    keys = jax.random.split(jax.random.key(0), b)
    mode = sort_mode([p], logits.shape[-1]) if mode is None else mode
    return np.asarray(_select(lg, rp, keys, mode))


_select = jax.jit(select_tokens, static_argnums=3)


PROBS = np.array([0.4, 0.25, 0.15, 0.1, 0.06, 0.04])


def test_filters_never_emit_an_excluded_token():
    logits = np.log(PROBS)
    assert set(_draws(logits, top_k=2)) == {0, 1}
    assert set(_draws(logits, top_k=4)) == {0, 1, 2, 3}
    assert set(_draws(logits, top_p=0.6)) == {0, 1}  # 0.4 < 0.6 <= 0.65
    assert set(_draws(logits, top_p=0.7)) == {0, 1, 2}
    assert set(_draws(logits, min_p=0.3)) == {0, 1, 2}  # p >= 0.12
    assert set(_draws(logits, top_k=3, top_p=0.6)) == {0, 1}  # renormalised: .5, .31, .19
    assert set(_draws(logits, top_k=5, min_p=0.5)) == {0, 1}
    hot = _draws(logits, temperature=3.0, top_k=3)  # temperature flattens, top-k still cuts
    assert set(hot) == {0, 1, 2}
    assert set(_draws(logits, temperature=0.0, top_k=4)) == {0}


def test_plain_sampling_follows_the_softmax():
    draws = _draws(np.log(PROBS))
    freq = np.bincount(draws, minlength=len(PROBS)) / len(draws)
    np.testing.assert_allclose(freq, PROBS, atol=0.03)
    cold = np.bincount(_draws(np.log(PROBS), temperature=0.5), minlength=6) / 3000
    want = PROBS**2 / np.sum(PROBS**2)
    np.testing.assert_allclose(cold, want, atol=0.03)


def test_sort_mode_does_not_change_the_sample():
    logits = np.random.default_rng(0).normal(size=300) * 2
    a = _draws(logits, n=200, top_k=7, mode=(8, False))
    b = _draws(logits, n=200, top_k=7, mode=(300, False))
    np.testing.assert_array_equal(a, b)
    c = _draws(logits, n=200, min_p=0.1, mode="none")
    d = _draws(logits, n=200, min_p=0.1, mode=(300, False))
    np.testing.assert_array_equal(c, d)


def _reference_keep(s: np.ndarray, top_k: int, top_p: float, min_p: float) -> np.ndarray:
    """The filters by their sorted definition (numpy, float64)."""
    s = s.astype(np.float64)
    vals = np.sort(s)[::-1]
    if top_k:
        vals = vals[:top_k]
    probs = np.exp(vals - vals.max())
    probs /= probs.sum()
    before = np.cumsum(probs) - probs
    threshold = vals[max(int(np.sum(before < top_p)), 1) - 1]
    return (s >= threshold) & (s >= s.max() + np.log(max(min_p, 1e-30)))


def test_top_p_prefix_and_full_sort_agree_with_the_definition():
    from basque_jax.sample.sampling import TOP_P_PREFIX, keep_mask

    rng = np.random.default_rng(3)
    vocab = 3 * TOP_P_PREFIX
    rows = [  # (scaled logits, top_k, top_p, min_p)
        (rng.normal(size=vocab) * 4, 0, 0.9, 0.0),  # peaked: the nucleus fits the prefix
        (rng.normal(size=vocab) * 0.1, 0, 0.9, 0.0),  # flat: needs the full sort
        (rng.normal(size=vocab), 0, 1.0, 0.0),  # no filter at all next to filtered rows
        (rng.normal(size=vocab) * 2, 5, 0.5, 0.0),
        (rng.normal(size=vocab) * 2, 0, 0.7, 0.05),
    ]
    params = [SamplingParams(1.0, top_k=k, top_p=p, min_p=m) for _, k, p, m in rows]
    mode = sort_mode(params, vocab)
    assert mode == (TOP_P_PREFIX, True)
    scaled = jnp.asarray(np.stack([r[0] for r in rows]), jnp.float32)
    rp = RowParams(jnp.ones(len(rows)), jnp.asarray([r[1] for r in rows]),
                   jnp.asarray([r[2] for r in rows], jnp.float32),
                   jnp.asarray([r[3] for r in rows], jnp.float32))
    got = np.asarray(jax.jit(keep_mask, static_argnums=2)(scaled, rp, mode))
    for i, (logits, k, p, m) in enumerate(rows):
        np.testing.assert_array_equal(got[i], _reference_keep(logits, k, p, m), err_msg=str(i))
    assert got[1].sum() > TOP_P_PREFIX and got[2].all()


# --------------------------------------------------------------------- mesh, errors
def test_runs_sharded_on_a_data_tensor_mesh(hf_checkpoint):
    folder = hf_checkpoint("llama31")
    hf = LlamaForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    prompts = _prompts(256, lengths=(5, 11, 2, 8, 3, 6))
    ref = _hf_greedy(hf, prompts, 8)
    mesh = make_mesh(MeshConfig(data=2, fsdp=2, tensor=2))
    with use_sharding(mesh):
        model = load_pretrained(folder, mesh=mesh)
        sampler = Sampler(model, SamplerConfig(batch_size=6, max_len=32, chunk_steps=3),
                          mesh=mesh)
    assert sampler.batch_size == 8  # rounded up to the 4 batch shards
    kernel = model.layers.self_attn.q_proj.kernel.get_value()
    assert "tensor" in str(kernel.sharding.spec)
    out = sampler.generate(prompts, SamplingParams(0.0, max_new_tokens=8))
    assert [c.tokens for c in out] == ref
    state = sampler._init()
    k_sharding = state.cache.k[0].sharding
    assert k_sharding.spec[0] == ("data", "fsdp") and k_sharding.spec[1] == "tensor"


def test_bad_requests_are_refused(slots3):
    with pytest.raises(PromptTooLong, match="exceeds the sampler's max_len 40"):
        slots3.generate([[1] * 30], SamplingParams(0.0, max_new_tokens=11))
    with pytest.raises(ValueError, match="outside the vocabulary"):
        slots3.generate([[1, 999]], GREEDY)
    with pytest.raises(ValueError, match="empty prompt"):
        slots3.generate([[]], GREEDY)
    with pytest.raises(ValueError, match="top_p must be in"):
        SamplingParams(top_p=0.0)


def test_new_weights_do_not_recompile(tiny, slots3):
    """Swapping weights (as the training loop does each time it samples) changes the output
    and reuses the compiled programs."""
    prompts = _prompts(512, lengths=(4, 6))
    before = [c.tokens for c in slots3.generate(prompts, GREEDY)]
    other = nnx.clone(tiny)
    emb = other.embed_tokens.embedding
    emb.set_value(emb.get_value() * 3.0)
    _, *params = nnx.split(other)
    compiled, unstacker = slots3._decode._cache_size(), slots3._unstacker
    original = slots3.params
    slots3.set_params(*params)
    assert slots3._unstacker is unstacker and slots3._unstacker._cache_size() == 1
    try:
        after = [c.tokens for c in slots3.generate(prompts, GREEDY)]
    finally:
        slots3.set_params(*original)
    assert after != before
    assert slots3._decode._cache_size() == compiled


# --------------------------------------------------------------------- attached to training
def _train_config(tmp_path, **sample):
    from basque_jax.config import RunConfig

    return RunConfig.from_dict({
        "model": {"preset": "demo", "attention": "xla"},
        "lora": {"enabled": True, "rank": 4, "alpha": 8.0},
        "data": {"sources": [{"kind": "corpus", "path": "unused.jsonl"}], "seq_len": 32,
                 "batch_size": 8, "tokenizer": "demo"},
        "mesh": {"data": 4, "fsdp": 2, "tensor": 1},
        "optim": {"lr": 0.05, "warmup_ratio": 0.0},
        "train": {"steps": 3, "output_dir": str(tmp_path)},
        "sample": {"every": 1, "prompts": ["Zer da euskara?", "Kaixo!"],
                   "max_new_tokens": 6, **sample},
    })


def test_training_sampler_uses_the_live_weights(tmp_path):
    from basque_jax.data.tokenizer import load_tokenizer
    from basque_jax.train.loop import _training_sampler
    from basque_jax.train.setup import setup_training

    cfg = _train_config(tmp_path)
    setup = setup_training(cfg)
    tok = load_tokenizer("demo")
    with use_sharding(setup.mesh, setup.rules):
        hook = _training_sampler(cfg, tok, setup, tmp_path)
        assert hook.sampler.batch_size == 8  # 2 prompts, rows split over data × fsdp
        first = hook(1, setup.state.params, setup.frozen)
        # new (trained-looking) adapter weights change the completions, without recompiling
        params = jax.tree.map(lambda x: x + 0.5, setup.state.params)
        compiled = hook.sampler._decode._cache_size()
        second = hook(2, params, setup.frozen)
        assert hook.sampler._decode._cache_size() == compiled
    assert [r["completion"] for r in second] != [r["completion"] for r in first]
    # greedy: the first token is the argmax of the model's own forward on the same weights
    model = nnx.merge(setup.graphdef, setup.state.params, setup.frozen)
    last_logits = nnx.jit(lambda m, ids: m(ids)[0, -1])
    for req, rec in zip(hook.requests, first, strict=True):
        logits = last_logits(model, jnp.asarray([req.prompt], jnp.int32))
        assert rec["tokens"][0] == int(jnp.argmax(logits))
        assert rec["completion"] == tok.decode(rec["tokens"])
    lines = [json.loads(x) for x in (tmp_path / "samples.jsonl").read_text().splitlines()]
    assert [(r["step"], r["prompt"]) for r in lines] == [
        (1, "Zer da euskara?"), (1, "Kaixo!"), (2, "Zer da euskara?"), (2, "Kaixo!")]


def test_sample_section_errors_name_the_key(tmp_path):
    from basque_jax.config import ConfigError

    with pytest.raises(ConfigError, match=r"sample\.prompts: give at least one prompt"):
        _train_config(tmp_path, prompts=[])
    with pytest.raises(ConfigError, match=r"sample\.max_new_tokens: must be >= 1"):
        _train_config(tmp_path, max_new_tokens=0)
