"""forge orchestrator: job specs, data checks and tokenization, DeepSpeed training on Ray Train."""

__version__ = "0.1.0"
