"""Datasets: reading prompt/completion JSONL with line-numbered errors, tokenization, preparation."""
