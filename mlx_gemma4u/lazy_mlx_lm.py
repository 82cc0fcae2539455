"""Reuse mlx-lm's samplers, logits processors, KV caches and attention without paying for its package.

`mlx_lm/__init__.py` imports mlx-lm's converter, generator and tokenizer wrapper, and through
them transformers and, where it is installed, torch: about 3 s at every start, for code that needs
none of it. The modules this package reuses (`mlx_lm.sample_utils`, `mlx_lm.models.cache`,
`mlx_lm.models.base`, the LoRA layers of `mlx_lm.tuner`) import only MLX. So, imported first by
`mlx_gemma4u/__init__.py`, this registers `mlx_lm` (and `mlx_lm.tuner`) as its real package with its
`__init__.py` not yet run: submodule imports work
as usual, and the first attribute only that `__init__` defines (`mlx_lm.load`,
`from mlx_lm import generate`) runs it then, so a user's own `import mlx_lm` behaves as always.
"""

from __future__ import annotations

import importlib.util
import sys


def _register_package_lazily(name: str) -> None:
    spec = importlib.util.find_spec(name)
    if spec is None:
        return  # not installed: the first real import says so
    package = importlib.util.module_from_spec(spec)

    def __getattr__(attribute: str):
        del package.__dict__["__getattr__"]
        spec.loader.exec_module(package)
        return getattr(package, attribute)

    package.__getattr__ = __getattr__
    sys.modules[name] = package


# mlx_lm.tuner's __init__ imports its trainer, and through it transformers: the LoRA layers
# (mlx_lm.tuner.lora, .dora) need none of that.
for _name in ("mlx_lm", "mlx_lm.tuner"):
    if _name not in sys.modules:
        _register_package_lazily(_name)
