"""``benchmarks/gpu.py --smoke``: the GPU benchmark's own code on CPU with tiny shapes.

One run of the script (its JAX, torch and memory children) per session; the tests check the
JSON lines' structure and sanity: every section ran without error, rates are positive, MFU is
a fraction of the (measured) peak, both sides of every comparison and their ratios are there.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from basque_jax.topology import hbm_bandwidth, peak_flops

ROOT = Path(__file__).resolve().parents[1]
# One script run (three child processes, a handful of compiles; ~25 s on 2 idle cores) for all
# the tests that read its lines; 52 s under pytest on the shared box, hence marked slow.
smoke = pytest.mark.slow
pytestmark = pytest.mark.xdist_group("benchmarks_smoke")  # one script run, not one per worker


@pytest.fixture(scope="session")
def smoke_lines() -> list[dict]:
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu.py"), "--smoke"],
                          capture_output=True, text=True, env=env, timeout=1500, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-4000:]
    lines = [json.loads(x) for x in proc.stdout.splitlines() if x.startswith("{")]
    assert lines, proc.stderr[-4000:]
    return lines


def _section(lines: list[dict], name: str) -> list[dict]:
    return [r for r in lines if r["section"] == name]


@smoke
def test_no_section_failed(smoke_lines):
    bad = [r for r in smoke_lines if "error" in r or "skipped" in r]
    assert bad == []
    assert smoke_lines[0]["section"] == "settings" and smoke_lines[0]["mode"] == "smoke"
    assert smoke_lines[-1]["section"] == "summary"
    assert smoke_lines[-1]["failed_or_skipped"] == []


@smoke
def test_train_rows_both_sides_with_mfu(smoke_lines):
    settings = smoke_lines[0]
    dev = _section(smoke_lines, "device_jax")[0]
    assert dev["peak_flops"] > 0 and dev["peak_source"].startswith("measured")
    rows = _section(smoke_lines, "train")
    shapes = {(p, t) for p in settings["presets"] for t in settings["seq_lens"]}
    for side in ("ours", "hf_peft"):
        got = {(r["preset"], r["seq_len"]): r for r in rows if r["side"] == side}
        assert set(got) == shapes, side
        for r in got.values():
            assert r["tokens_per_s"] > 0 and r["step_s"] > 0
            assert 0 < r["mfu"] < 1
            assert r["tokens_per_s"] == pytest.approx(r["batch"] * r["seq_len"] / r["step_s"],
                                                      rel=1e-3)
            assert 0 < r["loss"] < 20
    ours = {(r["preset"], r["seq_len"]): r for r in rows if r["side"] == "ours"}
    theirs = {(r["preset"], r["seq_len"]): r for r in rows if r["side"] == "hf_peft"}
    for k in shapes:  # the same analytic FLOPs on both sides of one shape
        assert ours[k]["flops_per_step"] == theirs[k]["flops_per_step"]
    summary = smoke_lines[-1]
    assert len(summary["train"]) == len(shapes)
    for row in summary["train"]:
        assert row["speedup_vs_hf_peft"] == pytest.approx(
            row["ours_tokens_per_s"] / row["hf_peft_tokens_per_s"], rel=1e-2)


@smoke
def test_packed_rows_probe(smoke_lines):
    (packed,) = [r for r in _section(smoke_lines, "train_extra") if r["docs_per_row"] > 1]
    assert packed["tokens_per_s"] > 0 and 0 < packed["mfu"] < 1


@smoke
def test_decode_rows_and_roofline(smoke_lines):
    settings = smoke_lines[0]
    rows = {r["batch"]: r for r in _section(smoke_lines, "decode")}
    assert sorted(rows) == sorted(settings["decode_batches"])
    for b, r in rows.items():
        assert r["step_ms"] > 0 and r["tokens_per_s"] == pytest.approx(b / r["step_ms"] * 1e3,
                                                                        rel=1e-2)
        assert r["bytes_per_step_read"] >= r["bytes_per_step_useful"] > r["weight_bytes"] > 0
        assert r["roofline_fraction"] > 0 and r["useful_roofline_fraction"] > 0


@smoke
def test_magpie_both_sides_same_work(smoke_lines):
    rows = {r["side"]: r for r in _section(smoke_lines, "magpie")}
    assert set(rows) == {"ours", "hf_generate"}
    assert rows["ours"]["useful_tokens"] == rows["hf_generate"]["useful_tokens"] > 0
    assert rows["hf_generate"]["computed_tokens"] >= rows["hf_generate"]["useful_tokens"]
    assert all(r["tokens_per_s"] > 0 for r in rows.values())
    assert smoke_lines[-1]["magpie_tokens_per_s"]["speedup_vs_generate"] > 0


@smoke
def test_memory_analysis_line(smoke_lines):
    (m,) = _section(smoke_lines, "memory")
    parts = m["arguments"] + m["outputs"] - m["aliased"] + m["temporaries"] + m["code"]
    assert m["total"] == parts > 0 and m["fits_80gib"] and m["backend"] == "cpu"
    assert "while-loop-invariant-code-motion" in m["XLA_FLAGS"]


def test_gpu_numbers_by_device_kind():
    """jax's GPU device kinds; the more specific name (PCIe, NVL, 40GB) wins over the family."""
    assert peak_flops("NVIDIA H100 80GB HBM3") == 989e12
    assert (peak_flops("NVIDIA H100 PCIe"), hbm_bandwidth("NVIDIA H100 PCIe")) == (756e12, 2e12)
    assert hbm_bandwidth("NVIDIA H100 80GB HBM3") == 3.35e12
    assert hbm_bandwidth("NVIDIA H200") == 4.8e12
    assert hbm_bandwidth("NVIDIA A100-SXM4-40GB") == 1.555e12
    assert hbm_bandwidth("NVIDIA A100-SXM4-80GB") == 2.039e12
    assert hbm_bandwidth("cpu") is None and hbm_bandwidth("TPU v5 lite") is None
