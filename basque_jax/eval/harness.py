"""lm-evaluation-harness model ``basque_jax``: a basque_jax model behind lm-eval's ``LM`` API.

Requests are tokenized exactly as lm-eval's ``hf`` backend (HFLM) tokenizes them -- the same
transformers tokenizer (:mod:`basque_jax.eval.hf_tokenizer`), HFLM's ``tok_encode`` and batch
encoding rules, lm-eval's own ``_encode_pair`` / ``loglikelihood`` (inherited from
``TemplateLM``) and rolling windows -- and scored or generated with JAX:

* ``loglikelihood`` / ``loglikelihood_rolling``: :func:`basque_jax.eval.scoring.score_requests`
  (length-bucketed batches sharded over the mesh, float32 log-softmax over the whole vocabulary,
  HFLM's left truncation to ``max_length + 1`` tokens); every rolling window of every document
  shares the same batches; one jitted scorer serves every call.
* ``generate_until``: the continuous-batching sampler (:mod:`basque_jax.eval.generation`).

``BasqueJaxLM(pretrained=PATH_OR_NAME, dtype=..., step=..., batch_size=..., max_length=...,
add_bos_token=...)`` loads through :func:`basque_jax.runs.load_model` (HF folder, named model,
training run dir or checkpoint step with LoRA unmerged, YAML run config);
``BasqueJaxLM(pretrained=EvalModel(...))`` wraps weights already placed (evaluation during
training: :mod:`basque_jax.eval.live`). Importing this module registers ``basque_jax`` with
lm-eval (``lm_eval --model basque_jax`` works once it is imported).

Multi-host (SPMD): every JAX process reports ``rank 0 / world_size 1`` and runs the same
requests through the globally sharded model; only process 0 should write files.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jax
import jinja2
import lm_eval.models  # noqa: F401  -- register "hf" & co. before us (see get_model)
import numpy as np
from flax import nnx
from jax.sharding import Mesh
from lm_eval import utils as lm_utils
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.models.utils import has_bos_prefix, resolve_max_length

from basque_jax.errors import UserError
from basque_jax.eval.hf_tokenizer import GenerationDefaults, export_tokenizer, folder_tokenizer
from basque_jax.eval.scoring import make_scorer, score_requests
from basque_jax.sharding import MeshConfig

DEFAULT_BATCH_SIZE = 16
DEFAULT_MAX_GEN_TOKS = 256  # HFLM's


@dataclass
class EvalModel:
    """A placed model as ``basque_jax`` runs it: ``nnx.merge(graphdef, *states)`` is the model
    (e.g. a training run's trainable and frozen states), a transformers tokenizer with the ids
    the ``hf`` backend would use, and the generation config's stop ids and sampling defaults.

    It also holds what is compiled for it (the scorer, samplers per cache shape), shared by
    every :class:`BasqueJaxLM` on it and kept across :meth:`set_states`.
    """

    graphdef: nnx.GraphDef
    states: tuple[Any, ...]
    mesh: Mesh
    rules: dict[str, Any]
    tokenizer: Any
    generation: GenerationDefaults
    name: str
    step: int | None = None
    version: int = 0  # bumped by set_states
    compiled: dict[Any, Any] = field(default_factory=dict)

    def merged(self) -> nnx.Module:
        return nnx.merge(self.graphdef, *self.states)

    def set_states(self, *states: Any) -> None:
        """These weights from now on (same structure: nothing recompiles)."""
        self.states = tuple(states)
        self.version += 1

    def scorer(self):
        """The jitted scorers (:func:`make_scorer`) of this model's structure."""
        if "scorer" not in self.compiled:
            self.compiled["scorer"] = make_scorer(nnx.split(self.merged())[0])
        return self.compiled["scorer"]


def load_eval_model(pretrained: str | Path, *, dtype: str | None = None, step: int | None = None,
                    overrides: Sequence[str] = (), add_bos_token: bool | None = None,
                    tokenizer: str | None = None, mesh: MeshConfig | None = None,
                    devices: Sequence[Any] | None = None) -> EvalModel:
    """Load ``pretrained`` (see :func:`basque_jax.runs.load_model`; ``mesh`` / ``devices``: its
    placement, default FSDP over all devices or a run config's own mesh) with the tokenizer
    its ``hf`` evaluation would use: an HF folder's own (or ``tokenizer``), a training run's
    export's."""
    from basque_jax.export.files import run_files
    from basque_jax.model.gguf import model_path
    from basque_jax.runs import load_model

    if dtype == "auto":
        dtype = None
    loaded = load_model(pretrained, step=step, dtype=dtype, overrides=list(overrides),
                        mesh=mesh, devices=None if devices is None else list(devices))
    if loaded.run is None:
        tok, generation = folder_tokenizer(model_path(pretrained), add_bos_token, tokenizer)
    else:
        files = run_files(loaded.run, loaded.model.config)
        tok, generation = export_tokenizer(files, add_bos_token, name=loaded.name,
                                           tokenizer=tokenizer)
    if len(tok) > loaded.model.config.vocab_size:
        raise UserError(f"tokenizer of {loaded.name} has {len(tok)} tokens, more than the "
                        f"model's vocab_size {loaded.model.config.vocab_size}")
    graphdef, state = nnx.split(loaded.model)
    return EvalModel(graphdef, (state,), loaded.mesh, loaded.rules, tok, generation,
                     loaded.name, loaded.step)


def _batch_size(value: int | str | None) -> int:
    """lm-eval passes ``"8"`` or ``"auto"`` from its command line."""
    if value is None or (isinstance(value, str) and value.startswith("auto")):
        return DEFAULT_BATCH_SIZE
    if isinstance(value, str) and not value.isdigit():
        raise UserError(f"batch_size: expected a positive integer or auto, got {value!r}")
    if int(value) < 1:
        raise UserError(f"batch_size: must be >= 1, got {value}")
    return int(value)


def _special_kwargs(add_special_tokens: bool | None, add_bos: bool | None) -> dict[str, bool]:
    """HFLM's rule: an explicit ``add_special_tokens`` wins, then ``add_bos_token``, else the
    tokenizer's default."""
    if add_special_tokens is not None:
        return {"add_special_tokens": add_special_tokens}
    return {} if add_bos is None else {"add_special_tokens": add_bos}


@register_model("basque_jax")
class BasqueJaxLM(TemplateLM):
    """lm-eval ``LM`` for a basque_jax model (see the module docstring).

    pretrained: a path / model name for :func:`load_eval_model`, or an :class:`EvalModel`.
    dtype, step, overrides, add_bos_token, tokenizer, mesh (a MeshConfig or its dict),
    devices (default: all): loading options (paths only).
    batch_size: rows per scored batch and sampler slots. max_length: longest scored row and
    generation budget (default: the model's ``max_position_embeddings``, as HFLM).
    max_gen_toks: the default generation budget (256, as HFLM). prefix_token_id: the token
    before an empty context (default BOS, else EOS). chat_template_args: extra
    ``apply_chat_template`` arguments. seed: sampled generation (request ``i`` uses
    ``seed + i``). chunk_steps: decode steps between stop-string checks. ``max_batch_size`` and
    ``device`` are accepted for lm-eval's sake and unused (JAX places the model on its mesh).
    """

    def __init__(self, pretrained: str | Path | EvalModel | None = None, *,
                 dtype: str | None = None, step: int | None = None,
                 overrides: Sequence[str] = (), add_bos_token: bool | None = None,
                 tokenizer: str | None = None, mesh: MeshConfig | dict | None = None,
                 devices: Sequence[Any] | None = None, batch_size: int | str | None = None,
                 max_length: int | None = None, max_gen_toks: int = DEFAULT_MAX_GEN_TOKS,
                 prefix_token_id: int | None = None, chat_template_args: dict | None = None,
                 seed: int = 1234, chunk_steps: int = 16, max_batch_size: int | None = None,
                 device: str | None = None, **unknown: Any):
        super().__init__()
        if unknown:
            raise UserError(f"basque_jax: unknown model arguments {', '.join(sorted(unknown))}")
        if pretrained is None:
            raise UserError("basque_jax: give pretrained=MODEL (HF folder, run dir, checkpoint "
                            "step, YAML run config or model name)")
        if isinstance(pretrained, EvalModel):
            given = {"dtype": dtype, "step": step, "add_bos_token": add_bos_token,
                     "tokenizer": tokenizer, "overrides": list(overrides) or None, "mesh": mesh,
                     "devices": devices}
            if any(v is not None for v in given.values()):
                raise UserError("basque_jax: loading options apply to a model path only")
            self.model = pretrained
        else:
            if isinstance(mesh, dict):
                from basque_jax.yaml_config import build

                mesh = build(MeshConfig, mesh, "mesh")
            self.model = load_eval_model(pretrained, dtype=dtype, step=step, overrides=overrides,
                                         add_bos_token=add_bos_token, tokenizer=tokenizer,
                                         mesh=mesh, devices=devices)
        self.model_config = self.model.merged().config
        self.tokenizer = self.model.tokenizer
        self.generation = self.model.generation
        self.add_bos_token = add_bos_token
        self.custom_prefix_token_id = prefix_token_id
        self.chat_template_args = chat_template_args or {}
        self._batch_size = _batch_size(batch_size)
        self._max_length = max_length
        self._max_gen_toks = int(max_gen_toks)
        self.seed = int(seed)
        self.chunk_steps = int(chunk_steps)
        del max_batch_size, device

    def set_states(self, *states: Any) -> None:
        """Evaluate these weights from now on (same structure; nothing recompiles)."""
        self.model.set_states(*states)

    # ------------------------------------------------------------------ lm-eval properties
    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_token_id

    @property
    def prefix_token_id(self) -> int:
        if self.custom_prefix_token_id is not None:
            return self.custom_prefix_token_id
        if self.tokenizer.bos_token_id is not None:
            return self.tokenizer.bos_token_id
        return self.tokenizer.eos_token_id

    @property
    def max_length(self) -> int:
        if self._max_length:
            return int(self._max_length)
        return resolve_max_length(self.model_config, self.tokenizer)

    @property
    def max_gen_toks(self) -> int:
        return self._max_gen_toks

    @property
    def batch_size(self) -> int:
        return self._batch_size

    def rows_for(self, n: int) -> int:
        """Batch rows for ``n`` requests: ``batch_size``, or the power of two >= ``n`` when
        fewer (a handful of requests is not padded to a full batch; few extra shapes)."""
        return min(self.batch_size, 1 << max(n - 1, 0).bit_length())

    @property
    def device(self) -> None:
        return None

    @property
    def tokenizer_name(self) -> str:
        return self.tokenizer.name_or_path.replace("/", "__")

    def get_model_info(self) -> dict[str, Any]:
        """Added to lm-eval's ``results["config"]``."""
        leaves = jax.tree.leaves(self.model.states)
        dtypes = sorted({str(x.dtype) for x in leaves})
        return {"model_num_parameters": int(sum(np.prod(x.shape) for x in leaves)),
                "model_dtype": ",".join(dtypes), "model_name": self.model.name,
                "model_step": self.model.step, "backend": "basque_jax"}

    # ------------------------------------------------------------------ tokenization (HFLM's)
    def tok_encode(self, string: str, add_special_tokens: bool | None = None,
                   left_truncate_len: int | None = None, **kwargs: Any) -> list[int]:
        special = _special_kwargs(add_special_tokens, self.add_bos_token)
        if add_special_tokens is None and has_bos_prefix(
                string, self.tokenizer.decode(self.prefix_token_id)):
            special["add_special_tokens"] = False
        encoding = self.tokenizer.encode(string, **special)
        if left_truncate_len:
            encoding = encoding[-left_truncate_len:]
        return encoding

    def generation_prompt(self, context: str, left_truncate_len: int | None = None) -> list[int]:
        """HFLM's ``tok_batch_encode`` of one context (its BOS rule looks at the string's start
        against ``tokenizer.bos_token``), left-truncated."""
        if has_bos_prefix(context, getattr(self.tokenizer, "bos_token", None)):
            special = {"add_special_tokens": False}
        else:
            special = _special_kwargs(None, self.add_bos_token)
        ids = list(self.tokenizer([context], truncation=False, padding="longest",
                                  **special)["input_ids"][0])
        return ids[-left_truncate_len:] if left_truncate_len else ids

    def tok_decode(self, tokens: int | Sequence[int], skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode(tokens, skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, chat_history: list[dict[str, str]],
                            add_generation_prompt: bool = True) -> str:
        """HFLM's: the tokenizer's template as text; system messages dropped if it rejects them."""
        kwargs = dict(tokenize=False, add_generation_prompt=add_generation_prompt,
                      continue_final_message=not add_generation_prompt, **self.chat_template_args)
        try:
            return self.tokenizer.apply_chat_template(chat_history, **kwargs)
        except jinja2.exceptions.TemplateError:
            lm_utils.eval_logger.warning(
                "Failed to apply chat template. removing the system role in chat history.")
            chat_history = [m for m in chat_history if m["role"] != "system"]
            return self.tokenizer.apply_chat_template(chat_history, **kwargs)

    # ------------------------------------------------------------------ requests
    def _loglikelihood_tokens(self, requests: Sequence[tuple[Any, list[int], list[int]]],
                              disable_tqdm: bool = False, override_bs: int | None = None,
                              **kwargs: Any) -> list[tuple[float, bool]]:
        pairs = []
        for _, context, continuation in requests:
            if len(continuation) > self.max_length:
                raise UserError(f"a continuation of {len(continuation)} tokens is longer than "
                                f"max_length {self.max_length}")
            pairs.append((context, continuation))
        m = self.model
        scores = score_requests(m.merged(), pairs, batch_size=self.rows_for(len(pairs)),
                                max_length=self.max_length, mesh=m.mesh, rules=m.rules,
                                scorer=m.scorer())
        for (key, _, _), answer in zip(requests, scores, strict=True):
            if key is not None:  # rolling windows are cached per document instead
                self.cache_hook.add_partial("loglikelihood", key, answer)
        return scores

    def loglikelihood_rolling(self, requests: Sequence[Any], disable_tqdm: bool = False
                              ) -> list[float]:
        """HFLM's windows (disjoint, ``max_length`` tokens, the prefix token first); every
        window of every document scored in shared batches, summed per document."""
        windows: list[tuple[None, list[int], list[int]]] = []
        counts = []
        for (string,) in [r.args for r in requests]:
            doc = list(map(lm_utils.make_disjoint_window, lm_utils.get_rolling_token_windows(
                token_list=self.tok_encode(string), prefix_token=self.prefix_token_id,
                max_seq_len=self.max_length, context_len=1)))
            windows += [(None, *w) for w in doc]
            counts.append(len(doc))
        scores = iter(self._loglikelihood_tokens(windows))
        totals = []
        for req, n in zip(requests, counts, strict=True):
            total = sum(next(scores)[0] for _ in range(n))
            totals.append(total)
            self.cache_hook.add_partial("loglikelihood_rolling", (req.args[0],), total)
        return totals

    def generate_until(self, requests: Sequence[Any], disable_tqdm: bool = False) -> list[str]:
        from basque_jax.eval.generation import generate_until

        return generate_until(self, [r.args for r in requests])
