"""`basque-jax export`: bitwise HF round trip, LoRA merged / PEFT / full fine-tuning exports
checked against transformers and peft, PEFT import, bounded memory, and every error case."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import peft
import pytest
import torch
from _model_utils import hf_logits, make_tiny_hf, subprocess_env
from safetensors.torch import load_file as torch_load_file
from transformers import LlamaForCausalLM

from basque_jax.cli import main
from basque_jax.config import load_config
from basque_jax.export import ExportError, SourceError, export, resolve_source
from basque_jax.model.config import LlamaConfig
from basque_jax.model.hf import param_shapes, write_pretrained
from basque_jax.model.peft_io import AdapterError, load_peft_adapter, read_peft_adapter
from basque_jax.runs import load_model
from basque_jax.train.loop import run_training

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "configs" / "demo.yaml"
SMALL = ["data.seq_len=128", "data.batch_size=8", "train.progress_bar=false",
         "train.tensorboard=false", "eval_data=null", "train.eval_every=0", "train.save_every=0",
         "optim.lr=3e-2", "optim.warmup_ratio=0.0", "train.steps=3",
         'data.sources=[{kind: corpus, path: "@embedded/eu_sample_corpus.jsonl"}]']
LORA = ["lora.enabled=true", "lora.rank=4", "lora.alpha=8", "lora.use_rslora=true"]
IDS = np.random.default_rng(0).integers(0, 1272, size=(2, 24))


def _cfg(out: Path, *extra: str):
    return load_config(DEMO, [*SMALL, f"train.output_dir={out}", *extra])


def _ours(cfg, step=None) -> np.ndarray:
    model = load_model(cfg.train.output_dir, step=step).model
    return np.asarray(model(jnp.asarray(IDS)))


def _tensors(folder: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(torch_load_file(f))
    return out


def _cli(*args: str) -> int:
    return main(["export", *map(str, args)])


# One worker for the module: the runs its tests share are trained once.
pytestmark = pytest.mark.xdist_group("export_runs")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A tiny HF backbone, a LoRA run and a full fine-tuning run on it (3 steps each)."""
    root = tmp_path_factory.mktemp("export_runs")
    hf = make_tiny_hf(root / "hf")
    init = [f"model.init_from={hf}", "model.preset=null"]
    lora_cfg = _cfg(root / "lora", *init, *LORA)
    run_training(lora_cfg)
    full_cfg = _cfg(root / "full", *init, "lora.enabled=false")
    run_training(full_cfg)
    return {"hf": hf, "lora": root / "lora", "full": root / "full", "lora_cfg": lora_cfg,
            "full_cfg": full_cfg, "root": root, "lora_logits": _ours(lora_cfg),
            "full_logits": _ours(full_cfg)}


# ------------------------------------------------------------------ HF folder → HF folder
@pytest.mark.parametrize(("case", "shard"), [("llama31", None), ("llama32_tied", None),
                                             ("odd_shapes", "40000")])
def test_hf_folder_export_is_bitwise_identical(hf_checkpoint, tmp_path, case, shard):
    src = hf_checkpoint(case)
    extra = ["--max-shard-size", shard] if shard else []
    assert _cli(src, tmp_path / "out", "--merged", "--dtype", "float32", *extra) == 0
    a, b = _tensors(src), _tensors(tmp_path / "out")
    assert sorted(a) == sorted(b)
    for key in a:
        assert a[key].dtype == b[key].dtype == torch.float32, key
        assert torch.equal(a[key].view(torch.uint8), b[key].view(torch.uint8)), key
    if shard:
        index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
        assert len(set(index["weight_map"].values())) > 2
    reloaded = hf_logits(tmp_path / "out", IDS % 256)
    np.testing.assert_array_equal(reloaded, hf_logits(src, IDS % 256))
    assert json.loads((tmp_path / "out" / "generation_config.json").read_text())[
        "eos_token_id"] == json.loads((src / "generation_config.json").read_text())[
        "eos_token_id"]
    assert not list(tmp_path.glob(".out.*")), "staging directory left behind"


