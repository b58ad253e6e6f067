"""Request bodies of both APIs: strict JSON, strict types, and 400s that name the field.

Parsing refuses what crashes other servers: NaN and Infinity literals, numbers too large for a
float, lone UTF-16 surrogates, deep nesting, floats where integers belong, empty stop strings,
thousands of stop strings. Every refusal is a :class:`BadRequest` naming the field and what it
accepts, so a client can fix its request in one go.
"""

from __future__ import annotations

import json
import math
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator

from serve.errors import BadRequest

MAX_STOPS = 16
MAX_STOP_CHARS = 200
MAX_N = 16
MAX_ROWS = 64  # prompts x n in one request
MAX_EMBED_INPUTS = 256

PromptInput = str | list[str] | list[int] | list[list[int]]


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"the number {text[:40]} is too large for a float")
    return value


def _check_strings(value: Any, depth: int = 0) -> None:
    """Raise ValueError on strings that are not valid Unicode (lone surrogates from escapes)."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise ValueError("a string holds a lone UTF-16 surrogate (\\ud800-\\udfff)") from None
    elif isinstance(value, dict):
        for k, v in value.items():
            _check_strings(k, depth + 1)
            _check_strings(v, depth + 1)
    elif isinstance(value, list):
        for v in value:
            _check_strings(v, depth + 1)


def parse_json_object(body: bytes) -> dict[str, Any]:
    """The body as a JSON object; BadRequest for anything else (empty, malformed, not UTF-8)."""
    if not body.strip():
        raise BadRequest("the request body is empty; send a JSON object", code="invalid_json")
    try:
        data = json.loads(body, parse_constant=_no_constant, parse_float=_finite_float)
        _check_strings(data)
    except UnicodeDecodeError as e:
        raise BadRequest(f"the request body is not valid UTF-8: {e.reason} at byte {e.start}",
                         code="invalid_json") from None
    except RecursionError:
        raise BadRequest("the request body is nested too deeply", code="invalid_json") from None
    except ValueError as e:
        raise BadRequest(f"the request body is not valid JSON: {e}", code="invalid_json") from None
    if not isinstance(data, dict):
        raise BadRequest(f"the request body must be a JSON object, got a JSON {_json_kind(data)}",
                         code="invalid_json")
    return data


def _json_kind(value: Any) -> str:
    return {dict: "object", list: "array", str: "string", bool: "boolean", type(None): "null"}.get(
        type(value), "number")


def _check_stops(value: list[str]) -> list[str]:
    if len(value) > MAX_STOPS:
        raise ValueError(f"{len(value)} stop sequences; at most {MAX_STOPS} are allowed")
    for i, s in enumerate(value):
        if not s:
            raise ValueError(f"entry {i} is an empty string; stop sequences must not be empty")
        if len(s) > MAX_STOP_CHARS:
            raise ValueError(f"entry {i} is {len(s)} characters; at most {MAX_STOP_CHARS}")
    return value


def _check_prompts(value: Any, what: str, limit: int) -> list[str | list[int]]:
    """A string, a list of strings, a list of token ids or a list of such lists, as a list."""
    if isinstance(value, str):
        return [value]
    if not isinstance(value, list) or not value:
        raise ValueError(f"expected {what}: a string, a non-empty list of strings, a list of "
                         "token ids, or a list of token-id lists")
    if all(type(v) is int for v in value):
        return [list(value)]
    if len(value) > limit:
        raise ValueError(f"{len(value)} entries; at most {limit} in one request")
    out: list[str | list[int]] = []
    for i, v in enumerate(value):
        if isinstance(v, str):
            out.append(v)
        elif isinstance(v, list) and v and all(type(t) is int for t in v):
            out.append(list(v))
        else:
            raise ValueError(f"entry {i} must be a string or a non-empty list of integer token ids")
    return out


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)


class SeedComplete(_Strict):
    """The seed API's completion body. Strict: "40" is not 40 and 40.0 is not an integer."""

    text: str
    top_p: float = Field(0.9, gt=0.0, le=1.0)
    top_k: int = Field(40, ge=0)
    temperature: float = Field(0.7, gt=0.0)
    length: int = Field(64, ge=1)
    stop_sequences: list[str] = Field(default_factory=list)
    repetition_penalty: float = Field(1.0, gt=0.0, le=100.0)
    n: int = Field(1, ge=1, le=MAX_N)

    @field_validator("temperature", mode="before")
    @classmethod
    def _no_zero_temperature(cls, v: Any) -> Any:
        if isinstance(v, (int, float)) and not isinstance(v, bool) and v == 0:
            raise ValueError("0 is not allowed; for greedy output use temperature 0.01 or top_k 1")
        return v

    @field_validator("stop_sequences")
    @classmethod
    def _stops(cls, v: list[str]) -> list[str]:
        return _check_stops(v)


class SeedEmbed(_Strict):
    text: str | list[str]

    @field_validator("text")
    @classmethod
    def _texts(cls, v: str | list[str]) -> str | list[str]:
        if isinstance(v, list) and not 1 <= len(v) <= MAX_EMBED_INPUTS:
            raise ValueError(f"expected 1 to {MAX_EMBED_INPUTS} strings, got {len(v)}")
        return v


# OpenAI fields these models cannot honour: a truthy value is refused with this message.
UNSUPPORTED = {
    "echo": "echo is not supported; the prompt is never repeated in the output",
    "suffix": "suffix is not supported (these models do not insert text)",
    "logit_bias": "logit_bias is not supported; leave it out or send {}",
}


