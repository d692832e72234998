"""The transformers tokenizer and generation settings lm-eval's ``hf`` backend would use.

``basque_jax`` scores and generates with exactly the token ids of ``--model hf`` on the same
model folder, so it tokenizes with the same object: ``AutoTokenizer.from_pretrained(folder,
[add_bos_token=...])`` and lm-eval's pad-token rule. A training run (run dir, checkpoint step, YAML
config) has no folder yet: its tokenizer is the one its export would carry
(:class:`basque_jax.export.files.ModelFiles`, written to a temporary folder and loaded from
there), including the chat template the run trained with.

Generation stops where transformers' ``generate`` stops: the ``eos_token_id`` of the folder's
``generation_config.json``, else of its ``config.json``, else the tokenizer's eos. The sampling
defaults (``top_k``, ``top_p``, ``min_p``) come from the same generation config.
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from basque_jax.errors import UserError
from basque_jax.export.files import ModelFiles

HF_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")
# transformers' own defaults for keys a generation config leaves unset
# (GenerationConfig._get_default_generation_params in transformers 5).
HF_SAMPLING_DEFAULTS = {"top_k": 50, "top_p": 1.0, "min_p": None}


@dataclass(frozen=True)
class GenerationDefaults:
    """What ``generate`` would stop on and sample with when a request does not say."""

    stop_ids: tuple[int, ...]
    top_k: int | None = HF_SAMPLING_DEFAULTS["top_k"]
    top_p: float | None = HF_SAMPLING_DEFAULTS["top_p"]
    min_p: float | None = HF_SAMPLING_DEFAULTS["min_p"]

    @classmethod
    def from_config(cls, d: dict[str, Any], fallback_eos: int | None) -> GenerationDefaults:
        """From a ``generation_config.json`` (or ``config.json``) dict."""
        eos = d.get("eos_token_id")
        if eos is None:
            eos = fallback_eos
        ids = () if eos is None else tuple(eos) if isinstance(eos, list) else (int(eos),)
        picked = {k: d[k] if d.get(k) is not None else v for k, v in HF_SAMPLING_DEFAULTS.items()}
        return cls(tuple(int(i) for i in ids), **picked)


def _tokenizer_kwargs(add_bos_token: bool | None) -> dict[str, Any]:
    return {} if add_bos_token is None else {"add_bos_token": add_bos_token}


def load_hf_tokenizer(folder: str | Path, add_bos_token: bool | None = None) -> Any:
    """``AutoTokenizer`` of ``folder`` as HFLM loads it (fast, ``add_bos_token`` passed only when
    given), with lm-eval's pad token; UserError when the folder has no tokenizer."""
    from lm_eval.models.utils import configure_pad_token
    from transformers import AutoTokenizer

    folder = Path(folder)
    if not any((folder / f).is_file() for f in HF_TOKENIZER_FILES):
        raise UserError(f"{folder}: no tokenizer (tokenizer.json / tokenizer_config.json); add "
                        "the tokenizer files to the model folder or pass tokenizer=PATH")
    tok = AutoTokenizer.from_pretrained(str(folder), use_fast=True,
                                        **_tokenizer_kwargs(add_bos_token))
    return configure_pad_token(tok)


def _read_json(path: Path) -> dict[str, Any]:
    try:
        d = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise UserError(f"{path}: cannot read ({e})") from None
    if not isinstance(d, dict):
        raise UserError(f"{path}: expected a JSON object")
    return d


def folder_generation(folder: Path, tokenizer: Any) -> GenerationDefaults:
    """The generation settings transformers reads from the HF folder ``folder``."""
    path = folder / "generation_config.json"
    d = _read_json(path if path.is_file() else folder / "config.json")
    return GenerationDefaults.from_config(d, tokenizer.eos_token_id)


def folder_tokenizer(folder: str | Path, add_bos_token: bool | None = None,
                     tokenizer: str | Path | None = None) -> tuple[Any, GenerationDefaults]:
    """Tokenizer (``tokenizer`` if given, else the folder's) and generation settings of an HF
    model folder."""
    tok = load_hf_tokenizer(tokenizer or folder, add_bos_token)
    return tok, folder_generation(Path(folder), tok)


def export_tokenizer(files: ModelFiles, add_bos_token: bool | None = None, *,
                     name: str = "", tokenizer: str | Path | None = None
                     ) -> tuple[Any, GenerationDefaults]:
    """Tokenizer (``tokenizer`` if given) and generation settings of the export ``files``
    describe (a training run's): its files are written to a temporary folder and loaded as HFLM
    would load the export."""
    with tempfile.TemporaryDirectory(prefix="basque_jax_tok_") as tmp:
        folder = Path(tmp)
        files.write(folder)
        if tokenizer is None and not any((folder / f).is_file() for f in HF_TOKENIZER_FILES):
            raise UserError(f"{name or 'the run'}: no tokenizer to evaluate with (data.tokenizer "
                            "unset and no backbone tokenizer); set data.tokenizer")
        tok = load_hf_tokenizer(tokenizer or folder, add_bos_token)
        generation = folder_generation(folder, tok)
    if tokenizer is None:
        tok.name_or_path = name or tok.name_or_path
    return tok, generation
