"""Gemma 4 12B Unified on Apple silicon with MLX.

    model, processor = mlx_gemma4u.load("path/or/repo")
    print(mlx_gemma4u.generate(model, processor, [{"role": "user", "content": "Hello"}]))
"""

from .generate import GenerationResponse, PromptCache, generate, stream_generate
from .loading import load

__all__ = ["load", "generate", "stream_generate", "GenerationResponse", "PromptCache"]
