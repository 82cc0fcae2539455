"""Import parts of the package without its __init__, which imports mlx-lm and, through it,
transformers (and torch, where installed): lets a subprocess check what one part imports."""

PRELUDE = """
import importlib.util, sys, types
bare = types.ModuleType("mlx_gemma4u")
bare.__path__ = list(importlib.util.find_spec("mlx_gemma4u").submodule_search_locations)
sys.modules["mlx_gemma4u"] = bare
"""
