"""Quantization recipes: which layers get how many bits, and the per-tensor work behind them.

A recipe maps each quantizable module path (every Linear and the token Embedding) to a `Spec` or
to None (kept in float). The position table and the norms are plain arrays, never quantized. The
MTP assistant (draft.py) follows the same recipes: its decoder layers like the model's, its tied
embedding `model.embed_tokens` (also its head) like the model's embedding, while its projections
to and from the target and its centroid scorer always stay in float (_ASSISTANT_FLOAT says why).

    "default"   MLP at --q-bits; attention projections and the token embedding (which is also the
                output head: the model ties them) at 6 bits when --q-bits is below 6; the
                image/audio embedders in float. At 4 bits it is mixed-6-4.
    "uniform"   every quantizable layer at --q-bits (what mlx-lm does by default); in the mxfp4,
                nvfp4 and mxfp8 modes the image/audio embedders stay in float.
    "mixed-6-4" attention projections and token embedding at 6 bits, MLP at 4; embedders in float.
    "mixed-8-4" the same with 8 bits instead of 6.
    "qat"       for checkpoints trained for 4 bits (Google's -qat-q4_0-unquantized, and their
                -qat-q4_0-unquantized-assistant drafters): exactly what
                QAT trained, the decoder's attention and MLP projections, at 4-bit affine in groups
                of 32 (Q4_0's block); the token embedding, which QAT left alone, at 8 bits; the
                image/audio embedders in float.

Why: see benchmarks/quant_recipes.py and the README (top-1 agreement and KL against the float
model). The config entry written for a plan is mlx-lm's: {"group_size", "bits", "mode"} plus one
entry per layer whose settings differ, which `loading.quantize_like` reads back.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import mlx.core as mx
import mlx.nn as nn

from mlx_gemma4u.errors import InputError

MODE_DEFAULTS = {"affine": (64, 4), "mxfp4": (32, 4), "nvfp4": (16, 4), "mxfp8": (32, 8)}
RECIPES = ("default", "uniform", "mixed-6-4", "mixed-8-4", "qat")
_MEDIA = ("embed_vision.", "embed_audio.")
_EMBEDDINGS = ("language_model.embed_tokens", "lm_head", "model.embed_tokens")  # the last: the assistant's
# The assistant's layers that stay float. pre_projection (2 * 3840 -> 1024 in the 12B's assistant)
# reads the target's hidden state and post_projection (1024 -> 3840) writes the next draft step's,
# so rounding there compounds over the K steps of a round; the centroid scorer (1024 -> 2048) picks
# the top-k centroids, a hard choice that a rounding can flip, dropping a whole group of tokens.
# Together about 14M weights, against the tied embedding's 268M (262144 x 1024), which is quantized.
_ASSISTANT_FLOAT = ("pre_projection", "post_projection", "masked_embedding.centroids")


@dataclass(frozen=True)
class Spec:
    """How one layer is quantized: the arguments of mx.quantize / to_quantized."""

    group_size: int
    bits: int
    mode: str = "affine"

    def as_dict(self) -> dict:
        return asdict(self)


QAT_SPEC = Spec(32, 4)  # Q4_0's block of 32 (MLX fits a scale and a bias per group; Q4_0 a symmetric scale)


def body_spec(bits: int | None, group_size: int | None, mode: str, recipe: str = "default") -> Spec:
    """The settings of the bulk of the model, checked: non-affine modes and the qat recipe fix their
    bits and group size."""
    if mode not in MODE_DEFAULTS:
        raise InputError(f"--q-mode must be one of {', '.join(MODE_DEFAULTS)}, got {mode!r}.")
    default_group, default_bits = (QAT_SPEC.group_size, QAT_SPEC.bits) if recipe == "qat" else MODE_DEFAULTS[mode]
    spec = Spec(group_size or default_group, bits or default_bits, mode)
    if recipe == "qat" and spec != QAT_SPEC:
        raise InputError(
            "The qat recipe means 4-bit affine in groups of 32 (what QAT trained for); leave --q-bits, "
            "--q-group-size and --q-mode out, or choose another --quant-recipe."
        )
    if mode != "affine" and (spec.group_size, spec.bits) != (default_group, default_bits):
        raise InputError(
            f"--q-mode {mode} means {default_bits} bits in groups of {default_group}; "
            f"leave --q-bits and --q-group-size out or use --q-mode affine."
        )
    if mode == "affine" and spec.bits not in (2, 3, 4, 5, 6, 8):
        raise InputError(f"--q-bits must be one of 2, 3, 4, 5, 6, 8, got {spec.bits}.")
    if mode == "affine" and spec.group_size not in (32, 64, 128):
        raise InputError(f"--q-group-size must be 32, 64 or 128, got {spec.group_size}.")
    return spec


def recipe_spec(recipe: str, path: str, body: Spec) -> Spec | None:
    """The recipe's choice for one module path (None: keep it in float)."""
    if path in _ASSISTANT_FLOAT:
        return None
    media, embedding, attention = path.startswith(_MEDIA), path in _EMBEDDINGS, ".self_attn." in path
    if media and (recipe != "uniform" or body.mode != "affine"):
        return None  # the media embedders compute in their weights' float dtype: affine scales only
    if recipe == "uniform":
        return body
    if recipe == "qat":
        return Spec(64, 8) if embedding else body
    if recipe == "default":
        high = Spec(body.group_size if body.mode == "affine" else 64, 6)
        return high if (embedding or attention) and body.bits < 6 else body
    high = {"mixed-6-4": 6, "mixed-8-4": 8}[recipe]
    return Spec(body.group_size, high) if embedding or attention else Spec(body.group_size, 4)


