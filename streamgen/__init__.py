"""streamgen: real-time autoregressive video generation (server, engine, model).

``streamgen.Pipeline`` is imported on first use: ``import streamgen`` stays free of torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from streamgen.pipeline import Pipeline

__all__ = ["Pipeline"]


def __getattr__(name: str) -> Any:
    if name == "Pipeline":
        from streamgen.pipeline import Pipeline

        return Pipeline
    raise AttributeError(f"module 'streamgen' has no attribute {name!r}")
