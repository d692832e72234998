"""The log-likelihood scorer behind lm-eval's requests, against transformers' own log-softmax:
rows scored one by one and choices sharing a context (run once into a KV cache), on one
device and on a data x fsdp x tensor mesh."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from flax import nnx
from transformers import LlamaForCausalLM

from basque_jax import load_pretrained
from basque_jax.eval.scoring import make_scorer, score_requests
from basque_jax.eval.shared_prefix import MIN_SHARED_CONTEXT, plan
from basque_jax.sharding import MeshConfig, make_mesh, use_sharding

MAX_LENGTH = 160


def _requests(vocab: int) -> list[tuple[list[int], list[int]]]:
    rng = np.random.default_rng(3)

    def ids(n: int) -> list[int]:
        return rng.integers(0, vocab, n).tolist()

    reqs = []
    for n_ctx, n_choices, longest in ((70, 4, 1), (120, 3, 12), (90, 11, 6), (150, 2, 30)):
        ctx = ids(n_ctx)  # 11 choices: split over two batches of 8; 150 + 30: truncated
        reqs += [(ctx, ids(int(rng.integers(1, longest + 1)))) for _ in range(n_choices)]
    short = ids(20)  # shared, but too short to be worth it
    reqs += [(short, ids(5)), (short, ids(3)), (ids(40), ids(9))]
    reqs += [([1], ids(100)), ([1], ids(100))]  # rolling-like: continuation longer than context
    return reqs


def _reference(hf, reqs) -> list[tuple[float, bool]]:
    """transformers' float32 log-softmax over each full (left-truncated) row, summed in
    float64 over the continuation, and whether every continuation token is the argmax."""
    out = []
    for ctx, cont in reqs:
        tokens = [*ctx, *cont][-(MAX_LENGTH + 1):]
        n = min(len(cont), len(tokens) - 1)
        with torch.no_grad():
            logits = hf(torch.tensor([tokens[:-1]])).logits[0, -n:].float()
        logp = torch.log_softmax(logits, dim=-1)
        target = torch.tensor(tokens[-n:])
        picked = logp[torch.arange(n), target].double().sum().item()
        out.append((picked, bool((logits.argmax(-1) == target).all())))
    return out


def test_shared_contexts_are_planned_only_where_they_pay():
    reqs = _requests(256)
    rows = [([*c, *k][-(MAX_LENGTH + 1):], min(len(k), len(c) + len(k) - 1)) for c, k in reqs]
    batches, alone = plan(rows, 8)
    grouped = sorted(i for b in batches for m in b.members for i in m)
    assert grouped == list(range(18))  # the three long-context questions
    # truncated on the left by different amounts (150 + 28 / 150 + 20 tokens): no common context
    assert alone == list(range(18, 25))
    assert all(sum(map(len, b.members)) <= 8 for b in batches)
    assert all(len(c) >= MIN_SHARED_CONTEXT for b in batches for c in b.contexts)


@pytest.mark.parametrize("sharded", [False, True])
def test_scores_equal_transformers_with_and_without_shared_contexts(hf_checkpoint, sharded):
    folder = hf_checkpoint("llama31")
    hf = LlamaForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    reqs = _requests(hf.config.vocab_size)
    with torch.no_grad():  # a choice that is the model's argmax: is_greedy True, shared path
        best = int(hf(torch.tensor([reqs[0][0]])).logits[0, -1].argmax())
    reqs.append((reqs[0][0], [best]))
    ref = _reference(hf, reqs)
    assert ref[-1][1]
    mesh = make_mesh(MeshConfig(data=2, fsdp=2, tensor=2)) if sharded else None
    if sharded:
        with use_sharding(mesh):
            model = load_pretrained(folder, mesh=mesh)
    else:
        model = load_pretrained(folder)
    scorer = make_scorer(nnx.split(model)[0])
    for share in (True, False):
        got = score_requests(model, reqs, batch_size=8, max_length=MAX_LENGTH, mesh=mesh,
                             scorer=scorer, share_contexts=share)
        np.testing.assert_allclose([g[0] for g in got], [r[0] for r in ref], rtol=0, atol=2e-4)
        assert [g[1] for g in got] == [r[1] for r in ref]