def check_recipe(recipe: str, body: Spec) -> None:
    """Refuse a recipe that does not exist or does not go with the body's mode."""
    if recipe not in RECIPES:
        raise InputError(f"--quant-recipe must be one of {', '.join(RECIPES)}, got {recipe!r}.")
    if recipe.startswith("mixed") and body.mode != "affine":
        raise InputError(f"The {recipe} recipe is affine only; use --q-mode affine or --quant-recipe uniform.")


def plan(model: nn.Module, recipe: str, body: Spec) -> dict[str, Spec]:
    """Module path -> Spec for every layer the recipe quantizes and whose width the group size divides."""
    check_recipe(recipe, body)
    chosen = {}
    for path, module in model.named_modules():
        if not hasattr(module, "to_quantized"):
            continue
        spec = recipe_spec(recipe, path, body)
        if spec is not None and module.weight.shape[-1] % spec.group_size == 0:
            chosen[path] = spec
    return chosen


def config_entry(body: Spec, layers: dict[str, Spec]) -> dict:
    """config.json's "quantization": the body's settings, then every layer that differs from them."""
    entry = body.as_dict()
    entry.update({path: spec.as_dict() for path, spec in sorted(layers.items()) if spec != body})
    return entry


def quantize_weight(prefix: str, weight: mx.array, spec: Spec) -> dict[str, mx.array]:
    """One float weight -> the lazily computed tensors a quantized layer stores (weight, scales[, biases])."""
    out = mx.quantize(weight, group_size=spec.group_size, bits=spec.bits, mode=spec.mode)
    names = ("weight", "scales", "biases")
    return {f"{prefix}.{name}": value for name, value in zip(names, out) if value is not None}


def dequantize_weight(prefix: str, weights: dict[str, mx.array], spec: Spec) -> mx.array:
    """Pop a stored quantized layer's tensors from `weights` -> its float weight (lazily)."""
    biases = weights.pop(f"{prefix}.biases", None)
    return mx.dequantize(
        weights.pop(f"{prefix}.weight"),
        weights.pop(f"{prefix}.scales"),
        biases,
        group_size=spec.group_size,
        bits=spec.bits,
        mode=spec.mode,
    )


def stored_specs(quantization: dict, weights: dict) -> dict[str, Spec]:
    """The layers a quantized checkpoint stores quantized (those with scales) and their settings."""
    body = Spec(quantization.get("group_size", 64), quantization.get("bits", 4), quantization.get("mode", "affine"))
    specs = {}
    for name in weights:
        if name.endswith(".scales"):
            path = name.removesuffix(".scales")
            override = quantization.get(path)
            if isinstance(override, dict):
                specs[path] = Spec(
                    override.get("group_size", body.group_size),
                    override.get("bits", body.bits),
                    override.get("mode", body.mode),
                )
            else:
                specs[path] = body
    return specs
