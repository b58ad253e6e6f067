"""Base models: named presets built from a config with random weights, or a HF model folder.

A preset gets a byte-level BPE tokenizer trained on the job's own data and is saved with
``save_pretrained``, so training and serving always go through the real ``from_pretrained`` path.
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterable
from typing import Any

from orchestrator import storage
from orchestrator.spec import EOT, JobSpec

PAD = "<|padding|>"

# Shapes follow the GPT-NeoX / Pythia family (rotary on a quarter of each head, parallel residual,
# untied embeddings, vocabulary padded to 50304) and GPT-J; random weights, for tests and benchmarks.
_NEOX = dict(rotary_pct=0.25, use_parallel_residual=True, tie_word_embeddings=False,
             max_position_embeddings=2048)


def _pythia(layers: int, hidden: int, heads: int, vocab: int = 50304) -> dict[str, Any]:
    return dict(_NEOX, num_hidden_layers=layers, hidden_size=hidden, num_attention_heads=heads,
                intermediate_size=4 * hidden, vocab_size=vocab)


PRESET_CONFIGS: dict[str, dict[str, Any]] = {
    "neox-tiny": dict(_NEOX, hidden_size=128, num_hidden_layers=2, num_attention_heads=4,
                      intermediate_size=512, max_position_embeddings=512),
    "pythia-70m": _pythia(6, 512, 8),
    "pythia-160m": _pythia(12, 768, 12),
    "pythia-410m": _pythia(24, 1024, 16),
    "pythia-1b": _pythia(16, 2048, 8),
    "pythia-1.4b": _pythia(24, 2048, 16),
    "pythia-2.8b": _pythia(32, 2560, 32),
    "pythia-6.9b": _pythia(32, 4096, 32),
    "pythia-12b": _pythia(36, 5120, 40),
    "gpt-neox-20b": _pythia(44, 6144, 64, vocab=50432),
    # GPT-J (model_type gptj): rotary_dim of each head, sequential residual, tied nothing.
    "gptj-tiny": dict(model_type="gptj", n_embd=128, n_layer=2, n_head=4, rotary_dim=16, n_positions=512),
    "gpt-j-6b": dict(model_type="gptj", n_embd=4096, n_layer=28, n_head=16, rotary_dim=64, n_positions=2048,
                     vocab_size=50400),
}


def train_tokenizer(texts: Iterable[str], vocab_size: int):
    """A GPT-NeoX-style byte-level BPE tokenizer trained on ``texts`` (a transformers fast tokenizer)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOT, PAD],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    # Like GPT-NeoX's own tokenizer: <|endoftext|> is bos/eos/unk and no pad token is set.
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=EOT, eos_token=EOT, unk_token=EOT,
        model_max_length=2048,
    )


# Presets up to this size are saved with their random weights, so training loads them with the
# real from_pretrained path; bigger ones are saved as config + tokenizer (RANDOM_INIT marks them)
# and built on the workers under ZeRO-3 init, never whole in one process.
SAVE_WEIGHTS_MAX_PARAMS = 200_000_000
RANDOM_INIT = "forge-random-init.json"


def preset_config(name: str, tokenizer):
    """The transformers config of preset ``name`` for ``tokenizer`` (GPT-NeoX or GPT-J)."""
    from transformers import AutoConfig

    shape = dict(PRESET_CONFIGS[name])
    model_type = shape.pop("model_type", "gpt_neox")
    # Never smaller than the tokenizer; padded to a multiple of 64 as GPT-NeoX does.
    vocab = max(shape.pop("vocab_size", 0), -(-len(tokenizer) // 64) * 64)
    eot = tokenizer.convert_tokens_to_ids(EOT)
    return AutoConfig.for_model(model_type, vocab_size=vocab, bos_token_id=eot, eos_token_id=eot, **shape)


def count_params(config) -> int:
    """Parameters of a GPT-NeoX or GPT-J config, without building the model."""
    h, layers = config.hidden_size, config.num_hidden_layers
    inner = getattr(config, "intermediate_size", None) or getattr(config, "n_inner", None) or 4 * h
    per_layer = 4 * h * h + 2 * h * inner + 6 * h + inner
    embeddings = config.vocab_size * h * (1 if getattr(config, "tie_word_embeddings", False) else 2)
    return layers * per_layer + embeddings


def build_preset(name: str, tokenizer, seed: int, out_dir: str, weights: bool | None = None) -> None:
    """Save preset ``name`` with ``tokenizer`` as a HF folder in ``out_dir``: with random weights
    (``weights``; default for presets up to SAVE_WEIGHTS_MAX_PARAMS), else config only."""
    import json
    import os

    import torch
    from transformers import AutoModelForCausalLM

    config = preset_config(name, tokenizer)
    tokenizer.model_max_length = config.max_position_embeddings
    if weights is None:
        weights = count_params(config) <= SAVE_WEIGHTS_MAX_PARAMS
    if weights:
        torch.manual_seed(seed)
        AutoModelForCausalLM.from_config(config).save_pretrained(out_dir)
    else:
        config.save_pretrained(out_dir)
        with open(os.path.join(out_dir, RANDOM_INIT), "w") as f:
            json.dump({"preset": name, "seed": seed}, f)
    tokenizer.save_pretrained(out_dir)


def prepare_base_model(spec: JobSpec, texts: Iterable[str]) -> str:
    """The URI of the job's base model folder; builds and stores a preset under the job folder."""
    if not spec.model.is_preset:
        return spec.model.base
    uri = storage.join(spec.job_uri, "base-model")
    if storage.exists(storage.join(uri, "config.json")):
        return uri
    tokenizer = train_tokenizer(texts, spec.model.tokenizer_vocab_size)
    with tempfile.TemporaryDirectory() as tmp:
        build_preset(spec.model.base, tokenizer, spec.training.seed, tmp)
        storage.upload_dir(tmp, uri)
    return uri


def load_tokenizer(model_uri: str):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(storage.local_copy(model_uri))


def context_length(model_uri: str) -> int:
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(storage.local_copy(model_uri))
    return int(getattr(cfg, "max_position_embeddings", 2048))
