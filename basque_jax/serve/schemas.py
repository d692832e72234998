"""The OpenAI request bodies ``basque-jax serve`` accepts, and its error bodies.

Requests are validated strictly, as OpenAI does: a wrong type, an out-of-range value or an
unknown argument is HTTP 400 with OpenAI's error body ``{"error": {"message", "type", "param",
"code"}}`` (:class:`APIError`). Recognised parameters the sampler cannot honour
(``presence_penalty`` != 0, ``logprobs``, tools, ...) are refused the same way rather than
silently ignored. Beyond OpenAI's parameters, vLLM's ``top_k``, ``min_p`` and ``ignore_eos``
are accepted (``extra_body`` in the openai client).
"""

from __future__ import annotations

import json
import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError


class APIError(Exception):
    """An OpenAI-style error response: HTTP ``status`` and the ``error`` object's fields."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type = status, message, type
        self.param, self.code = param, code

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param,
                          "code": self.code}}


STRICT = ConfigDict(strict=True, extra="forbid")


class TextPart(BaseModel):
    model_config = STRICT
    type: Literal["text"]
    text: str


class Message(BaseModel):
    """A chat message; ``developer`` is OpenAI's newer name for ``system``."""

    model_config = STRICT
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]
    name: str | None = None

    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class StreamOptions(BaseModel):
    model_config = STRICT
    include_usage: bool = False
    continuous_usage_stats: bool = False  # vLLM's; accepted, usage comes at the end only


class ResponseFormat(BaseModel):
    model_config = STRICT
    type: Literal["text"]


class SamplingFields(BaseModel):
    """What both endpoints share (OpenAI's defaults: temperature 1, top_p 1, n 1)."""

    model_config = STRICT
    model: str
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=-1)  # vLLM: -1 or 0 mean off
    min_p: float | None = Field(None, ge=0, lt=1)
    n: int | None = Field(None, ge=1, le=128)
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    ignore_eos: bool = False
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    user: str | None = None

    def stop_strings(self) -> tuple[str, ...]:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if any(not s for s in stops):
            raise APIError(400, "Invalid value for 'stop': stop strings must not be empty.",
                           param="stop", code="invalid_value")
        return tuple(stops)

    def unsupported(self) -> list[tuple[str, str]]:
        """(param, what this server supports) for every parameter it cannot honour."""
        out = []
        for key in ("presence_penalty", "frequency_penalty"):
            if getattr(self, key):
                out.append((key, "only 0"))
        if self.logit_bias:
            out.append(("logit_bias", "none"))
        return out


class ChatCompletionRequest(SamplingFields):
    messages: list[Message] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool | None = None
    top_logprobs: int | None = None
    response_format: ResponseFormat | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    metadata: dict[str, str] | None = None
    store: bool | None = None
    service_tier: str | None = None

    @property
    def token_limit(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None \
            else self.max_tokens

    def unsupported(self) -> list[tuple[str, str]]:
        out = super().unsupported()
        if self.logprobs or self.top_logprobs:
            out.append(("logprobs", "none"))
        if self.tools or self.tool_choice not in (None, "none"):
            out.append(("tools", "none (no tool calling)"))
        return out


class CompletionRequest(SamplingFields):
    """``prompt``: a string, a list of strings, a list of token ids or a list of those.
    ``max_tokens`` defaults to 16 as in OpenAI's API (null: the rest of the context)."""

    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = Field(16, ge=1)
    echo: bool | None = False
    logprobs: int | None = None
    suffix: str | None = None
    best_of: int | None = None

    def prompts(self) -> list[str | list[int]]:
        p = self.prompt
        prompts = [p] if isinstance(p, str) or (p and isinstance(p[0], int)) else list(p)
        if not prompts or any(len(x) == 0 for x in prompts):
            raise APIError(400, "Invalid value for 'prompt': prompts must not be empty.",
                           param="prompt", code="invalid_value")
        return prompts

    def unsupported(self) -> list[tuple[str, str]]:
        out = super().unsupported()
        if self.logprobs:
            out.append(("logprobs", "none"))
        if self.suffix:
            out.append(("suffix", "none"))
        if self.best_of not in (None, self.n or 1):
            out.append(("best_of", "equal to n"))
        return out


_TYPE_TAG = re.compile(r"^(str|int|float|bool|none|dict|list\[.*\]|[A-Z]\w*|.*\[.*\])$")


def _param(loc: tuple[Any, ...]) -> str:
    """Pydantic's error location as OpenAI writes it: ``messages[0].role`` (union member
    tags such as ``list[str]`` dropped)."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif not _TYPE_TAG.match(part):
            out += f".{part}" if out else part
    return out


def parse_body(raw: bytes, schema: type[SamplingFields]) -> SamplingFields:
    """The validated request, or :class:`APIError` 400 naming the first bad parameter."""
    try:
        data = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise APIError(400, f"We could not parse the JSON body of your request ({e}). The "
                       "OpenAI API expects a JSON payload.", code="invalid_json") from None
    if not isinstance(data, dict):
        raise APIError(400, "The request body must be a JSON object.", code="invalid_json")
    try:
        request = schema.model_validate(data)
    except ValidationError as e:
        error = e.errors()[0]
        param = _param(error["loc"])
        if error["type"] == "missing":
            raise APIError(400, f"Missing required parameter: '{param}'.", param=param,
                           code="missing_required_parameter") from None
        if error["type"] == "extra_forbidden":
            raise APIError(400, f"Unrecognized request argument supplied: {param}",
                           param=param, code="unknown_parameter") from None
        raise APIError(400, f"Invalid value for '{param}': {error['msg']}.", param=param,
                       code="invalid_value") from None
    for param, supported in request.unsupported():
        raise APIError(400, f"'{param}' is not supported by this server (supported: "
                       f"{supported}).", param=param, code="unsupported_parameter")
    return request
