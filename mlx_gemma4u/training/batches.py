"""Training examples -> padded batches, and the loss the model is trained on.

An example is one rendered conversation: its token ids, their mm_token_type_ids, its media arrays
(the processor's names) and `first_target`, the first token that counts in the loss (the prompt's
tokens before it are masked out). A batch pads its examples on the right, where no real token can
see the padding (attention is causal, and padding is in no image block), so the forward pass is
exactly the inference one with no attention mask; padding is also out of the loss.

    ids (B, L) -> inputs ids[:, :-1]; the trained targets: their flat positions in (B, L - 1)
    and their tokens, ids[:, 1:] there
    loss = mean(cross_entropy(head(hidden at those positions), their tokens))    (float32)

The output head runs for the trained positions only (a reply's tokens, not the prompt's), which is
most of a small model's training cost; the loss is the same as over all positions, masked.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from mlx_gemma4u.kernels import references_only
from mlx_gemma4u.media import KINDS


@dataclass
class Example:
    input_ids: np.ndarray  # (T,) int
    mm_token_type_ids: np.ndarray  # (T,) int
    first_target: int  # tokens before it are the prompt, masked out of the loss
    media: dict[str, np.ndarray] = field(default_factory=dict)  # the processor's arrays, batch of one

    def __len__(self) -> int:
        return len(self.input_ids)


@dataclass
class Batch:
    inputs: mx.array  # (B, L - 1) int32
    positions: mx.array  # (N,) flat positions in (B, L - 1) whose next token is trained
    targets: mx.array  # (N,) int32: those next tokens
    mm_token_type_ids: mx.array  # (B, L - 1)
    media: dict[str, mx.array]


def collate(examples: list[Example], pad_id: int = 0) -> Batch:
    """Right-pad `examples` into one Batch; their media are joined in row order (the order the
    model's soft tokens fill the placeholders), padded to the batch's widest."""
    length = max(len(e) for e in examples)
    ids = np.full((len(examples), length), pad_id, dtype=np.int32)
    types = np.zeros((len(examples), length), dtype=np.int32)
    trained = np.zeros((len(examples), length - 1), dtype=bool)
    for row, e in enumerate(examples):
        ids[row, : len(e)] = e.input_ids
        types[row, : len(e)] = e.mm_token_type_ids
        trained[row, max(e.first_target, 1) - 1 : len(e) - 1] = True
    positions = np.flatnonzero(trained)
    media = {}
    for kind in KINDS:
        rows = [e.media for e in examples if kind.values in e.media]
        if rows:
            media[kind.values] = _joined([r[kind.values] for r in rows], 0.0)
            media[kind.extra] = _joined([r[kind.extra] for r in rows], _padding(kind.extra))
    return Batch(
        inputs=mx.array(ids[:, :-1]),
        positions=mx.array(positions.astype(np.int32)),
        targets=mx.array(ids[:, 1:].reshape(-1)[positions]),
        mm_token_type_ids=mx.array(types[:, :-1]),
        media={k: mx.array(v) for k, v in media.items()},
    )


def _padding(name: str):
    """What pads a media array: position -1 for patch positions, 0 (not real) for an audio mask."""
    return -1 if name.endswith("position_ids") else 0


def _joined(arrays: list[np.ndarray], fill) -> np.ndarray:
    """(N_i, P_i, ...) arrays -> (sum N_i, max P_i, ...), each padded along axis 1 with `fill`."""
    widest = max(a.shape[1] for a in arrays)
    padded = [
        np.pad(a, [(0, 0), (0, widest - a.shape[1])] + [(0, 0)] * (a.ndim - 2), constant_values=fill) for a in arrays
    ]
    return np.concatenate(padded)


def loss(model, batch: Batch) -> tuple[mx.array, mx.array]:
    """The mean cross-entropy of the trained targets (float32) and how many there are. The fused
    kernels run their MLX references here: a Metal kernel has no gradient."""
    with references_only():
        hidden = model.hidden_states(batch.inputs, mm_token_type_ids=batch.mm_token_type_ids, **batch.media)
        logits = model.logits(hidden.reshape(-1, hidden.shape[-1])[batch.positions])
    losses = nn.losses.cross_entropy(logits.astype(mx.float32), batch.targets)
    return losses.mean(), mx.array(losses.size)
