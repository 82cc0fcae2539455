"""Random tiny Gemma 4 MTP assistants (Gemma4UnifiedAssistantForCausalLM) to test draft.py against.

transformers 5.23.0's `Gemma4UnifiedTextConfig.kv_sharing_modes` breaks the assistant path twice:
it raises when every layer is KV-shared (as every assistant's is), and for a target without KV-shared
layers (the real 12B) it marks no layer "store", so the target returns no shared keys and values. The
pin stays at 5.23.0 (the whole parity suite is verified against it); `kv_sharing_5_24` applies
5.24.0's property instead, for the tests that build an assistant.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import reference
import torch
from transformers import Gemma4UnifiedAssistantConfig, Gemma4UnifiedAssistantForCausalLM
from transformers.models.gemma4_unified.configuration_gemma4_unified import Gemma4UnifiedTextConfig

S, F = reference.S, reference.F


def _modes_5_24(self) -> list[str | None]:
    """5.24.0's rule: all layers shared -> all "reuse"; otherwise the last non-shared layer of each
    type "store"s (even with no layer reusing it) and the shared ones "reuse"."""
    n, shared = self.num_hidden_layers, self.num_kv_shared_layers
    if shared >= n:
        return ["reuse"] * n
    first = n - shared
    modes: list[str | None] = [None] * first + ["reuse"] * shared
    for t in set(self.layer_types):
        owners = [i for i in range(first) if self.layer_types[i] == t]
        if owners:
            modes[owners[-1]] = "store"
    return modes


@contextlib.contextmanager
def kv_sharing_5_24():
    """Within this block, transformers' Gemma 4 configs use 5.24.0's kv_sharing_modes."""
    old = Gemma4UnifiedTextConfig.kv_sharing_modes
    Gemma4UnifiedTextConfig.kv_sharing_modes = property(_modes_5_24)
    try:
        yield
    finally:
        Gemma4UnifiedTextConfig.kv_sharing_modes = old


def assistant_text(target_text: dict, hidden: int = 32, layers=(S, S, S, F), **overrides) -> dict:
    """A tiny assistant text config whose heads match the target's (it attends to the target's keys)."""
    t = {**reference.BASE_TEXT, **target_text}
    return dict(
        vocab_size=t["vocab_size"],
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=len(layers),
        layer_types=list(layers),
        num_attention_heads=t["num_attention_heads"],
        num_key_value_heads=t["num_key_value_heads"],
        head_dim=t["head_dim"],
        global_head_dim=t["global_head_dim"],
        num_global_key_value_heads=t["num_global_key_value_heads"],
        attention_k_eq_v=t.get("attention_k_eq_v", False),
        sliding_window=t["sliding_window"],
        max_position_embeddings=t["max_position_embeddings"],
        rope_parameters=t.get("rope_parameters"),
        final_logit_softcapping=None,
        use_bidirectional_attention=None,
        **overrides,
    )


def build_assistant(
    target_text: dict, seed: int = 0, ordered: bool = False, hidden: int = 32, num_centroids: int = 16, top_k: int = 4
) -> Gemma4UnifiedAssistantForCausalLM:
    """A random assistant for a target built from `target_text` (reference.BASE_TEXT overrides);
    `ordered`: the centroid head, with a random permutation as token_ordering."""
    torch.manual_seed(seed)
    with kv_sharing_5_24():
        config = Gemma4UnifiedAssistantConfig(
            text_config={"model_type": "gemma4_unified_text", **assistant_text(target_text, hidden)},
            backbone_hidden_size=reference.BASE_TEXT["hidden_size"],
            use_ordered_embeddings=ordered,
            num_centroids=num_centroids,
            centroid_intermediate_top_k=top_k,
        )
        model = Gemma4UnifiedAssistantForCausalLM(config).eval()
    reference.randomize(model, seed)
    if ordered:
        g = torch.Generator().manual_seed(seed)
        model.masked_embedding.token_ordering.copy_(torch.randperm(reference.V, generator=g))
    return model


def save(model, out: Path) -> Path:
    model.save_pretrained(out)
    return out


def passthrough(assistant, target) -> None:
    """Make `assistant` (hidden size = the target's) draft argmax(target head(target hidden state))."""
    D = assistant.config.backbone_hidden_size
    with torch.no_grad():
        assistant.pre_projection.weight.zero_()
        assistant.pre_projection.weight[:, D:] = torch.eye(D)
        assistant.post_projection.weight.copy_(torch.eye(D))
        assistant.model.norm.weight.fill_(1.0)
        assistant.model.embed_tokens.weight.copy_(target.model.language_model.embed_tokens.weight)
        for layer in assistant.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()


def repetitive_target(text: dict):
    """A transformers target whose post-norm scales are shrunk to 0.45, so it often repeats itself."""
    target = reference.build(text, seed=3)
    with torch.no_grad():
        for layer in target.model.language_model.layers:
            layer.post_attention_layernorm.weight.mul_(0.45)
            layer.post_feedforward_layernorm.weight.mul_(0.45)
    return target