def test_bf16_default_is_the_float32_export_rounded(hf_checkpoint, tmp_path):
    src = hf_checkpoint("llama31")
    export(src, tmp_path / "bf16")  # default dtype: bfloat16
    export(src, tmp_path / "f32", dtype="float32")
    bf16, f32 = _tensors(tmp_path / "bf16"), _tensors(tmp_path / "f32")
    for key, value in f32.items():
        assert bf16[key].dtype == torch.bfloat16
        assert torch.equal(bf16[key], value.to(torch.bfloat16)), key
    assert json.loads((tmp_path / "bf16" / "config.json").read_text())["torch_dtype"] == \
        "bfloat16"


# ------------------------------------------------------------------ run checkpoints
def test_lora_merged_export_matches_our_model_in_transformers(runs, tmp_path):
    ours = runs["lora_logits"]
    base = hf_logits(runs["hf"], IDS)
    assert np.abs(ours - base).max() > 1e-2, "training did not move the adapters"
    assert _cli(runs["lora"], tmp_path / "merged", "--dtype", "float32") == 0
    out = tmp_path / "merged"
    np.testing.assert_allclose(hf_logits(out, IDS), ours, atol=1e-4, rtol=0)
    names = {p.name for p in out.iterdir()}
    assert {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
            "tokenizer_config.json"} <= names
    # tokenizer files are the backbone's, byte for byte
    assert (out / "tokenizer.json").read_bytes() == (runs["hf"] / "tokenizer.json").read_bytes()


def test_peft_export_loads_in_peft_and_matches_merged(runs, tmp_path):
    assert _cli(runs["lora"], tmp_path / "adapter", "--peft") == 0
    adapter = tmp_path / "adapter"
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    assert (cfg["r"], cfg["lora_alpha"], cfg["use_rslora"]) == (4, 8, True)
    assert cfg["target_modules"] == sorted(runs["lora_cfg"].lora.targets)
    assert cfg["base_model_name_or_path"] == str(runs["hf"])
    assert (cfg["peft_type"], cfg["task_type"]) == ("LORA", "CAUSAL_LM")

    # the same keys and shapes peft itself writes for this configuration
    ref = peft.get_peft_model(
        LlamaForCausalLM.from_pretrained(runs["hf"]),
        peft.LoraConfig(r=4, lora_alpha=8, use_rslora=True, task_type="CAUSAL_LM",
                        target_modules=cfg["target_modules"]))
    ref.save_pretrained(tmp_path / "peft_ref")
    theirs = torch_load_file(tmp_path / "peft_ref" / "adapter_model.safetensors")
    ours = torch_load_file(adapter / "adapter_model.safetensors")
    assert {k: tuple(v.shape) for k, v in ours.items()} == \
        {k: tuple(v.shape) for k, v in theirs.items()}

    base = LlamaForCausalLM.from_pretrained(runs["hf"], dtype=torch.float32)
    model = peft.PeftModel.from_pretrained(base, adapter).eval()
    with torch.no_grad():
        via_peft = model(torch.as_tensor(IDS)).logits.numpy()
    export(runs["lora"], tmp_path / "merged", dtype="float32")
    np.testing.assert_allclose(via_peft, hf_logits(tmp_path / "merged", IDS), atol=1e-4, rtol=0)
    np.testing.assert_allclose(via_peft, runs["lora_logits"], atol=1e-4, rtol=0)


def test_lora_bf16_frozen_base_merges_as_trained(runs, tmp_path):
    """With ``lora.base_dtype: bfloat16`` the trained model saw a bf16-rounded base: the merged
    export must fold the adapters into that base, not into the float32 backbone file."""
    run = tmp_path / "run"
    shutil.copytree(runs["lora"], run)
    meta_file = run / "checkpoints" / "3" / "meta" / "metadata"
    meta = json.loads(meta_file.read_text())
    meta["config"]["lora"]["base_dtype"] = "bfloat16"
    meta["config"]["train"]["output_dir"] = str(run)
    meta_file.write_text(json.dumps(meta))
    ours = _ours(resolve_source(run).config)
    assert np.abs(ours - runs["lora_logits"]).max() > 1e-3  # the rounding is visible
    export(run, tmp_path / "out", dtype="float32")
    np.testing.assert_allclose(hf_logits(tmp_path / "out", IDS), ours, atol=1e-4, rtol=0)


