"""Sources: JSONL/JSON/Parquet/text files and globs, ArrayRecord, hub (via local json), TFDS,
fsspec URLs."""

from __future__ import annotations

import json
import sys
import types

import fsspec
import pytest
from _data_utils import write_jsonl

from basque_jax.data.config import SourceConfig
from basque_jax.data.formats import parse_record
from basque_jax.data.hub import HubStreamIterDataset
from basque_jax.data.sources import open_random_access, write_array_record
from basque_jax.data.stats import DataError
from basque_jax.errors import InputNotFound, MissingDependency

DOCS = [{"text": f"Dokumentu {i}. Kaixo mundua."} for i in range(7)]


def texts(cfg: SourceConfig) -> list[str]:
    ds = open_random_access(cfg)
    return [parse_record(r.payload, "corpus", text_field=cfg.text_field).text for r in ds]


def test_jsonl_and_glob(tmp_path):
    write_jsonl(tmp_path / "a.jsonl", DOCS[:3])
    write_jsonl(tmp_path / "b.jsonl", DOCS[3:])
    assert texts(SourceConfig(kind="corpus", path=str(tmp_path / "*.jsonl"))) == [
        d["text"] for d in DOCS
    ]
    recs = list(open_random_access(SourceConfig(kind="corpus", path=str(tmp_path / "b.jsonl"))))
    assert recs[1].where == f"{tmp_path / 'b.jsonl'}:2"
    limited = SourceConfig(kind="corpus", path=[str(tmp_path / "a.jsonl")], max_records=2)
    assert len(texts(limited)) == 2


def test_json_array_and_json_lines_named_json(tmp_path):
    (tmp_path / "arr.json").write_text(json.dumps(DOCS))
    assert texts(SourceConfig(kind="corpus", path=str(tmp_path / "arr.json"))) == [
        d["text"] for d in DOCS
    ]
    write_jsonl(tmp_path / "lines.json", DOCS)
    assert len(texts(SourceConfig(kind="corpus", path=str(tmp_path / "lines.json")))) == 7
    (tmp_path / "obj.json").write_text('{"text": "x"}')
    with pytest.raises(DataError, match="JSON array"):
        open_random_access(SourceConfig(kind="corpus", path=str(tmp_path / "obj.json")))


def test_parquet(tmp_path):
    pa = pytest.importorskip("pyarrow", reason="pyarrow comes with the `hub` extra (datasets)")
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(DOCS), tmp_path / "d.parquet")
    assert texts(SourceConfig(kind="corpus", path=str(tmp_path / "d.parquet"))) == [
        d["text"] for d in DOCS
    ]


def test_plain_text_units(tmp_path):
    p = tmp_path / "t.txt"
    p.write_text("Lehen lerroa.\nBigarren lerroa.\n\nHirugarren.\r\n")
    cfg = dict(kind="corpus", path=str(p))
    assert texts(SourceConfig(**cfg)) == ["Lehen lerroa.", "Bigarren lerroa.", "Hirugarren."]
    assert [r.where for r in open_random_access(SourceConfig(**cfg))][-1].endswith(":4")
    paras = texts(SourceConfig(**cfg, text_unit="paragraph"))
    assert paras == ["Lehen lerroa.\nBigarren lerroa.", "Hirugarren."]
    assert len(texts(SourceConfig(**cfg, text_unit="file"))) == 1
    assert texts(SourceConfig(**cfg, text_field="content")) == texts(SourceConfig(**cfg))


def test_array_record(tmp_path):
    write_array_record(DOCS, str(tmp_path / "d.array_record"))
    assert texts(SourceConfig(kind="corpus", path=str(tmp_path / "d.array_record"))) == [
        d["text"] for d in DOCS
    ]


