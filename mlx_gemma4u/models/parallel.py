"""The model across processes (mx.distributed): pipeline stages and tensor-parallel layers.

Pipeline, `pipeline(text_model, group)`: rank r of N runs the decoder layers [start_r, end_r), in order.

    rank 0      embeddings (text and media soft tokens) -> its layers -> send (h, n) to rank 1
    rank r      receive (h, n) -> its layers -> send to rank r + 1
    rank N - 1  receive -> its layers -> final norm -> all_sum: every rank gets the hidden states

h is the residual stream and n its next input norm (the fused residual_norm of the sender's last
layer, so the receiver's first layer sees exactly what one process would). The last rank's result
reaches every rank through an all_sum in which the others add zeros, so each rank computes the same
logits and samples the same token. A split never separates a KV-shared layer from the layer whose
keys and values it reads (`split`). Each rank holds its layers, the next rank's first input norm,
the token embedding (also the output head) and the final norm; only rank 0 the media embedders.
Per token and boundary: 2 x D values of the model's dtype sent, and one all_sum of D at the end.
An MTP drafter reads the keys and values of the last layer of each type that computes them: the
process holding both drafts (`Stage.drafter_rank`), and its K tokens per row reach the others in
one all_sum of K int32 values per round.

Tensor parallel, `shard(text_model, group)`: in every layer, q/k/v and gate/up become
all-to-sharded (each rank computes its share of the heads and of the MLP's hidden units), o and
down sharded-to-all (their products summed across ranks: two all_sums of D values per layer and
token). A layer with fewer key-value heads than ranks (a full layer with one shared key-value head)
keeps its k/v projections whole on every rank. The sums' order differs from one process's, so the
result differs in rounding, not in meaning. A drafter is split the same way (its queries attend to
the key-value heads this rank holds), so every rank drafts the same tokens.

Whatever a process decides alone (a seed, a draft length timed on its own clock) is taken from
rank 0 (`from_first`), so that every process runs the same steps.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
from mlx.nn.layers.distributed import shard_linear

from mlx_gemma4u.errors import InputError
from mlx_gemma4u.models.config import TextConfig


def split(config: TextConfig, size: int) -> list[int]:
    """The first layer of each of `size` pipeline stages: as even as the layers allow, every stage
    keeping each KV-shared layer with the layer it reads from."""
    n = len(config.layers)
    base, extra = divmod(n, size)
    starts = [r * base + min(r, extra) for r in range(size)]
    for r in range(1, size):
        while starts[r] > starts[r - 1] and not _can_start_at(config, starts[r]):
            starts[r] -= 1
        if starts[r] <= starts[r - 1] or starts[r] >= n:
            raise InputError(
                f"{size} processes cannot split the {n} decoder layers into pipeline stages (each stage needs "
                "a layer, and a KV-shared layer must stay with the layer it reads from); use fewer processes."
            )
    return starts


def _can_start_at(config: TextConfig, start: int) -> bool:
    return all(spec.kv_source >= start for spec in config.layers[start:] if spec.kv_mode == "reuse")


def from_first(value: int, group) -> int:
    """Rank 0's `value` (a whole number below 2**31), on every rank of `group`."""
    return int(mx.distributed.all_sum(mx.array(value if group.rank() == 0 else 0), group=group).item())


class Stage:
    """This process's part of a pipeline: decoder layers [start, end) of `group`'s rank. drafter_rank:
    the rank holding the keys and values a drafter reads (None: no one rank holds them all)."""

    def __init__(self, group, start: int, end: int, drafter_rank: int | None = None):
        self.group, self.start, self.end, self.drafter_rank = group, start, end, drafter_rank
        self.rank, self.size = group.rank(), group.size()

    def from_rank(self, x: mx.array, rank: int) -> mx.array:
        """`x` as rank `rank` computed it, on every rank (the others pass anything of its shape)."""
        return mx.distributed.all_sum(x if self.rank == rank else mx.zeros_like(x), group=self.group)

    def receive(self, shape: tuple, dtype: mx.Dtype) -> tuple[mx.array, mx.array]:
        """The residual stream and its input norm, (B, T, D) each, from the previous rank."""
        both = mx.distributed.recv((*shape[:-1], 2 * shape[-1]), dtype, self.rank - 1, group=self.group)
        return both[..., : shape[-1]], both[..., shape[-1] :]

    def hand_over(self, h: mx.array, normed: mx.array, shape: tuple) -> mx.array:
        """(h, normed) to the next rank; -> the final hidden states `shape`, on every rank."""
        if self.rank == self.size - 1:
            return mx.distributed.all_sum(normed, group=self.group)
        sent = mx.distributed.send(mx.concatenate([h, normed], axis=-1), self.rank + 1, group=self.group)
        return mx.distributed.all_sum(mx.depends(mx.zeros(shape, h.dtype), sent), group=self.group)


class InputNorm(nn.Module):
    """What a stage keeps of the next stage's first layer: its input norm, which the stage's own last
    layer applies to its output (the fused post-norm, residual and next norm)."""

    def __init__(self, norm: nn.Module):
        super().__init__()
        self.input_layernorm = norm


def pipeline(text_model, group) -> None:
    """Keep only this rank's stage of `text_model` (in place, before its weights are loaded)."""
    starts = split(text_model.config, group.size())
    rank, n = group.rank(), len(text_model.layers)
    bounds = list(zip(starts, starts[1:] + [n]))
    start, end = bounds[rank]
    kept = [layer if start <= i < end else None for i, layer in enumerate(text_model.layers)]
    if end < n:
        kept[end] = InputNorm(text_model.layers[end].input_layernorm)
    text_model.layers = kept
    owners = {spec.layer_type: i for i, spec in enumerate(text_model.config.layers) if spec.kv_mode != "reuse"}
    holders = [r for r, (a, b) in enumerate(bounds) if all(a <= i < b for i in owners.values())]
    text_model.stage = Stage(group, start, end, holders[0] if holders else None)


def shard(text_model, group) -> None:
    """Split every layer's heads and MLP across `group` (in place, after the weights are loaded)."""
    size = group.size()
    heads = text_model.config.num_attention_heads
    if heads % size:
        raise InputError(f"{size} processes cannot share the {heads} attention heads evenly; use a divisor of {heads}.")
    for layer in text_model.layers:
        attn, mlp = layer.self_attn, layer.mlp
        _replace(attn, "q_proj", "all-to-sharded", group)
        if 1 < attn.n_kv_heads < size:
            raise InputError(f"{size} processes cannot share {attn.n_kv_heads} key-value heads; use at most that many.")
        if "k_proj" in attn and attn.n_kv_heads >= size:
            if attn.n_kv_heads % size:
                raise InputError(f"{size} processes cannot share {attn.n_kv_heads} key-value heads evenly.")
            for name in ("k_proj", "v_proj"):
                _replace(attn, name, "all-to-sharded", group)
            attn.n_kv_heads //= size
        elif attn.n_kv_heads >= size:  # a KV-shared layer: the keys its source layer kept, sharded there
            attn.n_kv_heads //= size
        attn.n_heads //= size
        _replace(attn, "o_proj", "sharded-to-all", group)
        for name in ("gate_proj", "up_proj"):
            _replace(mlp, name, "all-to-sharded", group)
        _replace(mlp, "down_proj", "sharded-to-all", group)


def _replace(parent: nn.Module, name: str, sharding: str, group) -> None:
    if name in parent:
        setattr(parent, name, shard_linear(getattr(parent, name), sharding, group=group))