def test_full_finetune_exports_merged_and_matches(runs, tmp_path):
    ours = runs["full_logits"]
    assert np.abs(ours - hf_logits(runs["hf"], IDS)).max() > 1e-2
    step_dir = runs["full"] / "checkpoints" / "3"
    assert _cli(step_dir, tmp_path / "out", "--dtype", "float32") == 0
    np.testing.assert_allclose(hf_logits(tmp_path / "out", IDS), ours, atol=1e-4, rtol=0)


def test_import_peft_adapter_and_continue_training(runs, tmp_path):
    export(runs["lora"], tmp_path / "adapter", mode="peft")
    # rank 16 / alpha 32 in the config: the adapter's own r=4, alpha=8, rsLoRA must win. One
    # step at a negligible lr: the continued model is still the exported one.
    cfg = _cfg(tmp_path / "cont", f"model.init_from={runs['hf']}", "model.preset=null",
               "lora.enabled=true", f"lora.init_from={tmp_path / 'adapter'}", "train.steps=1",
               "optim.lr=1e-12")
    assert (cfg.lora.rank, cfg.lora.alpha) == (16, 32.0)
    result = run_training(cfg)
    assert np.isfinite(result["loss"])
    src = resolve_source(tmp_path / "cont")
    assert (src.step, src.lora.rank, src.lora.alpha, src.lora.use_rslora) == (1, 4, 8.0, True)
    export(tmp_path / "cont", tmp_path / "merged", dtype="float32")
    np.testing.assert_allclose(hf_logits(tmp_path / "merged", IDS), runs["lora_logits"],
                               atol=1e-4, rtol=0)


def test_import_adapter_written_by_peft(runs, tmp_path):
    torch.manual_seed(1)
    theirs = peft.get_peft_model(
        LlamaForCausalLM.from_pretrained(runs["hf"], dtype=torch.float32),
        peft.LoraConfig(r=2, lora_alpha=6, target_modules=["down_proj", "q_proj"],
                        task_type="CAUSAL_LM")).eval()
    with torch.no_grad():
        for name, param in theirs.named_parameters():
            if "lora_B" in name:  # peft starts B at zero; make the adapter matter
                param.copy_(0.05 * torch.randn_like(param))
        want = theirs(torch.as_tensor(IDS)).logits.numpy()
    theirs.save_pretrained(tmp_path / "adapter")
    from basque_jax.model.hf import load_pretrained

    model = load_pretrained(runs["hf"])
    cfg = load_peft_adapter(model, tmp_path / "adapter")
    assert (cfg.rank, cfg.alpha, set(cfg.targets)) == (2, 6.0, {"down_proj", "q_proj"})
    np.testing.assert_allclose(np.asarray(model(jnp.asarray(IDS))), want, atol=1e-4, rtol=0)


def test_eval_of_a_run_equals_eval_of_its_merged_export(runs, tmp_path, capsys):
    corpus = REPO / "basque_jax" / "assets" / "eu_sample_corpus.jsonl"
    export(runs["lora"], tmp_path / "merged", dtype="float32")
    args = ["--perplexity", str(corpus), "--seq-len", "128", "--max-batches", "2"]
    results = []
    for model in (runs["lora"], tmp_path / "merged"):
        capsys.readouterr()
        assert main(["eval", str(model), *args]) == 0
        results.append(json.loads(capsys.readouterr().out))
    run, merged = results
    assert (run["step"], run["tokenizer"]) == (3, "demo")
    assert run["perplexity"]["tokens"] == merged["perplexity"]["tokens"] > 1000
    np.testing.assert_allclose(run["perplexity"]["nll"], merged["perplexity"]["nll"], rtol=1e-5)


