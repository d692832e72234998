"""``basque-jax serve`` as a real process, driven by the official ``openai`` client: answers
equal transformers' (and peft's, for a LoRA run served with its adapters unmerged) greedy
``generate`` on the prompt transformers' ``apply_chat_template`` builds; streaming in OpenAI's
chunk format; 16 concurrent requests equal to one-at-a-time runs; stop strings and max_tokens;
every error case with OpenAI's status and body; a client killed mid-stream."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import openai
import pytest
import torch
from _serve_utils import hf_chat_reference, hf_greedy, openai_client, served, tiny_chat_model

# One worker for the module: its models, LoRA run and server are built once.
pytestmark = pytest.mark.xdist_group("serve_tiny")
REPO = Path(__file__).resolve().parents[1]
MESSAGES = [{"role": "system", "content": "Euskaraz erantzun."},
            {"role": "user", "content": "Kaixo, zer moduz?"}]
META_STOPS = ["<|eot_id|>", "<|end_of_text|>", "<|eom_id|>"]  # Llama 3.1's generation config
MAX_LEN = 2048
PARAGRAPH = ("Euskara Euskal Herrian hitz egiten den hizkuntza da, munduko hizkuntza zaharrenetako "
             "bat. Gaur egun milioi bat hiztun inguru ditu, eta eskoletan, hedabideetan eta "
             "administrazioan erabiltzen da. Hizkuntza isolatua da: ez du ahaiderik ezagunik.")


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """A tiny chat model, a 3-step LoRA run on it, and the run's PEFT adapter."""
    from basque_jax.config import load_config
    from basque_jax.export.exporter import export
    from basque_jax.train.loop import run_training

    root = tmp_path_factory.mktemp("serve_models")
    tiny = tiny_chat_model(root / "tiny")
    cfg = load_config(REPO / "configs" / "demo.yaml", [
        "data.seq_len=128", "data.batch_size=8", "train.progress_bar=false",
        "train.tensorboard=false", "eval_data=null", "train.eval_every=0",
        "train.save_every=0", "optim.lr=5e-2", "optim.warmup_ratio=0.0", "train.steps=3",
        'data.sources=[{kind: chat, path: "@embedded/eu_sample_chat.jsonl"}]',
        f"model.init_from={tiny}", "model.preset=null", "lora.rank=4", "lora.alpha=8",
        f"train.output_dir={root / 'lora'}"])
    run_training(cfg)
    adapter = export(root / "lora", root / "adapter", mode="peft").out_dir
    return {"tiny": tiny, "lora": root / "lora", "adapter": adapter}


@pytest.fixture(scope="module")
def server(models, tmp_path_factory):
    log = tmp_path_factory.mktemp("serve_log") / "serve.log"
    with served([str(models["tiny"]), str(models["lora"]), "--name", "tiny",
                 "--name", "tiny-lora", "--batch-size", "4", "--max-len", str(MAX_LEN),
                 "--chunk-steps", "4"], log) as proc:
        yield proc


@pytest.fixture(scope="module")
def client(server):
    return openai_client(server, timeout=120)


@pytest.fixture(scope="module")
def references(models):
    """transformers on the tiny folder, peft with the run's adapter, the HF tokenizer."""
    import peft
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(models["tiny"])
    base = AutoModelForCausalLM.from_pretrained(models["tiny"], dtype=torch.float32).eval()
    lora_base = AutoModelForCausalLM.from_pretrained(models["tiny"], dtype=torch.float32)
    lora = peft.PeftModel.from_pretrained(lora_base, models["adapter"]).eval()
    return {"tiny": base, "tiny-lora": lora, "tokenizer": tok,
            "stops": tok.convert_tokens_to_ids(META_STOPS)}


def chat(client, model="tiny", **kwargs):
    kwargs = {"messages": MESSAGES, "temperature": 0, "max_tokens": 16, **kwargs}
    return client.chat.completions.create(model=model, **kwargs)


def test_every_model_is_listed(client):
    assert [m.id for m in client.models.list().data] == ["tiny", "tiny-lora"]
    card = client.models.retrieve("tiny-lora")
    assert card.id == "tiny-lora" and card.object == "model"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("nope")


@pytest.fixture(scope="module")
def expected(references):
    """transformers' prompt, greedy text and finish reason for MESSAGES, per model."""
    return {m: hf_chat_reference(references[m], references["tokenizer"], MESSAGES, 24,
                                 references["stops"]) for m in ("tiny", "tiny-lora")}