class OpenAICompletion(_Strict):
    """OpenAI's legacy completions body; ``top_k`` and ``repetition_penalty`` are extensions."""

    model: str
    prompt: Any
    max_tokens: int | None = Field(16, ge=1)
    temperature: float | None = Field(1.0, ge=0.0, le=2.0)
    top_p: float | None = Field(1.0, ge=0.0, le=1.0)
    n: int | None = Field(1, ge=1, le=MAX_N)
    stream: bool | None = False
    stream_options: dict[str, bool] | None = None
    logprobs: int | None = Field(None, ge=0, le=5)
    echo: bool | None = False
    stop: str | list[str] | None = None
    presence_penalty: float | None = Field(0.0, ge=-2.0, le=2.0)
    frequency_penalty: float | None = Field(0.0, ge=-2.0, le=2.0)
    best_of: int | None = Field(None, ge=1, le=MAX_N)
    logit_bias: dict[str, float] | None = None
    seed: int | None = Field(None, ge=0, lt=2**63)
    suffix: str | None = None
    user: str | None = None
    top_k: int | None = Field(0, ge=0)
    repetition_penalty: float | None = Field(1.0, gt=0.0, le=100.0)

    @field_validator("prompt", mode="before")
    @classmethod
    def _prompt(cls, v: Any) -> Any:
        return _check_prompts(v, "prompt", MAX_ROWS)

    @field_validator("stop")
    @classmethod
    def _stop(cls, v: str | list[str] | None) -> list[str]:
        return _check_stops([v] if isinstance(v, str) else list(v or []))

    @field_validator(*UNSUPPORTED)
    @classmethod
    def _unsupported(cls, v: Any, info: ValidationInfo) -> Any:
        if v:
            raise ValueError(UNSUPPORTED[info.field_name])
        return v

    @field_validator("stream_options")
    @classmethod
    def _stream_options(cls, v: dict[str, bool] | None) -> dict[str, bool] | None:
        if v and set(v) - {"include_usage", "continuous_usage_stats"}:
            raise ValueError("the only stream option is include_usage")
        return v


class OpenAIEmbedding(_Strict):
    model: str
    input: Any
    encoding_format: Literal["float", "base64"] | None = "float"
    dimensions: int | None = Field(None, ge=1)
    user: str | None = None

    @field_validator("input", mode="before")
    @classmethod
    def _input(cls, v: Any) -> Any:
        return _check_prompts(v, "input", MAX_EMBED_INPUTS)


# What each field accepts, quoted in every 400 so the client can fix the request in one go.
ALLOWED: dict[str, str] = {
    "text": "a string (complete) or a string or list of strings (embed)",
    "top_p": "a number with 0 < top_p <= 1 (OpenAI API: 0 <= top_p <= 1)",
    "top_k": "an integer >= 0 (0 turns top-k off; 1 is greedy)",
    "temperature": "a number > 0 (for greedy output use 0.01 or top_k 1; OpenAI API: 0 to 2)",
    "length": "an integer >= 1: new tokens; prompt tokens + length must fit the model's context",
    "max_tokens": "an integer >= 1 or null (16); prompt tokens + max_tokens must fit the context",
    "stop_sequences": f"a list of at most {MAX_STOPS} non-empty strings",
    "stop": f"a string or a list of at most {MAX_STOPS} non-empty strings",
    "repetition_penalty": "a number with 0 < repetition_penalty <= 100 (1.0 is no penalty)",
    "presence_penalty": "a number from -2 to 2",
    "frequency_penalty": "a number from -2 to 2",
    "n": f"an integer from 1 to {MAX_N}",
    "best_of": "null or the same integer as n",
    "logprobs": "null or an integer from 0 to 5",
    "seed": "null or an integer from 0 to 2**63 - 1",
    "stream": "true or false",
    "model": "the name of a served model (see GET /v1/models)",
    "encoding_format": "'float' or 'base64'",
}


def describe_validation_error(errors: list[dict[str, Any]]) -> tuple[str, str | None]:
    """One message naming each bad field and what it accepts, and the first field as ``param``."""
    parts: list[str] = []
    params: list[str] = []
    for err in errors:
        loc = [str(p) for p in err.get("loc", ()) if p != "body"]
        field = loc[0] if loc else None
        where = ".".join(loc) or "body"
        kind = err.get("type", "")
        msg = str(err.get("msg", "invalid"))
        allowed = ALLOWED.get(field or "", "")
        if msg.startswith("Value error, "):
            parts.append(f"{where}: {msg[len('Value error, '):]}")
        elif kind == "missing":
            parts.append(f"{where}: required field is missing; expected {allowed or 'a value'}")
        elif kind == "extra_forbidden":
            parts.append(f"{where}: unknown field")
        else:
            got = json.dumps(err.get("input"), default=str)[:80]
            parts.append(f"{where}: {msg} (got {got})" + (f"; expected {allowed}" if allowed else ""))
        if field and field not in params:
            params.append(field)
    return "; ".join(parts) or "invalid request", (params[0] if params else None)


def validate(model: type[BaseModel], data: dict[str, Any]) -> Any:
    """``data`` as ``model``; BadRequest naming every bad field otherwise."""
    try:
        return model.model_validate(data)
    except ValidationError as e:
        message, param = describe_validation_error(list(e.errors()))
        code = "missing_field" if any(x.get("type") == "missing" for x in e.errors()) else None
        raise BadRequest(message, param, code) from None
