"""Fused kernels for the operations Gemma 4 runs on every token of every layer.

Each module holds one Metal kernel (`mx.fast.metal_kernel` source) beside its pure-MLX reference,
and exposes a `Kernel` called like the reference: the Metal version runs only where Metal is
available and it has passed a self-check against the reference in this process (dispatch.py).
`MLX_GEMMA4U_KERNELS=reference` forces the references everywhere; `references_only()` within a block
(training, whose gradients only the references have).
"""

from mlx_gemma4u.kernels.dispatch import references_only
from mlx_gemma4u.kernels.gelu_mul import gelu_mul
from mlx_gemma4u.kernels.norm_rope import norm_rope
from mlx_gemma4u.kernels.position_norm import position_norm
from mlx_gemma4u.kernels.residual_norm import residual_norm
from mlx_gemma4u.kernels.softcap import softcap

__all__ = ["gelu_mul", "norm_rope", "position_norm", "references_only", "residual_norm", "softcap"]
