"""forge serving: Ray Serve applications that serve chosen checkpoints over HTTP.

``serve.app.build`` (for Serve config files) and ``serve.app.build_app`` / ``serve.app.run`` (for
``forge serve``) build the application; ``serve.engine.ModelEngine`` is the batched model behind
it, usable without Ray. See docs/serving.md. Imports are lazy so ``import serve`` stays cheap.
"""

from __future__ import annotations

from typing import Any

__all__ = ["CompletionEngine", "ModelEngine", "build", "build_app", "run"]


def __getattr__(name: str) -> Any:
    if name in ("ModelEngine", "CompletionEngine"):  # CompletionEngine: the earlier name
        from serve.engine import ModelEngine

        return ModelEngine
    if name in ("build", "build_app", "run"):
        from serve import app

        return getattr(app, name)
    raise AttributeError(f"module 'serve' has no attribute {name!r}")
