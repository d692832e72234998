"""Filters: Basque language id on real Basque text, near/exact dedup, repetition, length,
translation tasks, the count report and ``basque-jax filter``."""

from __future__ import annotations

import json

import pytest
from conftest import SHARED_DATA

from basque_jax.cli import main
from basque_jax.data.config import ConfigError
from basque_jax.sample.filters import (
    FilterConfig,
    Filters,
    normalise,
    repeated_ngram_fraction,
)

BHTC = SHARED_DATA / "eu" / "bhtc_news_test.jsonl"
QNLI = SHARED_DATA / "eu" / "qnli_test.jsonl"

# Hand-written English and Spanish passages (news-like, Basque-Country topics, so shared
# names and places do not give the language away).
ENGLISH = [
    "The city council of Bilbao approved the new budget on Tuesday after a long debate about "
    "public transport and housing prices in the old town.",
    "Researchers at the University of the Basque Country have published a study on how "
    "coastal erosion is changing the beaches near San Sebastian.",
    "The football club announced that the stadium will be closed for two weeks while workers "
    "replace the damaged roof before the new season starts.",
]
SPANISH = [
    "El ayuntamiento de Bilbao aprobó el martes el nuevo presupuesto tras un largo debate "
    "sobre el transporte público y el precio de la vivienda en el casco viejo.",
    "Investigadores de la Universidad del País Vasco han publicado un estudio sobre cómo la "
    "erosión costera está cambiando las playas cercanas a San Sebastián.",
    "El club de fútbol anunció que el estadio permanecerá cerrado durante dos semanas "
    "mientras los operarios sustituyen la cubierta dañada antes de que empiece la temporada.",
]


def _conv(user: str, assistant: str = "Ados, hori egingo dut zuretzat gaur bertan.",
          **extra) -> dict:
    return {"conversations": [{"role": "user", "content": user},
                              {"role": "assistant", "content": assistant}], **extra}


def _basque_texts(n: int) -> list[str]:
    texts = [json.loads(line)["text"] for line in BHTC.read_text().splitlines()[:n]]
    return [t for t in texts if len(t) >= 40]


@pytest.fixture(scope="module")
def language_filter() -> Filters:
    return Filters(FilterConfig(exact_dedup=False, near_dedup=False,
                                drop_translation_tasks=False))


@pytest.mark.skipif(not BHTC.exists(), reason=f"{BHTC} not present")
def test_basque_passes_english_and_spanish_do_not(language_filter):
    basque = _basque_texts(60)
    assert len(basque) >= 50
    assert all(language_filter.is_language(t) for t in basque)
    qnli = [json.loads(line) for line in QNLI.read_text().splitlines()[:30]]
    sentences = [r.get("sentence") or r.get("text") for r in qnli]
    sentences = [s for s in sentences if s and len(s) >= 40]
    assert sum(language_filter.is_language(s) for s in sentences) >= 0.95 * len(sentences)
    assert not any(language_filter.is_language(t) for t in ENGLISH + SPANISH)
    keep = [language_filter.keep(_conv(t, b)) for t, b in zip(basque[:3], basque[3:6],
                                                                strict=True)]
    drop = [language_filter.keep(_conv(basque[0], t)) for t in ENGLISH + SPANISH]
    assert keep == [True] * 3 and drop == [False] * 6
    assert language_filter.report()["removed"]["language"] == 6


@pytest.mark.skipif(not BHTC.exists(), reason=f"{BHTC} not present")
def test_near_and_exact_duplicates_removed_and_counted():
    texts = _basque_texts(40)[:12]
    near = texts[0].split()
    near[3], near[-2] = "gaur", "berriz"  # two words changed in a long paragraph
    exact = "  " + texts[1].upper().replace(",", " ,") + "!"
    records = [_conv(t) for t in texts] + [_conv(" ".join(near)), _conv(exact)]
    chain = Filters(FilterConfig(language=None))
    kept = list(chain(records))
    assert len(kept) == len(texts)
    report = chain.report()
    assert report == {"input": len(texts) + 2, "kept": len(texts), "removed": {
        "status": 0, "length": 0, "repetition": 0, "translation_task": 0, "language": 0,
        "exact_duplicate": 1, "near_duplicate": 1}}


def test_length_repetition_status_and_translation_tasks():
    cfg = FilterConfig(language=None, min_chars=5, max_chars=400, near_dedup=False)
    chain = Filters(cfg)
    loop = " ".join(["eta gero etxera joan nintzen"] * 12)
    cases = [
        (_conv("Zer da euskara?"), True),
        (_conv("Bai"), False),  # too short
        (_conv("Idatzi poema bat", "x" * 401), False),  # too long
        (_conv("Kontatu istorio bat", loop), False),  # degenerate repetition
        (_conv("Translate this sentence into Basque: the sea is calm."), False),
        (_conv("Itzuli esaldi hau ingelesera: itsasoa lasai dago."), False),
        (_conv("Traduce al euskera: el mar está en calma."), False),
        (_conv("Atzo berandu itzuli nintzen etxera; zer egin dezaket nekea kentzeko?"), True),
        (_conv("Zein da Euskal Herriko mendirik altuena?", status="response_truncated"),
         False),
    ]
    assert [chain.keep(r) for r, _ in cases] == [want for _, want in cases]
    assert chain.report()["removed"] == {"status": 1, "length": 2, "repetition": 1,
                                         "translation_task": 3, "language": 0,
                                         "exact_duplicate": 0, "near_duplicate": 0}
    assert repeated_ngram_fraction(loop, 3) > 0.8
    assert repeated_ngram_fraction("bat bi hiru lau bost", 3) == 0.0
    assert normalise("Kaixo,   MUNDUA!!") == "kaixo mundua"


def test_filter_command_writes_output_and_report(tmp_path, capsys):
    src = tmp_path / "in.jsonl"
    rows = [_conv("Zer da fotosintesia?", index=0), _conv("zer da fotosintesia", index=1),
            _conv("Nola egiten da talo bat?", index=2), _conv("ok", index=3)]
    src.write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"index": 4, "conv')
    out = tmp_path / "out" / "kept.jsonl"
    assert main(["filter", str(src), str(out), "language=null", "min_chars=3"]) == 0
    kept = [json.loads(x) for x in out.read_text().splitlines()]
    assert [r["index"] for r in kept] == [0, 2]
    report = json.loads((tmp_path / "out" / "kept.jsonl.report.json").read_text())
    assert (report["input"], report["kept"]) == (4, 2)  # the partial last line is skipped
    assert report["removed"]["exact_duplicate"] == 1 and report["removed"]["length"] == 1
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["kept"] == 2
    assert main(["filter", str(src), str(out), "near_dedup_threshold=2"]) == 2
    assert "near_dedup_threshold: must be in (0, 1]" in capsys.readouterr().err


def test_bad_filter_configs_name_the_key():
    with pytest.raises(ConfigError, match=r"filters\.max_repeated_ngrams: must be in"):
        FilterConfig(max_repeated_ngrams=0)
    with pytest.raises(ConfigError, match=r"filters\.translation_patterns\[0\]"):
        FilterConfig(translation_patterns=["("])
    with pytest.raises(ConfigError, match=r"filters\.bogus: unknown key"):
        FilterConfig.from_dict({"bogus": 1})