def test_load_peft_adapter_errors(runs, tmp_path):
    export(runs["lora"], tmp_path / "good", mode="peft")
    model_cfg = LlamaConfig.from_hf_file(runs["hf"])

    def broken(name, edit_config=None, drop_key=None):
        folder = tmp_path / name
        shutil.copytree(tmp_path / "good", folder)
        if edit_config:
            cfg = json.loads((folder / "adapter_config.json").read_text())
            cfg.update(edit_config)
            (folder / "adapter_config.json").write_text(json.dumps(cfg))
        if drop_key:
            from safetensors.torch import save_file
            tensors = torch_load_file(folder / "adapter_model.safetensors")
            del tensors[drop_key]
            save_file(tensors, folder / "adapter_model.safetensors")
        return folder

    key = "base_model.model.model.layers.1.mlp.up_proj.lora_B.weight"
    with pytest.raises(AdapterError, match=rf"adapter_model.safetensors: missing tensor '{key}'"):
        read_peft_adapter(broken("missing", drop_key=key), model_cfg.num_hidden_layers)
    with pytest.raises(AdapterError, match=r"adapter_config.json: use_dora=True is not supported"):
        read_peft_adapter(broken("dora", {"use_dora": True}))
    with pytest.raises(AdapterError, match=r"do not have rank r=8"):
        read_peft_adapter(broken("rank", {"r": 8}))
    with pytest.raises(AdapterError, match=r"target_modules \['lm_head'\] are not Llama"):
        read_peft_adapter(broken("target", {"target_modules": ["lm_head"]}))
    with pytest.raises(AdapterError, match=r"adapter_config.json not found"):
        read_peft_adapter(tmp_path)
    from basque_jax.model.hf import load_pretrained

    three_layers = load_pretrained(make_tiny_hf(tmp_path / "hf3", num_hidden_layers=3,
                                                with_tokenizer=False))
    with pytest.raises(AdapterError, match=r"missing tensor .*layers\.2\."):
        load_peft_adapter(three_layers, tmp_path / "good")


def test_lora_on_random_preset_backbone(tmp_path, monkeypatch):
    from basque_jax.model import config as model_config

    tiny = model_config.LlamaConfig.preset("demo").replace(hidden_size=64, intermediate_size=128,
                                                            num_hidden_layers=2)
    monkeypatch.setitem(model_config.PRESETS, "tiny-demo", tiny)
    cfg = _cfg(tmp_path / "run", "model.preset=tiny-demo", *LORA, "lora.targets=[q_proj,v_proj]")
    run_training(cfg)
    export(tmp_path / "run", tmp_path / "out", dtype="float32")
    np.testing.assert_allclose(hf_logits(tmp_path / "out", IDS), _ours(cfg), atol=1e-4, rtol=0)
    # no backbone folder: the run's tokenizer (demo) is saved in HF form
    assert (tmp_path / "out" / "tokenizer.json").is_file()


def test_chat_trained_base_backbone_exports_its_template_and_end_of_turn(tmp_path):
    """A base backbone (no chat template, no eot among its stops) trained on conversations:
    the export renders the training format and stops at its end of turn, for transformers."""
    from transformers import AutoTokenizer, GenerationConfig

    from basque_jax.data.chat import ChatEncoder
    from basque_jax.data.tokenizer import load_tokenizer

    base = make_tiny_hf(tmp_path / "base")  # demo tokenizer files, no chat template
    cfg = _cfg(tmp_path / "run", "model.preset=null", f"model.init_from={base}", *LORA,
               f"data.tokenizer={base}", "data.system_prompt=Euskaraz erantzun.",
               "data.chat_date=1 Dec 2026",
               'data.sources=[{kind: chat, path: "@embedded/eu_sample_chat.jsonl"}]')
    run_training(cfg)
    export(tmp_path / "run", tmp_path / "out", dtype="float32")
    tok = load_tokenizer(base)
    eot = tok.token_id("<|eot_id|>")
    assert eot in GenerationConfig.from_pretrained(tmp_path / "out").eos_token_id
    hf = AutoTokenizer.from_pretrained(tmp_path / "out")
    encoder = ChatEncoder(tok, date_string="1 Dec 2026", system_prompt="Euskaraz erantzun.")
    chat = [("user", "Kaixo, zer moduz?"), ("assistant", "Ondo, eskerrik asko.")]
    ids = hf.apply_chat_template([{"role": r, "content": c} for r, c in chat], tokenize=True,
                                 return_dict=False)
    assert list(ids) == encoder.encode_chat(chat)[0]


