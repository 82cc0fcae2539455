"""Gemma 4 12B Unified on Apple silicon with MLX.

    model, processor = mlx_gemma4u.load("path/or/repo")
    print(mlx_gemma4u.generate(model, processor, [{"role": "user", "content": "Hello"}]))

The names below load on first use, so importing one part of the package (the processor, the
tokenizer builder) does not import mlx-lm, and with it transformers.
"""

from importlib import import_module

_EXPORTS = {"load": "loading", "generate": "generate", "stream_generate": "generate",
            "GenerationResponse": "generate", "PromptCache": "generate"}
__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
