"""DataConfig.from_dict: typed, validated, errors name the key."""

from __future__ import annotations

import pytest

from basque_jax.data.config import ConfigError, DataConfig, SourceConfig

BASE = {
    "sources": [
        {"kind": "corpus", "path": "a.jsonl"},
        {"kind": "chat", "hf_dataset": "HiTZ/Magpie", "split": "train", "streaming": True},
    ],
    "seq_len": 128,
    "batch_size": 8,
    "mixture": "weighted",  # a streaming source has no size to concatenate
}


def test_from_dict_builds_typed_config():
    cfg = DataConfig.from_dict({**BASE, "max_bad_fraction": 0, "epochs": None})
    assert isinstance(cfg.sources[0], SourceConfig)
    assert cfg.sources[0].name == "a.jsonl" and cfg.sources[1].name == "HiTZ/Magpie"
    assert cfg.max_bad_fraction == 0.0 and isinstance(cfg.max_bad_fraction, float)
    assert cfg.epochs is None
    assert DataConfig.from_dict(cfg.to_dict()) == cfg


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"seq_lenn": 4}, r"data\.seq_lenn: unknown key"),
        ({"mixture": "concat"}, r"data\.mixture: streaming sources \['HiTZ/Magpie'\] have no "
         r"known size"),
        ({"seq_len": "2048"}, r"data\.seq_len: expected int, got str"),
        ({"seq_len": True}, r"data\.seq_len: expected int, got bool"),
        ({"mixture": "zip"}, r"data\.mixture: expected one of \['concat', 'weighted'\]"),
        ({"epochs": 1.5}, r"data\.epochs: expected int or null"),
        ({"sources": {"kind": "corpus"}}, r"data\.sources: expected a list"),
        ({"sources": [{"kind": "corpus", "path": "a", "txt_field": "x"}]},
         r"data\.sources\[0\]\.txt_field: unknown key"),
        ({"sources": [{"kind": "poem", "path": "a"}]},
         r"data\.sources\[0\]\.kind: expected one of"),
        ({"sources": [{"kind": "corpus", "path": 3}]}, r"data\.sources\[0\]\.path: expected"),
        ({"sources": [{"kind": "corpus"}]}, r"data\.sources\[0\]: .*exactly one of path"),
        ({"sources": [{"path": "a"}]}, r"data\.sources\[0\]: .*kind"),
        ({"sources": [{"kind": "corpus", "path": "a"}, {"kind": "chat", "path": "a"}]},
         r"duplicate source names"),
        ({"sources": [{"kind": "corpus", "path": "a", "weight": 2}], "mixture": "concat"},
         r"weight only applies to mixture 'weighted'"),
        ({"sources": [{"kind": "corpus", "path": "a", "streaming": True}]},
         r"streaming applies to hf_dataset"),
        ({"seq_len": 1}, r"seq_len must be >= 2"),
        ({"max_bad_fraction": 2}, r"max_bad_fraction"),
    ],
)
def test_from_dict_errors_name_the_key(change, match):
    with pytest.raises(ConfigError, match=match):
        DataConfig.from_dict({**BASE, **change})


def test_weighted_mixture_accepts_weights():
    cfg = DataConfig.from_dict(
        {
            "mixture": "weighted",
            "sources": [
                {"kind": "corpus", "path": "a", "weight": 3},
                {"kind": "chat", "path": "b", "weight": 0.5},
            ],
        }
    )
    assert [s.weight for s in cfg.sources] == [3.0, 0.5]