# ------------------------------------------------------------------ generation config
def test_generation_config_for_instruct_and_base(hf_checkpoint, tmp_path):
    from transformers import GenerationConfig
    from transformers import LlamaConfig as HFLlamaConfig

    # an instructed Llama 3.x (its 128,256-token vocabulary) gets Meta's stop ids
    instruct = tmp_path / "tiny-Llama-3.1-8B-Instruct"
    LlamaForCausalLM(HFLlamaConfig(vocab_size=128256, hidden_size=16, intermediate_size=32,
                                   num_hidden_layers=1, num_attention_heads=2,
                                   num_key_value_heads=1)).save_pretrained(instruct)
    (instruct / "generation_config.json").unlink()
    export(instruct, tmp_path / "out_instruct")
    gen = json.loads((tmp_path / "out_instruct" / "generation_config.json").read_text())
    assert gen["eos_token_id"][:3] == [128001, 128008, 128009]
    assert (gen["temperature"], gen["top_p"], gen["do_sample"]) == (0.6, 0.9, True)
    assert GenerationConfig.from_pretrained(tmp_path / "out_instruct").eos_token_id[:3] == \
        [128001, 128008, 128009]
    # "Instruct" in the name of another vocabulary: no Llama ids (they would not exist there)
    src = hf_checkpoint("llama31")
    other = tmp_path / "tiny-Other-Instruct"
    shutil.copytree(src, other)
    export(other, tmp_path / "out_other")
    gen = json.loads((tmp_path / "out_other" / "generation_config.json").read_text())
    assert gen == json.loads((src / "generation_config.json").read_text())
    export(src, tmp_path / "out_base")
    gen = json.loads((tmp_path / "out_base" / "generation_config.json").read_text())
    assert gen == json.loads((src / "generation_config.json").read_text())


# ------------------------------------------------------------------ errors
def test_error_cases(runs, hf_checkpoint, tmp_path, capsys):
    src = hf_checkpoint("llama31")

    def fails(*args, match):
        assert _cli(*args) == 2
        err = capsys.readouterr().err
        assert match in err, err

    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    fails(src, out, match="OUT_DIR is not empty; pass --overwrite")
    assert (out / "keep.txt").read_text() == "x"
    assert _cli(src, out, "--overwrite") == 0
    assert not (out / "keep.txt").exists() and (out / "model.safetensors").is_file()

    fails(tmp_path / "nowhere", tmp_path / "o1", match="nowhere: does not exist")
    (tmp_path / "neither").mkdir()
    fails(tmp_path / "neither", tmp_path / "o1", match="neither a training output directory")
    (tmp_path / "empty_run" / "checkpoints").mkdir(parents=True)
    fails(tmp_path / "empty_run", tmp_path / "o1", match="no complete checkpoint")
    fails(runs["lora"], tmp_path / "o1", "--step", "99",
          match="no checkpoint for step 99 (available: 3)")
    fails(runs["lora"] / "checkpoints" / "7", tmp_path / "o1",
          match="no checkpoint for step 7 (available: 3)")
    fails(runs["full"], tmp_path / "o1", "--peft",
          match="--peft needs LoRA adapters but SOURCE is a full fine-tuning checkpoint")
    fails(src, tmp_path / "o1", "--peft", match="SOURCE is a Hugging Face folder")
    fails(src, src, "--overwrite", match="OUT_DIR would replace the source")
    fails(runs["lora"], runs["root"], "--overwrite", match="OUT_DIR would replace the source")
    fails(src, tmp_path / "o1", "--step", "3", match="--step applies to training checkpoints")
    assert not (tmp_path / "o1").exists()

    # the run's backbone moved away: named, nothing written
    moved = tmp_path / "moved_run"
    shutil.copytree(runs["lora"], moved)
    meta_file = moved / "checkpoints" / "3" / "meta" / "metadata"
    meta = json.loads(meta_file.read_text())
    meta["config"]["model"]["init_from"] = str(tmp_path / "gone")
    meta_file.write_text(json.dumps(meta))
    fails(moved, tmp_path / "o2", match="the run's backbone (model.init_from) is missing")

    # a failure half-way (a truncated shard) leaves no OUT_DIR and no staging folder
    bad = tmp_path / "truncated"
    shutil.copytree(src, bad)
    with open(bad / "model.safetensors", "r+b") as f:
        f.truncate((bad / "model.safetensors").stat().st_size - 1000)
    fails(bad, tmp_path / "o3", match="is truncated")
    assert not (tmp_path / "o3").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".o3")]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".o2")]