@pytest.mark.parametrize("model", ["tiny", "tiny-lora"])
def test_greedy_chat_equals_transformers(client, expected, model):
    prompt, text, reason = expected[model]
    r = chat(client, model, max_tokens=24)
    assert r.choices[0].message.content == text
    assert r.choices[0].finish_reason == reason
    assert r.usage.prompt_tokens == len(prompt)  # the prompt transformers' template builds
    assert r.object == "chat.completion" and r.model == model
    assert expected["tiny"][1] != expected["tiny-lora"][1]  # the adapters matter


def test_sampling_parameters_are_honoured(client, expected):
    greedy = expected["tiny"][1]

    def sample(**kwargs) -> str:
        return chat(client, max_tokens=24, **kwargs).choices[0].message.content

    hot = {"temperature": 1.5, "top_p": 0.95}
    first = sample(seed=7, **hot)
    assert sample(seed=7, **hot) == first != greedy  # a seed gives the same sample
    assert sample(seed=8, **hot) != first
    assert sample(seed=7, temperature=1.5, top_p=1e-6) == greedy  # top_p keeps the best one


def test_stream_is_the_same_text_in_openai_chunks(client, server):
    whole = chat(client, max_tokens=40).choices[0].message.content
    stream = chat(client, max_tokens=40, stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    pieces = [c.choices[0].delta.content for c in chunks if c.choices and
              c.choices[0].delta.content]
    assert len(pieces) >= 3 and "".join(pieces) == whole  # streamed, several deltas
    finish = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finish[-1] == "length" and not any(finish[:-1])
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 40
    assert len({c.id for c in chunks}) == 1

    body = {"model": "tiny", "messages": MESSAGES, "temperature": 0, "max_tokens": 12,
            "stream": True}
    with httpx.stream("POST", f"{server.base_url}/chat/completions", json=body,
                      timeout=60) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in r.iter_lines() if line]
    assert all(line.startswith("data: ") for line in lines) and lines[-1] == "data: [DONE]"
    events = [json.loads(line[6:]) for line in lines[:-1]]
    assert {e["object"] for e in events} == {"chat.completion.chunk"}
    assert set(events[0]["choices"][0]) == {"index", "delta", "logprobs", "finish_reason"}


def test_16_concurrent_requests_equal_one_at_a_time(server, client):
    """Greedy and seeded sampled requests, to both models, of different lengths: the batch
    (4 rows per model) refills while others run, and nobody's answer depends on it. (Every
    prompt of this module has 65-128 tokens: one prefill length to compile.)"""
    def kwargs(i: int) -> dict:
        sampled = {"temperature": 0.9, "top_p": 0.9, "seed": 100 + i} if i % 4 == 1 else \
            {"temperature": 0}
        return {"model": "tiny-lora" if i % 4 == 3 else "tiny", "max_tokens": 6 + 3 * (i % 5),
                "messages": [{"role": "user", "content": f"Galdera {i}: " + "zer " * i}],
                **sampled}

    alone = [client.chat.completions.create(**kwargs(i)) for i in range(16)]

    async def together():
        async with openai.AsyncOpenAI(base_url=server.base_url, api_key="EMPTY",
                                      max_retries=0, timeout=120) as aclient:
            return await asyncio.gather(*(aclient.chat.completions.create(**kwargs(i))
                                          for i in range(16)))

    joint = asyncio.run(together())
    for a, b in zip(alone, joint, strict=True):
        assert (a.choices[0].message.content, a.choices[0].finish_reason) == \
            (b.choices[0].message.content, b.choices[0].finish_reason)
        assert a.usage == b.usage
    assert len({a.choices[0].message.content for a in alone}) == 16


def test_stop_strings_and_max_tokens(client):
    text = chat(client, max_tokens=40).choices[0].message.content
    start = next(i for i in range(8, len(text) - 3) if "\ufffd" not in text[i:i + 3])
    stop = text[start:start + 3]
    expected = text[:text.find(stop)]
    r = chat(client, max_tokens=40, stop=[stop, "never-generated"])
    assert (r.choices[0].message.content, r.choices[0].finish_reason) == (expected, "stop")
    streamed = chat(client, max_tokens=40, stop=stop, stream=True)
    chunks = [c.choices[0] for c in streamed if c.choices]
    assert "".join(c.delta.content or "" for c in chunks) == expected
    assert chunks[-1].finish_reason == "stop"
    r = chat(client, max_tokens=5)
    assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 5
    r = chat(client, max_tokens=40, stop="never-generated")
    assert (r.choices[0].message.content, r.choices[0].finish_reason) == (text, "length")


