"""Run outputs on ``gs://`` URIs: metrics and checkpoint folders go through ``etils.epath``
(never ``pathlib``), checked against a stand-in ``gs`` filesystem backed by a local folder."""

from __future__ import annotations

import importlib
import json

import pytest
from fsspec.implementations.local import LocalFileSystem

from basque_jax.checkpoint import Checkpointer
from basque_jax.train.metrics import MetricsWriter


@pytest.fixture
def fake_gcs(tmp_path, monkeypatch):
    """``gs://bucket/...`` → ``tmp_path/bucket/...`` for every fsspec (hence epath) call."""
    root = tmp_path / "gcs"
    root.mkdir()

    class FakeGCS(LocalFileSystem):
        protocol = ("gs", "gcs")

        def __init__(self, *args, **kwargs):
            kwargs.pop("finalize_on_close", None)
            super().__init__(*args, **kwargs)

        @classmethod
        def _strip_protocol(cls, path):
            path = str(path)
            for prefix in ("gs://", "gcs://"):
                if path.startswith(prefix):
                    path = str(root / path[len(prefix):])
            return super()._strip_protocol(path)

    registry = importlib.import_module("fsspec.registry")  # the module, not the mapping
    for name in ("gs", "gcs"):
        monkeypatch.setitem(registry._registry, name, FakeGCS)
    from etils.epath import backend

    backend.fsspec_backend._get_filesystem.cache_clear()
    FakeGCS.clear_instance_cache()
    yield root
    backend.fsspec_backend._get_filesystem.cache_clear()


def test_metrics_append_on_an_object_store(fake_gcs):
    writer = MetricsWriter("gs://bucket/runs/a", tensorboard=False)
    writer.write(1, {"loss": 2.5})
    writer.write(2, {"loss": 2.0})
    writer.close()
    resumed = MetricsWriter("gs://bucket/runs/a", tensorboard=False)  # a restarted run
    resumed.write(3, {"loss": 1.5})
    resumed.close()
    lines = (fake_gcs / "bucket/runs/a/metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["step"] for x in lines] == [1, 2, 3]
    assert json.loads(lines[-1])["loss"] == 1.5


def test_checkpointer_keeps_the_uri(fake_gcs, tmp_path, monkeypatch):
    # orbax asks the GCS API (google-cloud-storage) about the bucket's layout; not here
    from orbax.checkpoint._src.path import gcs_utils

    monkeypatch.setattr(gcs_utils, "is_hierarchical_namespace_enabled", lambda path: False)
    ckpt = Checkpointer("gs://bucket/runs/a/checkpoints", async_save=False)
    assert str(ckpt.directory) == "gs://bucket/runs/a/checkpoints"
    assert ckpt.latest_step() is None
    ckpt.close()
    assert (fake_gcs / "bucket/runs/a/checkpoints").is_dir()
    local = Checkpointer(tmp_path / "rel", async_save=False)
    assert str(local.directory) == str(tmp_path / "rel")
    local.close()
