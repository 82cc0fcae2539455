"""Gemma 4 12B Unified on Apple silicon with MLX.

model, processor = mlx_gemma4u.load("path/or/repo")
print(mlx_gemma4u.generate(model, processor, [{"role": "user", "content": "Hello"}]))
"""

from importlib import import_module

from mlx_gemma4u import lazy_mlx_lm  # noqa: F401  (first: mlx-lm's modules without its package __init__)

# name -> module: imported on first use (PEP 562), so `import mlx_gemma4u` and `mlx-gemma4u --help`
# cost milliseconds, not the MLX, numpy and tokenizer imports that generation needs
_EXPORTS = {
    "load": "weights.loading",
    "load_draft_model": "weights.loading",
    "sharded_load": "weights.sharded",
    "generate": "generation.api",
    "stream_generate": "generation.api",
    "batch_generate": "generation.api",
    "GenerationResponse": "generation.api",
    "BatchResponse": "generation.api",
    "PromptCache": "generation.prompt_cache",
    "SamplingParams": "generation.params",
}
__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
