"""Gemma 4 12B Unified on Apple silicon with MLX.

    model, processor = mlx_gemma4u.load("path/or/repo")
    print(mlx_gemma4u.generate(model, processor, [{"role": "user", "content": "Hello"}]))
"""

from importlib import import_module

from . import lazy_mlx_lm  # noqa: F401  (first: mlx-lm's modules without its package __init__)

# name -> module: imported on first use, so `import mlx_gemma4u` (and `mlx-gemma4u --help`) costs
# milliseconds, not the MLX, numpy and tokenizer imports that generation needs
_EXPORTS = {"load": "loading", "generate": "generate", "stream_generate": "generate",
            "GenerationResponse": "generate", "PromptCache": "generate", "batch_generate": "batch",
            "load_draft_model": "draft"}
__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'mlx_gemma4u' has no attribute {name!r}")
    value = getattr(import_module(f".{_EXPORTS[name]}", __name__), name)
    globals()[name] = value
    return value
