"""Low-rank adapters: mlx-lm's LoRALinear and DoRALinear swapped in for the attention and MLP
projections of the last `num_layers` decoder layers (and optionally for the patch and audio
projections, MEDIA_KEYS), the way nn.quantize swaps layers.

    y = W x + scale * B (A dropout(x))        A (in, rank), B (rank, out); DoRA also rescales W's columns

The base stays frozen and as it is (a quantized base stays quantized: QLoRA); only A and B (and
DoRA's magnitudes) train, or, with "full", every weight of those layers. `fuse` folds the adapters
back into plain layers. The forward pass is the model's own, so training sees the inference masks.
"""

from __future__ import annotations

from dataclasses import dataclass

import mlx.nn as nn
from mlx.utils import tree_flatten, tree_unflatten
from mlx_lm.tuner.dora import DoRALinear
from mlx_lm.tuner.lora import LoRALinear

from mlx_gemma4u.errors import InputError

DECODER_KEYS = (
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "self_attn.o_proj",
    "mlp.gate_proj",
    "mlp.up_proj",
    "mlp.down_proj",
)
MEDIA_KEYS = (  # the patch and audio projections, by their paths in the model (optional: `--adapt-media`)
    "embed_vision.patch_dense",
    "embed_vision.multimodal_embedder.embedding_projection",
    "embed_audio.embedding_projection",
)
FINE_TUNE_TYPES = ("lora", "dora", "full")
ADAPTER_PARAMETERS = ("lora_a", "lora_b", "m")  # the leaves an adapter file holds (m: DoRA's magnitudes)


@dataclass(frozen=True)
class AdapterConfig:
    """What `apply` swaps in; saved beside the adapter weights (adapter_config.json)."""

    fine_tune_type: str = "lora"
    num_layers: int = 16  # the last this many decoder layers; -1 for all
    rank: int = 8
    scale: float = 20.0
    dropout: float = 0.0
    keys: tuple[str, ...] = DECODER_KEYS

    def __post_init__(self):
        if self.fine_tune_type not in FINE_TUNE_TYPES:
            kinds = ", ".join(FINE_TUNE_TYPES)
            raise InputError(f"fine_tune_type must be one of {kinds}, got {self.fine_tune_type!r}.")
        if self.num_layers == 0 or self.num_layers < -1:
            raise InputError(f"num_layers must be a positive number of layers or -1 for all, got {self.num_layers}.")
        if self.rank < 1:
            raise InputError(f"The LoRA rank must be at least 1, got {self.rank}.")
        if not 0 <= self.dropout < 1:
            raise InputError(f"The LoRA dropout must be in [0, 1), got {self.dropout}.")
        unknown = sorted(set(self.keys) - set(DECODER_KEYS + MEDIA_KEYS))
        if unknown:
            keys = ", ".join(DECODER_KEYS + MEDIA_KEYS)
            raise InputError(f"Unknown LoRA key {unknown[0]!r}; the keys are {keys}.")
        if self.fine_tune_type == "dora" and set(self.keys) & set(MEDIA_KEYS):
            raise InputError("DoRA adapts the decoder only; adapt the media projections with LoRA or full.")

    def layers(self, model) -> list:
        """The decoder layers this config adapts."""
        layers = model.language_model.layers
        return list(layers) if self.num_layers == -1 else list(layers[-self.num_layers :])


def apply(model, config: AdapterConfig):
    """Freeze `model` and swap adapters into it (in place) -> the model; its trainable parameters are
    then exactly the adapters' (or, with "full", the adapted layers' own weights)."""
    model.freeze()
    for layer in config.layers(model):
        if config.fine_tune_type == "full":
            _unfreeze(layer)
            continue
        swaps = [
            (name, _adapter(module, config))
            for name, module in layer.named_modules()
            if name in config.keys and isinstance(module, (nn.Linear, nn.QuantizedLinear))
        ]
        layer.update_modules(tree_unflatten(swaps))
    _apply_to_media(model, config)
    return model


def _apply_to_media(model, config: AdapterConfig) -> None:
    """Adapt (or, with "full", unfreeze) the media projections among config.keys that the model has."""
    wanted = [key for key in MEDIA_KEYS if key in config.keys]
    present = [(name, module) for name, module in model.named_modules() if name in wanted]
    if wanted and not present:
        raise InputError("This checkpoint has no patch or audio projection to adapt (a text-only model).")
    if config.fine_tune_type == "full":
        for _, module in present:
            _unfreeze(module)
        return
    model.update_modules(tree_unflatten([(name, _adapter(module, config)) for name, module in present]))


def _unfreeze(module: nn.Module) -> None:
    if any(isinstance(m, nn.QuantizedLinear) for _, m in module.named_modules()):
        raise InputError("A quantized model cannot train whole layers; use LoRA or DoRA (QLoRA).")
    module.unfreeze()


def _adapter(linear: nn.Module, config: AdapterConfig) -> nn.Module:
    if config.fine_tune_type == "lora":
        return LoRALinear.from_base(linear, r=config.rank, dropout=config.dropout, scale=config.scale)
    out_dims, in_dims = linear.weight.shape  # DoRALinear.from_base gets a quantized width wrong at 3, 5, 6 bits
    if isinstance(linear, nn.QuantizedLinear):
        in_dims = in_dims * 32 // linear.bits
    dora = DoRALinear(in_dims, out_dims, r=config.rank, dropout=config.dropout, scale=config.scale)
    dora.set_linear(linear)
    return dora


def adapter_weights(model) -> dict:
    """The weights an adapter file holds: the trainable ones, by their names in the model."""
    return dict(tree_flatten(model.trainable_parameters()))


def fuse(model, dequantize: bool = False):
    """Fold every adapter into the layer it wraps (in place) -> the model, with plain (or, over a
    quantized base, re-quantized unless `dequantize`) layers only."""
    swaps = [
        (name, module.fuse(dequantize=dequantize))
        for name, module in model.named_modules()
        if isinstance(module, (LoRALinear, DoRALinear))
    ]
    model.update_modules(tree_unflatten(swaps))
    return model
