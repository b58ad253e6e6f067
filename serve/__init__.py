"""forge serving: Ray Serve applications that serve a chosen checkpoint over HTTP.

``serve.app.build_app`` / ``serve.app.run`` deploy one checkpoint; ``serve.engine.CompletionEngine``
is the model behind them, usable without Ray. Imports are lazy so ``import serve`` stays cheap.
"""

from __future__ import annotations

from typing import Any

__all__ = ["CompletionEngine", "build_app", "run"]


def __getattr__(name: str) -> Any:
    if name == "CompletionEngine":
        from serve.engine import CompletionEngine

        return CompletionEngine
    if name in ("build_app", "run"):
        from serve import app

        return getattr(app, name)
    raise AttributeError(f"module 'serve' has no attribute {name!r}")
