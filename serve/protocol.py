"""What crosses between the pieces: plain dataclasses, no torch.

The gateway sends :class:`GenerateCall` / :class:`EmbedCall` to the model deployment; the engine
reports each row's progress as :class:`Update`. The gateway imports only this (not the engine),
so its replicas start without loading torch or transformers.
"""

from __future__ import annotations

from dataclasses import dataclass, field

GREEDY_BELOW = 1e-5  # temperatures below this decode greedily (the draw is the argmax anyway)


@dataclass(frozen=True)
class SamplingParams:
    """One row's decoding settings; validated at the API boundary, trusted below it."""

    max_tokens: int = 64
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    stop: tuple[str, ...] = field(default_factory=tuple)
    logprobs: int | None = None  # how many top alternatives to report per token (0-5)
    seed: int | None = None

    @property
    def greedy(self) -> bool:
        return self.top_k == 1 or self.temperature < GREEDY_BELOW

    @property
    def filters(self) -> bool:
        """Whether top-k or top-p removes any token before the draw."""
        return self.top_k > 0 or self.top_p < 1.0


@dataclass
class EngineSettings:
    """How the decode loop batches; filled from the deployment spec by ``serve.app``."""

    max_batch_size: int = 16  # rows decoded together
    batch_wait_timeout_s: float = 0.01  # an idle engine waits this long for company
    max_prefill_tokens: int = 8192  # padded prompt tokens one prefill may take (memory bound)


@dataclass
class GenerateCall:
    """One completion request as the model replica sees it (both APIs)."""

    prompts: list[str | list[int]]
    params: SamplingParams
    n: int = 1
    deadline: float | None = None  # wall-clock seconds; rows past it end with 408
    prompt_param: str = "text"  # field names for error messages: the seed API's or OpenAI's
    length_param: str = "length"


@dataclass
class EmbedCall:
    inputs: list[str | list[int]]
    param: str = "text"


@dataclass
class TokenLogprob:
    token: str
    logprob: float
    top: dict[str, float]
    offset: int  # where the token's text starts in the completion


@dataclass
class Update:
    """What one row produced since its last update. ``finish_reason`` is set on the last one:
    ``stop`` (a stop sequence or ``<|endoftext|>``), ``length``, ``timeout``, ``cancelled`` or
    ``error`` (then ``error`` says why)."""

    text: str = ""
    logprobs: list[TokenLogprob] = field(default_factory=list)
    finish_reason: str | None = None
    completion_tokens: int = 0
    error: str | None = None


@dataclass
class Completion:
    text: str
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    logprobs: list[TokenLogprob] = field(default_factory=list)
