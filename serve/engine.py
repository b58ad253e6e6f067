"""One checkpoint's model and tokenizer, completing prompts exactly as checkpoints did in training.

The engine is plain Python (no Ray): a Serve replica holds one, and so can a test or a script.
Sampling and stop sequences are ``orchestrator.generation``'s, so a served completion matches
the test-prompt table of the checkpoint it came from.
"""

from __future__ import annotations

import threading

from orchestrator import checkpoints, models, storage
from orchestrator.generation import Sampling, complete, prompt_text
from serve.errors import ContextTooLong


class CompletionEngine:
    """Loads ``<checkpoint>/model`` (local path or ``s3://``) with ``from_pretrained``.

    Weights are read from safetensors only (never pickle). fp32 on CPU, bf16 on GPU. Calls to
    :meth:`complete` run one at a time per engine; scale out with more replicas.
    """

    def __init__(self, model_uri: str, device: str | None = None) -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.model_uri = model_uri
        local = storage.local_copy(model_uri)
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        dtype = torch.bfloat16 if self.device.startswith("cuda") else torch.float32
        self.tokenizer = AutoTokenizer.from_pretrained(local)
        model = AutoModelForCausalLM.from_pretrained(local, use_safetensors=True, dtype=dtype)
        self.model = model.to(self.device).eval()
        self.context_length: int = models.context_length(model_uri)
        self._lock = threading.Lock()

    @classmethod
    def from_checkpoint(
        cls, path: str, which: str = "best", device: str | None = None
    ) -> CompletionEngine:
        """An engine for a job folder's chosen checkpoint (best, latest, K, name) or a checkpoint folder."""
        return cls(checkpoints.resolve(path, which).model_uri, device=device)

    def prompt_ids(self, text: str) -> list[int]:
        """The prompt's token ids, tokenized exactly as ``generation.complete`` tokenizes it."""
        return self.tokenizer(self._prompt(text), verbose=False).input_ids

    def count_tokens(self, text: str) -> int:
        return len(self.prompt_ids(text))

    def check_fits(self, text: str, length: int) -> int:
        """The prompt's token count; raises ContextTooLong (HTTP 413) when prompt + length overflow."""
        used = self.count_tokens(text)
        if used + length <= self.context_length:
            return used
        room = self.context_length - used
        if room < 1:
            raise ContextTooLong(
                f"the prompt is {used} tokens, over the model's context of {self.context_length} "
                f"tokens with no room to generate; shorten text to under {self.context_length} tokens",
                param="text",
            )
        raise ContextTooLong(
            f"the prompt is {used} tokens and length asks for {length} more: {used + length} is "
            f"over the model's context of {self.context_length} tokens; use length at most {room} "
            "for this prompt, or shorten it",
            param="length",
        )

    def complete(self, text: str, sampling: Sampling, n: int = 1) -> list[str]:
        """``n`` completions of ``text``; stop sequences and ``<|endoftext|>`` are cut from each."""
        self.check_fits(text, sampling.length)
        prompt = self._prompt(text)
        with self._lock:
            return [complete(self.model, self.tokenizer, prompt, sampling) for _ in range(n)]

    def _prompt(self, text: str) -> str:
        return prompt_text(text)
