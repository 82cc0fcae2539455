"""Gemma 4 12B Unified on Apple silicon with MLX.

    model, processor = mlx_gemma4u.load("path/or/repo")
    print(mlx_gemma4u.generate(model, processor, [{"role": "user", "content": "Hello"}]))
"""

import sys
from importlib import import_module
from types import ModuleType

from . import lazy_mlx_lm  # noqa: F401  (first: mlx-lm's modules without its package __init__)

# name -> module: imported on first use, so `import mlx_gemma4u` (and `mlx-gemma4u --help`) costs
# milliseconds, not the MLX, numpy and tokenizer imports that generation needs
_EXPORTS = {"load": "loading", "generate": "generate", "stream_generate": "generate",
            "GenerationResponse": "generate", "PromptCache": "generate", "batch_generate": "batch",
            "load_draft_model": "draft"}
__all__ = list(_EXPORTS)


class _Package(ModuleType):
    """The package, whose exports are properties: `mlx_gemma4u.generate` stays the function even
    after the submodule of that name is imported (the import system's setattr is ignored)."""


def _export(name: str, module: str) -> property:
    return property(lambda self: getattr(import_module(f".{module}", __name__), name), lambda self, value: None)


for _name, _module in _EXPORTS.items():
    setattr(_Package, _name, _export(_name, _module))
sys.modules[__name__].__class__ = _Package