def test_completions_endpoint(client, references):
    tok, hf = references["tokenizer"], references["tiny"]
    prompt = PARAGRAPH
    ids = [tok.bos_token_id] + tok(prompt, add_special_tokens=False).input_ids
    _, text, reason = hf_greedy(hf, tok, ids, 12, references["stops"])
    args = {"model": "tiny", "max_tokens": 12, "temperature": 0}
    r = client.completions.create(prompt=prompt, **args)
    assert (r.choices[0].text, r.choices[0].finish_reason) == (text, reason)
    assert r.object == "text_completion" and r.usage.prompt_tokens == len(ids)
    assert client.completions.create(prompt=ids, **args).choices[0].text == text
    assert client.completions.create(prompt=prompt, echo=True, **args).choices[0].text == \
        prompt + text
    two = client.completions.create(prompt=[prompt, prompt + " Egun on"], n=2, **args).choices
    assert [c.index for c in two] == [0, 1, 2, 3]
    assert two[0].text == two[1].text == text != two[2].text == two[3].text
    pieces = [c.choices[0].text for c in client.completions.create(prompt=prompt, stream=True,
                                                                      **args)]
    assert "".join(pieces) == text
    default = client.completions.create(model="tiny", prompt=prompt, temperature=0)
    assert default.choices[0].text.startswith(text)
    assert default.usage.completion_tokens == 16 or default.choices[0].finish_reason == "stop"


LONG = "hitz " * 3000
ERRORS = [  # (path, body, status, param, code)
    ("chat/completions", b"{not json", 400, None, "invalid_json"),
    ("chat/completions", [1, 2], 400, None, "invalid_json"),
    ("chat/completions", {"messages": MESSAGES}, 400, "model", "missing_required_parameter"),
    ("chat/completions", {"model": "tiny"}, 400, "messages", "missing_required_parameter"),
    ("chat/completions", {"model": "tiny", "messages": []}, 400, "messages", "invalid_value"),
    ("chat/completions", {"model": "nope", "messages": MESSAGES}, 404, "model",
     "model_not_found"),
    ("chat/completions", {"model": "tiny", "messages": MESSAGES, "temperature": 3}, 400,
     "temperature", "invalid_value"),
    ("chat/completions", {"model": "tiny", "messages": MESSAGES, "temperature": "hot"}, 400,
     "temperature", "invalid_value"),
    ("chat/completions", {"model": "tiny", "messages": MESSAGES, "top_p": 0}, 400, "top_p",
     "invalid_value"),
    ("chat/completions", {"model": "tiny", "messages": MESSAGES, "max_tokens": 0}, 400,
     "max_tokens", "invalid_value"),
    ("chat/completions", {"model": "tiny", "messages": MESSAGES, "n": 0}, 400, "n",
     "invalid_value"),
    ("chat/completions", {"model": "tiny", "messages": MESSAGES, "stop": [""]}, 400, "stop",
     "invalid_value"),
    ("chat/completions", {"model": "tiny", "messages": [{"role": "tool", "content": "x"}]},
     400, "messages[0].role", "invalid_value"),
    ("chat/completions", {"model": "tiny", "messages": [{"role": "user"}]}, 400,
     "messages[0].content", "missing_required_parameter"),
    ("chat/completions", {"model": "tiny", "messages": MESSAGES, "temprature": 0}, 400,
     "temprature", "unknown_parameter"),
    ("chat/completions", {"model": "tiny", "messages": MESSAGES, "presence_penalty": 0.5},
     400, "presence_penalty", "unsupported_parameter"),
    ("chat/completions", {"model": "tiny", "messages": MESSAGES, "logprobs": True}, 400,
     "logprobs", "unsupported_parameter"),
    ("chat/completions", {"model": "tiny", "messages": MESSAGES, "max_tokens": MAX_LEN}, 400,
     "messages", "context_length_exceeded"),
    ("chat/completions", {"model": "tiny", "messages": [{"role": "user", "content": LONG}]},
     400, "messages", "context_length_exceeded"),
    ("completions", {"model": "tiny", "prompt": [5, 99999]}, 400, "prompt", "invalid_value"),
    ("completions", {"model": "tiny", "prompt": ""}, 400, "prompt", "invalid_value"),
    ("completions", {"model": "tiny", "prompt": "a", "suffix": "b"}, 400, "suffix",
     "unsupported_parameter"),
    ("nowhere", {}, 404, None, None),
]


