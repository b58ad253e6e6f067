"""Base models: named presets built from a GPTNeoXConfig with random weights, or a HF model folder.

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

# Shapes follow the GPT-NeoX / Pythia family (rotary on a quarter of each head, parallel residual).
PRESET_CONFIGS: dict[str, dict[str, Any]] = {
    "neox-tiny": dict(
        hidden_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=512,
        max_position_embeddings=512,
        rotary_pct=0.25,
        use_parallel_residual=True,
        tie_word_embeddings=False,
    ),
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
        model_max_length=PRESET_CONFIGS["neox-tiny"]["max_position_embeddings"],
    )


def build_preset(name: str, tokenizer, seed: int, out_dir: str) -> None:
    """Save a randomly initialised preset model plus ``tokenizer`` as a HF folder in ``out_dir``."""
    import torch
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    shape = dict(PRESET_CONFIGS[name])
    vocab = -(-len(tokenizer) // 64) * 64  # padded to a multiple of 64, as GPT-NeoX does
    tokenizer.model_max_length = shape["max_position_embeddings"]
    config = GPTNeoXConfig(
        vocab_size=vocab,
        bos_token_id=tokenizer.convert_tokens_to_ids(EOT),
        eos_token_id=tokenizer.convert_tokens_to_ids(EOT),
        **shape,
    )
    torch.manual_seed(seed)
    model = GPTNeoXForCausalLM(config)
    model.save_pretrained(out_dir)
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
