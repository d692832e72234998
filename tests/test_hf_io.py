"""Hugging Face import/export: bitwise round trip, sharded files, and errors naming file and key."""

from __future__ import annotations

import json
import shutil

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from safetensors.numpy import load_file
from safetensors.torch import load_file as torch_load_file
from safetensors.torch import save_file as torch_save_file
from transformers import LlamaForCausalLM

from basque_jax import load_pretrained, save_pretrained
from basque_jax.errors import InputNotFound
from basque_jax.model.config import ConfigError
from basque_jax.model.hf import CheckpointError


def _tensors(folder) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(torch_load_file(f))
    return out


@pytest.mark.parametrize("case", ["llama31", "llama32_tied"])
def test_import_export_is_bitwise_identical(hf_checkpoint, tmp_path, case):
    src = hf_checkpoint(case)
    model = load_pretrained(src)
    save_pretrained(model, tmp_path)
    a, b = _tensors(src), _tensors(tmp_path)
    assert sorted(a) == sorted(b)
    for key in a:
        assert a[key].dtype == b[key].dtype, key
        assert torch.equal(a[key].view(torch.uint8), b[key].view(torch.uint8)), key
    reloaded = LlamaForCausalLM.from_pretrained(tmp_path)
    ids = torch.arange(10)[None]
    with torch.no_grad():
        ref = LlamaForCausalLM.from_pretrained(src)(ids).logits
        np.testing.assert_array_equal(reloaded(ids).logits.numpy(), ref.numpy())


def test_bfloat16_export_sharded_with_index(hf_checkpoint, tmp_path):
    model = load_pretrained(hf_checkpoint("odd_shapes"))
    files = save_pretrained(model, tmp_path, dtype=jnp.bfloat16, max_shard_bytes=40_000)
    assert len(files) > 2
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == {f.name for f in files}
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["torch_dtype"] == "bfloat16" and config["head_dim"] == 16
    loaded = load_pretrained(tmp_path)
    assert loaded.layers.mlp.up_proj.kernel.value.dtype == jnp.bfloat16
    hf = LlamaForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16)
    got = hf.model.layers[2].self_attn.k_proj.weight.detach().float().numpy()
    want = np.asarray(model.layers.self_attn.k_proj.kernel.value[2].astype(jnp.bfloat16)).T
    np.testing.assert_array_equal(got, want.astype(np.float32))


# ------------------------------------------------------------------------- errors
@pytest.fixture
def copy_of(hf_checkpoint, tmp_path):
    def make(case="llama31"):
        dst = tmp_path / "ckpt"
        shutil.copytree(hf_checkpoint(case), dst)
        return dst
    return make


def _rewrite(folder, mutate):
    path = folder / "model.safetensors"
    tensors = torch_load_file(path)
    mutate(tensors)
    torch_save_file(tensors, path, metadata={"format": "pt"})
    return path


def test_missing_folder_and_config(tmp_path):
    with pytest.raises(InputNotFound, match="nope"):
        load_pretrained(tmp_path / "nope")
    with pytest.raises(InputNotFound, match="config.json"):
        load_pretrained(tmp_path)


def test_missing_weights_names_folder_and_refuses_pickle(copy_of):
    folder = copy_of()
    (folder / "model.safetensors").rename(folder / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match=r"no model\.safetensors.*pytorch_model\.bin.*pickle"):
        load_pretrained(folder)


def test_missing_tensor_named(copy_of):
    folder = copy_of()
    _rewrite(folder, lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(CheckpointError, match=r"missing tensor\(s\) model\.layers\.1\.mlp\.up"):
        load_pretrained(folder)


def test_unexpected_tensor_named_with_file(copy_of):
    folder = copy_of()
    path = _rewrite(folder, lambda t: t.update({"model.layers.9.extra.weight": torch.zeros(2)}))
    with pytest.raises(CheckpointError, match=rf"{path}.*unexpected tensor 'model\.layers\.9"):
        load_pretrained(folder)


def test_shape_mismatch_named(copy_of):
    folder = copy_of()
    key = "model.layers.0.self_attn.k_proj.weight"
    path = _rewrite(folder, lambda t: t.update({key: torch.zeros(7, 64)}))
    with pytest.raises(CheckpointError, match=rf"{path}.*{key}.*shape \(7, 64\)"):
        load_pretrained(folder)


def test_dtype_mismatch_named(copy_of):
    folder = copy_of()
    key = "model.norm.weight"
    path = _rewrite(folder, lambda t: t.update({key: t[key].half()}))
    with pytest.raises(CheckpointError, match=rf"{path}.*{key}.*float16"):
        load_pretrained(folder)
    model = load_pretrained(folder, dtype=jnp.float32)  # an explicit dtype casts
    assert model.norm.weight.value.dtype == jnp.float32


def test_index_pointing_to_missing_shard(hf_checkpoint, tmp_path):
    model = load_pretrained(hf_checkpoint("llama31"))
    files = save_pretrained(model, tmp_path, max_shard_bytes=60_000)
    files[1].unlink()
    with pytest.raises(CheckpointError, match=files[1].name):
        load_pretrained(tmp_path)


def test_index_lists_key_absent_from_file(hf_checkpoint, tmp_path):
    model = load_pretrained(hf_checkpoint("llama31"))
    files = save_pretrained(model, tmp_path, max_shard_bytes=60_000)
    index_path = tmp_path / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    index["weight_map"]["model.norm.weight"] = files[0].name
    index_path.write_text(json.dumps(index))
    assert "model.norm.weight" not in load_file(files[0])
    with pytest.raises(CheckpointError, match=rf"{files[0].name}.*'model\.norm\.weight'"):
        load_pretrained(tmp_path)


def test_corrupt_safetensors_named(copy_of):
    folder = copy_of()
    (folder / "model.safetensors").write_bytes(b"\x05garbage")
    with pytest.raises(ValueError, match="model.safetensors"):
        load_pretrained(folder)


def test_bad_config_named(copy_of):
    folder = copy_of()
    cfg = json.loads((folder / "config.json").read_text())
    cfg["rope_parameters"] = {"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0}
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match=r"config\.json.*unknown rope_type 'yarn'"):
        load_pretrained(folder)
