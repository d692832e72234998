"""Every command: a user mistake is one line naming the file and key, exit 2; a bug is not.

Config errors must surface before any weight is loaded; an internal error (a ``KeyError`` deep
in a command) must keep its traceback rather than be reported as a config error.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from basque_jax.cli import main

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "configs" / "demo.yaml"
MAGPIE = REPO / "configs" / "sample" / "magpie_eu.yaml"
TRANSLATE = REPO / "configs" / "sample" / "translate_eu.yaml"


def _bad_yaml(tmp_path: Path, base: Path, body: str) -> Path:
    path = tmp_path / "bad.yaml"
    path.write_text(f"base: {base}\n{body}\n")
    return path


def _one_line_exit_2(capsys, argv: list, *needles: str) -> str:
    assert main([str(a) for a in argv]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0, err
    assert err.startswith(f"basque-jax {argv[0]}: "), err
    for needle in needles:
        assert needle in err, (needle, err)
    return err


CASES = {
    # command: (argv builder, needles, module and function whose failure is "internal")
    "train": (lambda p: ["train", p], "basque_jax.train.loop", "run_training"),
    "plan": (lambda p: ["plan", p, "--topology", "v5e-8"], "basque_jax.plan", "plan_run"),
    "eval": (lambda p: ["eval", p, "--perplexity"], "basque_jax.runs", "load_model"),
}


@pytest.mark.parametrize("command", sorted(CASES))
def test_run_config_commands(command, tmp_path, capsys, monkeypatch):
    argv, module, func = CASES[command]
    bad = _bad_yaml(tmp_path, DEMO, "train: {stepz: 3}")
    _one_line_exit_2(capsys, argv(bad), str(bad), "train.stepz: unknown key")
    bad = _bad_yaml(tmp_path, DEMO, "optim: {lr: -1}")
    _one_line_exit_2(capsys, argv(bad), str(bad), "optim.lr: must be > 0")

    def bug(*args, **kwargs):
        raise KeyError("an internal bug")

    monkeypatch.setattr(f"{module}.{func}", bug)
    with pytest.raises(KeyError, match="an internal bug"):
        main([str(a) for a in argv(DEMO)])


@pytest.mark.parametrize("command,base,module,func", [
    ("generate", MAGPIE, "basque_jax.sample.magpie", "run_generate"),
    ("translate", TRANSLATE, "basque_jax.sample.translate", "run_translate"),
])
def test_sample_commands(command, base, module, func, tmp_path, capsys, monkeypatch):
    bad = _bad_yaml(tmp_path, base, "sampler: {batch_size: 0}")
    _one_line_exit_2(capsys, [command, bad], str(bad), "sampler.batch_size: must be >= 1")
    bad = _bad_yaml(tmp_path, base, "mesh: {dataa: 2}")
    _one_line_exit_2(capsys, [command, bad], str(bad), "mesh.dataa: unknown key")
    _one_line_exit_2(capsys, [command, base, "vars.x=1", "sampler.chunk_steps=zero"], str(base),
                     "sampler.chunk_steps: expected int")

    def bug(*args, **kwargs):
        raise KeyError("an internal bug")

    monkeypatch.setattr(f"{module}.{func}", bug)
    with pytest.raises(KeyError, match="an internal bug"):
        main([command, str(base)])


def test_filter_command(tmp_path, capsys, monkeypatch):
    data = tmp_path / "in.jsonl"
    data.write_text('{"conversations": [{"role": "user", "content": "kaixo"}]}\n')
    cfg = tmp_path / "filters.yaml"
    cfg.write_text("filters: {min_chars: -5, bogus: 1}\n")
    _one_line_exit_2(capsys, ["filter", data, tmp_path / "out.jsonl", "--config", cfg],
                     str(cfg), "filters.bogus: unknown key")
    _one_line_exit_2(capsys, ["filter", data, tmp_path / "out.jsonl", "language=3"],
                     "filters.language")

    def bug(*args, **kwargs):
        raise KeyError("an internal bug")

    monkeypatch.setattr("basque_jax.sample.filters.filter_files", bug)
    with pytest.raises(KeyError, match="an internal bug"):
        main(["filter", str(data), str(tmp_path / "out.jsonl")])


def test_export_and_info_commands(tmp_path, capsys, monkeypatch):
    _one_line_exit_2(capsys, ["export", tmp_path / "nowhere", tmp_path / "out"],
                     str(tmp_path / "nowhere"), "does not exist")
    bad = tmp_path / "model"
    bad.mkdir()
    (bad / "config.json").write_text('{"model_type": "llama", "hidden_size": 64}')
    _one_line_exit_2(capsys, ["info", bad / "config.json"], str(bad / "config.json"),
                     "missing key(s) vocab_size")
    _one_line_exit_2(capsys, ["info", "llama9"], "unknown model preset 'llama9'")

    def bug(*args, **kwargs):
        raise KeyError("an internal bug")

    monkeypatch.setattr("basque_jax.export.exporter.export", bug)
    with pytest.raises(KeyError, match="an internal bug"):
        main(["export", str(tmp_path / "nowhere"), str(tmp_path / "out")])