@pytest.mark.parametrize(("path", "body", "status", "param", "code"), ERRORS)
def test_errors_have_openai_status_and_body(server, path, body, status, param, code):
    url = f"{server.base_url}/{path}"
    kwargs = {"content": body} if isinstance(body, bytes) else {"json": body}
    r = httpx.post(url, timeout=60, **kwargs)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    assert (error["type"], error["param"], error["code"]) == \
        ("invalid_request_error", param, code), error


def test_errors_through_the_openai_client(server, client):
    with pytest.raises(openai.NotFoundError) as e:
        chat(client, "nope")
    assert e.value.body["code"] == "model_not_found"
    with pytest.raises(openai.BadRequestError) as e:
        chat(client, max_tokens=MAX_LEN, stream=True)
    assert e.value.body["code"] == "context_length_exceeded"
    assert httpx.get(f"{server.base_url}/chat/completions").status_code == 405
    assert chat(client).choices[0].message.content  # still serving


KILLED_CLIENT = """
import sys, openai
client = openai.OpenAI(base_url=sys.argv[1], api_key="EMPTY", max_retries=0)
stream = client.chat.completions.create(
    model="tiny", messages=[{"role": "user", "content": "Kaixo"}], temperature=0,
    max_tokens=1900, stream=True, extra_body={"ignore_eos": True})
for chunk in stream:
    if chunk.choices and chunk.choices[0].delta.content:
        print("delta", flush=True)
"""


def test_a_client_killed_mid_stream_frees_its_row(server, client):
    before = server.health()["models"]["tiny"]
    proc = subprocess.Popen([sys.executable, "-c", KILLED_CLIENT, server.base_url],
                            stdout=subprocess.PIPE, text=True)
    try:
        for _ in range(3):
            assert proc.stdout.readline() == "delta\n"
        assert server.health()["models"]["tiny"]["active"] == 1
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    deadline = time.monotonic() + 30
    while server.health()["models"]["tiny"]["active"] and time.monotonic() < deadline:
        time.sleep(0.05)
    after = server.health()["models"]["tiny"]
    assert after["active"] == 0
    assert after["cancelled"] == before["cancelled"] + 1  # stopped, not run to its end
    assert after["served"] == before["served"]
    assert chat(client).choices[0].finish_reason == "length"  # and the server carries on


def test_the_arena_on_this_server(server, client, tmp_path):
    """``basque-jax arena serve`` with both served models: a round through the page's HTTP
    API (what the browser sends), a vote, the names revealed, the stored answers the ones
    each model gives greedily."""
    from _openai_stub import free_port
    from test_arena_server import TOKEN, ArenaServer

    from basque_jax.arena.client import call_page

    system, prompt, names = "Euskaraz erantzun.", "Zer da euskara?", ("tiny", "tiny-lora")
    expected = {m: chat(client, m, messages=[{"role": "system", "content": system},
                                             {"role": "user", "content": prompt}])
                .choices[0].message.content for m in names}
    config = tmp_path / "arena.yaml"
    config.write_text(json.dumps({
        "title": "Serve arena", "language": "en", "database": "votes.db",
        "models": [{"name": m, "base_url": server.base_url} for m in names],
        "system_prompt": system, "temperature": 0.0, "top_p": 1.0, "max_tokens": 16,
        "admin_token": TOKEN, "leaderboard_bootstrap": 10}))
    arena = ArenaServer(config, free_port(), tmp_path / "arena.log")
    arena.start()
    try:
        with httpx.Client(timeout=120) as http:
            out = call_page(http, arena.url, "ask", [prompt, "serve-test"], "serve-test")
            assert out[3] == {"interactive": True, "__type__": "update"}  # votable
            reveal = call_page(http, arena.url, "vote_tie", ["serve-test"], "serve-test")[0]
        rows = arena.export()
    finally:
        arena.proc.terminate()
        arena.proc.wait(timeout=30)
    assert len(rows) == 1 and rows[0]["winner"] == "tie" and rows[0]["prompt"] == prompt
    row = rows[0]
    assert {row["model_a"], row["model_b"]} == set(names)
    assert f"A was **{row['model_a']}**, B was **{row['model_b']}**" in reveal
    assert (row["answer_a"], row["answer_b"]) == (expected[row["model_a"]],
                                                  expected[row["model_b"]])