def test_python_api_errors(hf_checkpoint, tmp_path):
    with pytest.raises(ExportError, match="unknown export mode"):
        export(hf_checkpoint("llama31"), tmp_path / "x", mode="gguf")
    with pytest.raises(ExportError, match="--dtype 'int8'"):
        export(hf_checkpoint("llama31"), tmp_path / "x", dtype="int8")
    with pytest.raises(SourceError, match="missing: does not exist"):
        resolve_source(tmp_path / "missing")
    from basque_jax.config import ConfigError

    with pytest.raises(ConfigError, match="lora.init_from: set lora.enabled: true"):
        load_config(DEMO, ["lora.enabled=false", f"lora.init_from={tmp_path}"])


# ------------------------------------------------------------------ memory
_RSS_SCRIPT = textwrap.dedent("""
    import json, re, sys
    from basque_jax.export import export

    def status(key):
        return int(re.search(rf"{key}:\\s+(\\d+) kB", open("/proc/self/status").read())[1]) * 1024

    export(sys.argv[1], sys.argv[3], dtype="bfloat16")  # warm-up: imports, JAX backend
    before = status("VmRSS")
    open("/proc/self/clear_refs", "w").write("5")  # reset the peak (VmHWM) to the current RSS
    export(sys.argv[2], sys.argv[4], dtype="bfloat16", max_shard_bytes=64 * 2**20)
    print(json.dumps({"rss_before": before, "peak": status("VmHWM")}))
""")
RSS_BOUND = 96 * 2**20  # peak RSS growth allowed during the export: ~4x its largest tensor


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux /proc")
def test_export_peak_memory_is_bounded(hf_checkpoint, tmp_path):
    """A 376 MiB float32 model exports (cast to bfloat16) while the process's peak RSS grows
    by less than 96 MiB: the export holds about one tensor (largest: 16 MiB), not the model."""
    config = LlamaConfig(vocab_size=4096, hidden_size=1024, intermediate_size=2816,
                         num_hidden_layers=8, num_attention_heads=16, num_key_value_heads=4)
    rng = np.random.default_rng(0)
    shapes = param_shapes(config)
    big = tmp_path / "big"
    write_pretrained(config, big, lambda e, layer: rng.standard_normal(
        shapes[e.path][1:] if e.stacked else shapes[e.path], np.float32), dtype=np.float32,
        max_shard_bytes=128 * 2**20)
    model_bytes = sum(f.stat().st_size for f in big.glob("*.safetensors"))
    assert model_bytes > 350 * 2**20  # 376 MiB
    proc = subprocess.run([sys.executable, "-c", _RSS_SCRIPT, str(hf_checkpoint("llama31")),
                           str(big), str(tmp_path / "warm"), str(tmp_path / "out")],
                          env=subprocess_env(), capture_output=True, text=True, check=True)
    rss = json.loads(proc.stdout.strip().splitlines()[-1])
    growth = rss["peak"] - rss["rss_before"]
    print(json.dumps({"model_bytes": model_bytes, **rss, "growth": growth, "bound": RSS_BOUND}))
    assert growth < RSS_BOUND, f"peak RSS grew by {growth / 2**20:.0f} MiB"
    shards = sorted((tmp_path / "out").glob("model-*.safetensors"))
    assert len(shards) >= 3
    assert all(t.dtype == torch.bfloat16 for t in torch_load_file(shards[1]).values())
