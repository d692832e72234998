"""Streamed text of ``basque-jax serve`` without a server: incremental decoding equals the
``tokenizers`` decoder on the whole sequence (multi-byte characters split across byte-level
tokens, SentencePiece-style leading spaces), stop strings cut the text before their first
occurrence and are never delivered, and the names models get."""

from __future__ import annotations

import pytest
import tokenizers
from tokenizers import decoders, models, normalizers, pre_tokenizers, trainers

from basque_jax.data.embedded import embedded_texts
from basque_jax.data.tokenizer import load_tokenizer
from basque_jax.serve.models import default_name, model_names
from basque_jax.serve.text import TextStream

TEXT = ("Kaixo! Zer moduz? Ñandú, 😀🙂 eta 100 €-ko ogia. Gaur eguraldi ederra dago "
        "Donostian; bihar, agian, euria. Ikusi arte!")


@pytest.fixture(scope="module")
def byte_level():
    return load_tokenizer("demo")  # byte-level BPE: emoji and € split into byte tokens


@pytest.fixture(scope="module")
def metaspace():
    """A SentencePiece-style BPE (▁ for spaces, byte fallback) trained on the sample."""
    tok = tokenizers.Tokenizer(models.BPE(byte_fallback=True, unk_token="<unk>"))
    tok.normalizer = normalizers.Replace(" ", "▁")
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(),
                                     decoders.Fuse(), decoders.Strip(" ", 1, 0)])
    bytes_ = [f"<0x{i:02X}>" for i in range(256)]
    tok.train_from_iterator(embedded_texts(), trainers.BpeTrainer(
        vocab_size=600, special_tokens=["<unk>", *bytes_], show_progress=False))
    return tok


def encode(tokenizer, text: str) -> list[int]:
    ids = tokenizer.encode(text)
    return ids if isinstance(ids, list) else ids.ids


def stream(tokenizer, ids: list[int], step: int, stops=()) -> tuple[list[str], TextStream]:
    ts = TextStream(tokenizer, stops)
    deltas = [ts.update(ids[:end]) for end in range(step, len(ids), step)]
    deltas.append(ts.update(ids, final=True))
    return [d for d in deltas if d], ts


@pytest.mark.parametrize("step", [1, 2, 5])
@pytest.mark.parametrize("which", ["byte_level", "metaspace"])
def test_deltas_add_up_to_the_decoded_text(request, which, step):
    tokenizer = request.getfixturevalue(which)
    ids = encode(tokenizer, TEXT)
    whole = tokenizer.decode(ids, skip_special_tokens=True)
    deltas, ts = stream(tokenizer, ids, step)
    assert "".join(deltas) == whole == ts.text
    assert len(deltas) > 5 and not any("\ufffd" in d for d in deltas)  # no split character
    if which == "metaspace" and step == 1:  # decoding each piece alone would lose spaces
        naive = "".join(tokenizer.decode([i]) for i in ids)
        assert naive != whole


@pytest.mark.parametrize("step", [1, 3])
@pytest.mark.parametrize("stops", [["?"], ["Gaur eguraldi"], ["€-ko", "nowhere"],
                                   ["nowhere", "an, eu"], ["😀"]])
def test_stop_strings_cut_before_the_first_match(byte_level, step, stops):
    ids = encode(byte_level, TEXT)
    deltas, ts = stream(byte_level, ids, step, stops)
    cut = min(TEXT.find(s) for s in stops if s in TEXT)
    assert "".join(deltas) == TEXT[:cut] and ts.stopped
    assert not any(s in d for s in stops for d in deltas)


def test_a_possible_stop_string_is_held_back_until_decided(byte_level):
    ids = encode(byte_level, TEXT)
    ts = TextStream(byte_level, ["Kaixo! Zer moduz? Ñandú, XYZ"])
    end = next(k for k in range(1, len(ids))
               if byte_level.decode(ids[:k]).endswith("Ñandú,"))
    assert ts.update(ids[:end]) == ""  # still the beginning of the stop string
    rest = ts.update(ids, final=True)
    assert rest == TEXT and not ts.stopped  # it was not one after all
    with pytest.raises(ValueError):
        TextStream(byte_level, [""])


def test_model_names(tmp_path):
    run = tmp_path / "my_run"
    (run / "checkpoints" / "12").mkdir(parents=True)
    assert default_name(str(run), 12) == "my_run-step12"
    assert default_name(str(run / "checkpoints" / "12"), 12) == "my_run-step12"
    assert default_name(str(tmp_path), None) == tmp_path.name
    assert default_name("smollm2-135m-instruct", None) == "smollm2-135m-instruct"
    assert model_names(["a", "b"], ["x"]) == ["x", None]
    from basque_jax.errors import UserError

    with pytest.raises(UserError, match="--name"):
        model_names(["a"], ["x", "y"])


def test_serve_command_line(tmp_path, capsys):
    """``basque-jax serve`` is a sub-command of the CLI whose parsing imports no jax; bad input
    is one line and exit 2 before anything is loaded."""
    import subprocess
    import sys

    from basque_jax.cli import main

    script = ("import sys; from basque_jax.cli import build_parser; a = build_parser()"
              ".parse_args(['serve', 'm1', 'm2', '--name', 'x', '--port', '9001']); "
              "print(a.models, a.name, a.port, sorted({'jax', 'flax', 'torch'} & "
              "set(sys.modules)))")
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=120)
    not_a_dir = tmp_path / "file"
    not_a_dir.write_text("")
    assert proc.stdout.strip() == "['m1', 'm2'] ['x'] 9001 []", proc.stderr
    for argv, message in [([str(tmp_path / "nowhere")], "does not exist"),
                          (["m", "--port", "0"], "--port"),
                          (["m", "--name", "a", "--name", "b"], "--name"),
                          (["m", "--compile-cache", str(not_a_dir / "xla")], "compilation cache")]:
        assert main(["serve", *argv]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("basque-jax serve: ") and message in err and "\n" not in err
