"""Weights-only export in safetensors (placeholder)."""

from typing import Any


def export_safetensors(*args: Any, **kwargs: Any) -> None:
    raise NotImplementedError