def test_missing_file_and_unknown_extension(tmp_path):
    with pytest.raises(InputNotFound, match=r"source .*no file matches"):
        open_random_access(SourceConfig(kind="corpus", path=str(tmp_path / "nope.jsonl")))
    with pytest.raises(InputNotFound, match="no file matches"):
        open_random_access(SourceConfig(kind="corpus", path=str(tmp_path / "*.jsonl")))
    (tmp_path / "d.xyz").write_text("x")
    with pytest.raises(DataError, match="set `format:`"):
        open_random_access(SourceConfig(kind="corpus", path=str(tmp_path / "d.xyz")))
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(DataError, match="no records"):
        open_random_access(SourceConfig(kind="corpus", path=str(tmp_path / "empty.jsonl")))


def test_fsspec_url(tmp_path):
    fs = fsspec.filesystem("memory")
    with fs.open("/bucket/docs.jsonl", "wb") as f:
        f.write(b"".join(json.dumps(d).encode() + b"\n" for d in DOCS))
    try:
        got = texts(SourceConfig(kind="corpus", path="memory://bucket/*.jsonl"))
        assert got == [d["text"] for d in DOCS]
    finally:
        fs.rm("/bucket", recursive=True)
    with pytest.raises(MissingDependency, match="fsspec filesystem"):
        open_random_access(SourceConfig(kind="corpus", path="nosuchproto://b/x.jsonl"))


def test_hub_map_style_via_local_json(tmp_path):
    pytest.importorskip("datasets", reason="hub sources need the `hub` extra (datasets)")
    path = write_jsonl(tmp_path / "d.jsonl", DOCS)
    cfg = SourceConfig(kind="corpus", hf_dataset="json", data_files=str(path), name="hub")
    assert texts(cfg) == [d["text"] for d in DOCS]
    assert open_random_access(cfg)[2].where == "hub[2]"


def test_hub_streaming_sharded_shuffled_and_resumable(tmp_path):
    pytest.importorskip("datasets", reason="hub sources need the `hub` extra (datasets)")
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": f"d{i}"} for i in range(40)])
    cfg = SourceConfig(kind="corpus", hf_dataset="json", data_files=str(path), streaming=True)

    def stream(index=0, count=1, epochs=2):
        return HubStreamIterDataset(
            cfg, seed=5, shuffle_buffer=8, epochs=epochs, process_index=index, process_count=count
        )

    full = [r.payload["text"] for r in stream()]
    assert len(full) == 80 and sorted(full[:40]) == sorted(f"d{i}" for i in range(40))
    assert full[:40] != full[40:]  # reshuffled per epoch
    shards = [[r.payload["text"] for r in stream(i, 2, epochs=1)] for i in range(2)]
    assert not set(shards[0]) & set(shards[1])
    assert sorted(shards[0] + shards[1]) == sorted(f"d{i}" for i in range(40))
    it = iter(stream())
    for _ in range(45):
        next(it)
    state = it.get_state()
    rest = [r.payload["text"] for r in it]
    again = iter(stream())
    again.set_state(json.loads(json.dumps(state)))
    assert [r.payload["text"] for r in again] == rest == full[45:]


def test_tfds_data_source_through_lazy_import(monkeypatch):
    calls = {}

    def data_source(name, split, data_dir):
        calls.update(name=name, split=split, data_dir=data_dir)
        return [{"text": d["text"].encode()} for d in DOCS]  # TFDS gives bytes

    monkeypatch.setitem(sys.modules, "tensorflow_datasets", types.SimpleNamespace(
        data_source=data_source))
    cfg = SourceConfig(kind="corpus", tfds_name="my_corpus", split="train[:50%]", data_dir="/d")
    assert texts(cfg) == [d["text"] for d in DOCS]
    assert calls == {"name": "my_corpus", "split": "train[:50%]", "data_dir": "/d"}


def test_tfds_real_package():
    pytest.importorskip("tensorflow_datasets", reason="tensorflow-datasets is not installed")
    with pytest.raises(Exception):  # noqa: B017 - any error naming the unknown dataset
        open_random_access(SourceConfig(kind="corpus", tfds_name="no_such_dataset_xyz"))
