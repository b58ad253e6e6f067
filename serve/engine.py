"""One checkpoint's model, decoding many requests at once with continuous batching.

A :class:`ModelEngine` is plain Python (no Ray): a Serve replica holds one per loaded model, and
so can a test, a benchmark or a script. Its own thread runs the decode loop: between any two
steps, waiting requests join the running batch (after a prefill of their own) and finished ones
leave it, so a short request never waits for a long one. Every row keeps its own sampling
parameters (:mod:`serve.sampling`, transformers' semantics), stop sequences and deadline
(:mod:`serve.text`). Callers submit rows with a ``sink`` that the loop calls with each
:class:`Update`; :meth:`generate`, :meth:`complete` and :meth:`embed` wrap that for blocking use.

Weights load from safetensors only (never pickle); bf16 on GPU, fp32 on CPU.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence

import torch

from orchestrator import checkpoints, storage
from orchestrator.generation import Sampling, prompt_text
from serve.batch import DecodeBatch, right_padded
from serve.errors import ContextTooLong
from serve.protocol import Completion, EngineSettings, SamplingParams, TokenLogprob, Update
from serve.sampling import apply_penalties, choose_tokens, top_logprobs
from serve.text import IncrementalText, StopMatcher

logger = logging.getLogger("forge.serve")


Sink = Callable[[Update], None]


class _Row:
    """One sequence being generated."""

    def __init__(self, rid: int, prompt: list[int], params: SamplingParams, sink: Sink,
                 stream: bool, deadline: float | None, tokenizer, device: torch.device) -> None:
        self.id, self.prompt, self.params, self.sink = rid, prompt, params, sink
        self.stream, self.deadline = stream, deadline
        self.text = IncrementalText(tokenizer)
        self.stops = StopMatcher(params.stop)
        self.generator = None
        if params.seed is not None:
            self.generator = torch.Generator(device=device).manual_seed(params.seed)
        self.generated = 0
        self.emitted = 0
        self.cut: int | None = None
        self.logprobs: list[TokenLogprob] = []
        self.sent_logprobs = 0

    def send(self, update: Update) -> None:
        try:
            self.sink(update)
        except Exception:  # a caller that went away must not stop the loop
            logger.debug("dropped an update for row %d", self.id)


class ModelEngine:
    """Loads ``<checkpoint>/model`` (a local folder or ``s3://``) and serves it from one thread."""

    def __init__(self, model_uri: str, settings: EngineSettings | None = None,
                 device: str | None = None) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.model_uri = model_uri
        self.settings = settings or EngineSettings()
        local = storage.local_copy(model_uri)
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        dtype = torch.bfloat16 if self.device.type == "cuda" else torch.float32
        self.tokenizer = AutoTokenizer.from_pretrained(local)
        model = AutoModelForCausalLM.from_pretrained(local, use_safetensors=True, dtype=dtype)
        self.model = model.to(self.device).eval()
        cfg = model.config
        self.context_length = int(getattr(cfg, "max_position_embeddings", None)
                                  or getattr(cfg, "n_positions", 2048))
        self.vocab_size = int(cfg.vocab_size)
        self.eos_id = self.tokenizer.eos_token_id
        # No token covers more characters than its vocabulary string has (x4: Unicode
        # normalisation may merge a few code points into one), so a text longer than context *
        # this cannot fit, and is refused without tokenizing it.
        self.max_token_chars = 4 * max((len(t) for t in self.tokenizer.get_vocab()), default=1)
        self._batch = DecodeBatch(self.model)
        self._rows: list[_Row] = []
        self._pending: deque[_Row] = deque()
        self._embeds: deque[tuple[list[list[int]], Callable[[object], None]]] = deque()
        self._cancelled: set[int] = set()
        self._ids = itertools.count(1)
        self._cv = threading.Condition()
        self._closing = False
        self.stats = {"steps": 0, "tokens": 0, "max_rows": 0, "prefills": 0}
        self._thread = threading.Thread(target=self._loop, name=f"forge-engine-{id(self):x}",
                                         daemon=True)
        self._thread.start()

    @classmethod
    def from_checkpoint(cls, path: str, which: str = "best", **kwargs) -> ModelEngine:
        """An engine for a job folder's chosen checkpoint (best, latest, K, name) or a checkpoint."""
        return cls(checkpoints.resolve(path, which).model_uri, **kwargs)

    # --- prompts ------------------------------------------------------------------------------

    def encode(self, text: str, param: str = "text", where: str | None = None) -> list[int]:
        """The prompt's token ids, tokenized exactly as ``generation.complete`` does (an empty
        prompt is ``<|endoftext|>``, as in training)."""
        text = prompt_text(text)
        if len(text) > self.context_length * self.max_token_chars:
            raise ContextTooLong(
                f"{where or param} is {len(text)} characters, certainly over the model's context of "
                f"{self.context_length} tokens; shorten it", param=param)
        return self.tokenizer(text, verbose=False).input_ids

    def check_fits(self, used: int, length: int, text_param: str = "text",
                   length_param: str = "length", where: str | None = None) -> None:
        """Raise ContextTooLong (HTTP 413) when ``used`` prompt tokens + ``length`` overflow."""
        if used + length <= self.context_length:
            return
        room = self.context_length - used
        where = where or text_param
        if room < 1:
            raise ContextTooLong(
                f"{where} is {used} tokens, over the model's context of {self.context_length} "
                f"tokens with no room to generate; shorten it to under "
                f"{self.context_length} tokens", param=text_param)
        raise ContextTooLong(
            f"{where} is {used} tokens and {length_param} asks for {length} more: "
            f"{used + length} is over the model's context of {self.context_length} tokens; use "
            f"{length_param} at most {room} for this prompt, or shorten it", param=length_param)

    # --- the asynchronous interface -----------------------------------------------------------

    def submit(self, prompt: list[int], params: SamplingParams, sink: Sink, *,
               stream: bool = False, deadline: float | None = None) -> int:
        """Queue one row; ``sink`` gets its updates (on the engine's thread). Returns its id."""
        row = _Row(next(self._ids), list(prompt), params, sink, stream, deadline, self.tokenizer,
                   self.device)
        with self._cv:
            if self._closing:
                raise RuntimeError("the engine is closed")
            self._pending.append(row)
            self._cv.notify()
        return row.id

    def cancel(self, row_ids: Sequence[int]) -> None:
        """Stop rows (a client went away, or its deadline passed); frees their batch slots."""
        with self._cv:
            self._cancelled.update(row_ids)
            self._cv.notify()

    def submit_embed(self, prompts: list[list[int]], sink: Callable[[object], None]) -> None:
        """Queue an embedding job; ``sink`` gets the vectors (list of lists) or an Exception."""
        with self._cv:
            self._embeds.append((prompts, sink))
            self._cv.notify()

    def load(self) -> dict[str, int]:
        """Rows decoding and waiting now, and counters since start."""
        with self._cv:
            return {"active": len(self._rows), "pending": len(self._pending), **self.stats}

    def alive(self) -> bool:
        return self._thread.is_alive()

    @property
    def closing(self) -> bool:
        """True once :meth:`close` was called: no new rows are taken."""
        return self._closing

    def close(self, timeout: float = 30.0) -> None:
        """Take no new rows, finish the ones in flight (up to ``timeout``), then stop the thread."""
        with self._cv:
            self._closing = True
            self._cv.notify()
        self._thread.join(timeout)
        if self._thread.is_alive():
            with self._cv:
                self._cancelled.update(r.id for r in [*self._rows, *self._pending])
                self._cv.notify()
            self._thread.join(5)

    def __del__(self) -> None:
        """Serve's multiplexing calls this when it evicts the model from a replica."""
        thread = getattr(self, "_thread", None)
        if thread is not None and thread is not threading.current_thread():
            self.close()

    # --- blocking helpers (scripts, tests, benchmarks) ----------------------------------------

    def generate(self, prompt: list[int], params: SamplingParams, n: int = 1,
                 timeout: float | None = None) -> list[Completion]:
        """``n`` completions of ``prompt`` (token ids), waiting for all of them."""
        done = threading.Event()
        parts: list[list[Update]] = [[] for _ in range(n)]
        left = [n]

        def sink_for(i: int) -> Sink:
            def sink(u: Update) -> None:
                parts[i].append(u)
                if u.finish_reason is not None:
                    left[0] -= 1
                    if left[0] == 0:
                        done.set()
            return sink

        for i in range(n):
            self.submit(prompt, params, sink_for(i))
        if not done.wait(timeout):
            raise TimeoutError(f"no result in {timeout} s")
        out = []
        for ups in parts:
            last = ups[-1]
            if last.error:
                raise RuntimeError(last.error)
            out.append(Completion("".join(u.text for u in ups), last.finish_reason or "",
                                  len(prompt), last.completion_tokens,
                                  [lp for u in ups for lp in u.logprobs]))
        return out

    def complete(self, text: str, sampling: Sampling, n: int = 1) -> list[str]:
        """The seed API's completions of ``text``, as ``orchestrator.generation.complete`` gives."""
        prompt = self.encode(text)
        self.check_fits(len(prompt), sampling.length)
        return [c.text for c in self.generate(prompt, seed_params(sampling), n)]

    def embed(self, texts: Sequence[str]) -> list[list[float]]:
        """Mean-pooled, L2-normalised last hidden states of ``texts`` (blocking)."""
        done = threading.Event()
        box: list[object] = []
        prompts = [self.tokenizer(t, verbose=False).input_ids for t in texts]
        self.submit_embed(prompts, lambda r: (box.append(r), done.set()))
        done.wait()
        if isinstance(box[0], Exception):
            raise box[0]
        return box[0]  # type: ignore[return-value]

    # --- the loop -----------------------------------------------------------------------------

    def _loop(self) -> None:
        while True:
            with self._cv:
                while not (self._rows or self._pending or self._embeds or self._cancelled
                           or self._closing):
                    self._cv.wait()
                if self._closing and not (self._rows or self._pending or self._embeds):
                    return
            if not self._rows and self.settings.batch_wait_timeout_s > 0:
                self._gather()
            try:
                with torch.inference_mode():
                    self._iteration()
            except Exception as e:  # a broken model or a bug: fail these rows, keep serving
                logger.exception("decode step failed")
                for row in self._rows:
                    row.send(Update(finish_reason="error", error=f"{type(e).__name__}: {e}"))
                self._rows = []
                self._batch.clear()

    def _gather(self) -> None:
        """An idle engine waits briefly for more requests, so they share the first prefill."""
        deadline = time.monotonic() + self.settings.batch_wait_timeout_s
        with self._cv:
            while len(self._pending) < self.settings.max_batch_size and not self._closing:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._cv.wait(left)

    def _iteration(self) -> None:
        with self._cv:
            cancelled, self._cancelled = self._cancelled, set()
            embeds = list(self._embeds)
            self._embeds.clear()
            room = self.settings.max_batch_size - len(self._rows)
            admitted: list[_Row] = []
            budget = self.settings.max_prefill_tokens
            while self._pending and len(admitted) < room:
                row = self._pending[0]
                width = max([len(row.prompt), *(len(r.prompt) for r in admitted)])
                if admitted and width * (len(admitted) + 1) > budget:
                    break
                admitted.append(self._pending.popleft())
            now = time.monotonic()
            dropped = [r for r in self._pending if r.id in cancelled
                       or (r.deadline is not None and now > r.deadline)]
            if dropped:
                gone = {r.id for r in dropped}
                self._pending = deque(r for r in self._pending if r.id not in gone)
        for prompts, sink in embeds:
            self._run_embed(prompts, sink)
        for row in dropped:
            row.send(Update(finish_reason="cancelled" if row.id in cancelled else "timeout"))
        self._drop(cancelled, admitted)
        if admitted:
            self._batch.add([r.prompt for r in admitted])
            self._rows.extend(admitted)
            self.stats["prefills"] += 1
        if not self._rows:
            return
        self.stats["max_rows"] = max(self.stats["max_rows"], len(self._rows))
        self._decode_once()

    def _drop(self, cancelled: set[int], admitted: list[_Row]) -> None:
        """Remove cancelled and expired rows (before they cost another step)."""
        now = time.monotonic()
        for row in list(admitted):
            if row.id in cancelled:
                admitted.remove(row)
                row.send(Update(finish_reason="cancelled"))
        keep = []
        for i, row in enumerate(self._rows):
            if row.id in cancelled:
                row.send(Update(finish_reason="cancelled", completion_tokens=row.generated))
            elif row.deadline is not None and now > row.deadline:
                row.send(Update(finish_reason="timeout", completion_tokens=row.generated))
            else:
                keep.append(i)
        if len(keep) < len(self._rows):
            self._batch.keep(keep)
            self._rows = [self._rows[i] for i in keep]

    def _decode_once(self) -> None:
        """Choose every row's next token, report it, drop finished rows, step the rest."""
        batch, rows = self._batch, self._rows
        params = [r.params for r in rows]
        logits = apply_penalties(batch.logits, params, batch.seen, batch.counts)
        tokens = choose_tokens(logits, params, [r.generator for r in rows])
        batch.record(tokens)
        want = [i for i, r in enumerate(rows) if r.params.logprobs is not None]
        lps: dict[int, tuple[float, list[tuple[int, float]]]] = {}
        if want:
            k = max(rows[i].params.logprobs or 0 for i in want)
            picked, tops = top_logprobs(batch.logits, tokens, want, k)
            lps = {i: (picked[j], tops[j]) for j, i in enumerate(want)}
        keep: list[int] = []
        for i, (row, token) in enumerate(zip(rows, tokens.tolist(), strict=True)):
            if not self._advance(row, token, lps.get(i)):
                keep.append(i)
        self.stats["steps"] += 1
        self.stats["tokens"] += len(rows)
        batch.keep(keep)
        self._rows = [rows[i] for i in keep]
        if self._rows:
            batch.step(tokens[torch.tensor(keep, dtype=torch.long, device=tokens.device)])

    def _advance(self, row: _Row, token: int, lp: tuple[float, list] | None) -> bool:
        """Add ``token`` to ``row`` and send what it produced; True when the row is finished."""
        row.generated += 1
        before = len(row.text.text)
        finish = None
        if token == self.eos_id:  # like generate: the text decoded so far, split bytes included
            row.text.flush()
            row.cut = row.stops.find(row.text.text, before)
            finish = "stop"
        else:
            if lp is not None:
                top = {self._token_str(t): v for t, v in lp[1][: row.params.logprobs or 0]}
                row.logprobs.append(TokenLogprob(self._token_str(token), lp[0], top, before))
            if row.text.add(token):
                row.cut = row.stops.find(row.text.text, before)
            if row.cut is None and row.generated >= row.params.max_tokens:
                row.text.flush()
                row.cut = row.stops.find(row.text.text, before)
                finish = "length" if row.cut is None else "stop"
            elif row.cut is not None:
                finish = "stop"
        if finish is None and not row.stream:
            return False
        text = row.text.text
        if finish is None:
            end = row.stops.safe_end(text)
        else:
            end = len(text) if row.cut is None else row.cut
        fresh = row.logprobs[row.sent_logprobs :]
        if finish is None or row.cut is not None:
            fresh = [t for t in fresh if t.offset < end]
        if finish is None and not fresh and end <= row.emitted:
            return False
        row.sent_logprobs += len(fresh)
        row.send(Update(text[row.emitted : end], fresh, finish, row.generated))
        row.emitted = max(row.emitted, end)
        return finish is not None

    def _token_str(self, token: int) -> str:
        return self.tokenizer.decode([token], skip_special_tokens=False)

    @torch.inference_mode()
    def _run_embed(self, prompts: list[list[int]], sink: Callable[[object], None]) -> None:
        try:
            base = self.model.base_model
            out: list[list[float]] = []
            step = max(1, self.settings.max_batch_size)
            for start in range(0, len(prompts), step):
                ids, mask = right_padded(prompts[start : start + step], self.device)
                hidden = base(input_ids=ids, attention_mask=mask).last_hidden_state.float()
                m = mask[..., None].to(hidden.dtype)
                pooled = (hidden * m).sum(1) / m.sum(1).clamp(min=1)
                out.extend(torch.nn.functional.normalize(pooled, dim=-1).tolist())
            sink(out)
        except Exception as e:
            logger.exception("embedding failed")
            sink(e)


def seed_params(s: Sampling) -> SamplingParams:
    """The seed API's (and test prompts') sampling fields as engine parameters."""
    return SamplingParams(max_tokens=s.length, temperature=s.temperature, top_p=s.top_p,
                          top_k=s.top_k, repetition_penalty=s.repetition_penalty,
                          stop=tuple(s.stop_sequences))
