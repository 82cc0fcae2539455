"""The training loss and its LoRA gradients against transformers 5.23.0, on a random tiny float32
checkpoint (the multimodal parity test's) and one right-padded batch of an image prompt, an audio
prompt and a text prompt, each with its first half masked out of the loss as a prompt.

Both sides run the same forward pass: ours with transformers' plain-forward vision mask
("hf-forward", what `model(**inputs, labels=...)` computes), adapters on every decoder projection
and on the patch and audio projections, each with the same A and B on both sides (B non-zero, so
both gradients are), transformers' LoRA written out as y = W x + s (x A) B.

Bounds, float32: loss within 1e-5 relative; each gradient matrix within 1e-4 of its largest entry.
Measured: loss 18.410124 against 18.410126 (1.1e-7 relative); gradients 2.5e-6 at most, relative
to each matrix's largest entry.
"""

import mlx.core as mx
import multimodal_inputs as mi
import numpy as np
import pytest
import reference
import torch
from mlx.utils import tree_flatten, tree_unflatten

from mlx_gemma4u.models import lora
from mlx_gemma4u.models.decoder import DecoderLayer
from mlx_gemma4u.training.batches import Example, collate, loss
from mlx_gemma4u.weights.loading import load_model

RANK, SCALE = 4, 2.0


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    model = reference.well_conditioned(seed=11)
    return model, reference.save(model, tmp_path_factory.mktemp("lora") / "saved")


@pytest.fixture(scope="module")
def examples(golden_dir) -> list[Example]:
    out = []
    for case in ("one_image", "audio"):
        c = mi.build_case(golden_dir, case)
        ids, types = c["input_ids"][0], c["mm_token_type_ids"][0]
        out.append(Example(ids, types, len(ids) // 2, c["media"]))
    text = np.random.default_rng(5).integers(3, reference.V - 20, 37)
    out.append(Example(text, np.zeros_like(text), 20))
    return out


def adapted(path, vision_mask: str, seed: int = 0):
    """Our model with adapters on every decoder projection and on the patch and audio projections,
    A and B random (seeded)."""
    keys = lora.DECODER_KEYS + lora.MEDIA_KEYS
    model = lora.apply(
        load_model(path, vision_mask=vision_mask),
        lora.AdapterConfig(num_layers=-1, rank=RANK, scale=SCALE, keys=keys),
    )
    rng = np.random.default_rng(seed)
    trainable = tree_flatten(model.trainable_parameters())
    model.update(
        tree_unflatten([(k, mx.array(rng.standard_normal(v.shape).astype(np.float32) * 0.1)) for k, v in trainable])
    )
    return model


class TorchLoRA(torch.nn.Module):
    def __init__(self, base: torch.nn.Linear, a: np.ndarray, b: np.ndarray):
        super().__init__()
        self.base = base
        self.a, self.b = torch.nn.Parameter(torch.from_numpy(a)), torch.nn.Parameter(torch.from_numpy(b))

    @property
    def weight(self):  # transformers reads the media projections' dtype from it
        return self.base.weight

    def forward(self, x):
        return self.base(x) + SCALE * ((x @ self.a) @ self.b)


def theirs(torch_model, ours_model, batch, examples) -> tuple[float, dict]:
    """transformers' loss and the gradient of every adapter matrix, named as ours."""
    model = torch_model
    model.requires_grad_(False)
    wrapped = {}
    for name, _ in tree_flatten(ours_model.trainable_parameters()):
        module_name = name.rsplit(".", 1)[0]  # language_model.layers.0.self_attn.q_proj, embed_audio...
        if module_name in wrapped:
            continue
        adapter = _get(ours_model, module_name)
        a, b = np.array(adapter.lora_a), np.array(adapter.lora_b)
        parent_name, attr = f"model.{module_name}".rsplit(".", 1)  # transformers' path is "model." + ours
        parent = model.get_submodule(parent_name)
        wrapped[module_name] = TorchLoRA(getattr(parent, attr), a, b)
        setattr(parent, attr, wrapped[module_name])
    length = max(len(e) for e in examples)
    ids = np.zeros((len(examples), length), dtype=np.int64)
    types = np.zeros_like(ids)
    attention = np.zeros_like(ids)
    labels = np.full_like(ids, -100)
    for row, e in enumerate(examples):
        ids[row, : len(e)], types[row, : len(e)], attention[row, : len(e)] = e.input_ids, e.mm_token_type_ids, 1
        labels[row, e.first_target : len(e)] = e.input_ids[e.first_target :]
    media = {k: torch.from_numpy(np.array(v)) for k, v in batch.media.items()}
    t = torch.from_numpy
    out = model(input_ids=t(ids), attention_mask=t(attention), mm_token_type_ids=t(types), labels=t(labels), **media)
    out.loss.backward()
    grads = {}
    for module_name, module in wrapped.items():
        grads[f"{module_name}.lora_a"] = module.a.grad.numpy()
        grads[f"{module_name}.lora_b"] = module.b.grad.numpy()
    for module_name, module in wrapped.items():  # put the plain layers back
        parent_name, attr = f"model.{module_name}".rsplit(".", 1)
        setattr(model.get_submodule(parent_name), attr, module.base)
    return float(out.loss.detach()), grads


def _get(module, dotted: str):
    for part in dotted.split("."):
        module = module[int(part)] if part.isdigit() else getattr(module, part)
    return module


def test_loss_and_lora_gradients_equal_transformers(checkpoint, examples):
    model = adapted(checkpoint[1], "hf-forward")
    batch = collate(examples)
    (value, n), grads = mx.value_and_grad(lambda params: _loss(model, params, batch))(model.trainable_parameters())
    ref_loss, ref_grads = theirs(checkpoint[0], model, batch, examples)
    assert n.item() == sum(len(e) - e.first_target for e in examples)
    assert abs(value.item() - ref_loss) <= 1e-5 * abs(ref_loss)
    ours = {k: np.array(v) for k, v in tree_flatten(grads)}
    assert set(ours) == set(ref_grads) and {k.rsplit(".", 1)[0] for k in ours} >= set(lora.MEDIA_KEYS)
    worst = max(np.abs(ours[k] - ref_grads[k]).max() / np.abs(ref_grads[k]).max() for k in ours)
    print(f"loss {value.item():.6f} vs {ref_loss:.6f}; worst relative gradient |Δ| {worst:.2e}")
    assert worst <= 1e-4


def _loss(model, params, batch):
    model.update(params)
    value, n = loss(model, batch)
    return value, n


def test_the_image_block_mask_matters_to_the_loss(checkpoint, examples):
    """Training sees the inference masks: the same batch with the image's block made causal (its
    tokens typed as text) gives another loss, under both vision-mask semantics."""
    batch = collate(examples)
    for semantics in ("gemma4", "hf-forward"):
        model = adapted(checkpoint[1], semantics)
        causal = collate([Example(e.input_ids, 0 * e.mm_token_type_ids, e.first_target, e.media) for e in examples])
        blocked, flat = loss(model, batch)[0].item(), loss(model, causal)[0].item()
        assert abs(blocked - flat) > 1e-3 * abs(blocked), semantics


def test_gradient_checkpointing_gives_the_same_loss_and_gradients(checkpoint, examples, monkeypatch):
    """Layers recomputed in the backward pass (--grad-checkpoint: each layer runs twice) give the
    loss and gradients of layers kept, through the KV-shared layers too (the tiny checkpoint's last
    two reuse keys and values). Measured: the same loss and gradients, to the last bit."""
    batch = collate(examples)
    model = adapted(checkpoint[1], "gemma4")
    layers = model.language_model.layers
    assert any(layer.self_attn.reuse for layer in layers)
    runs = []
    forward = DecoderLayer.forward
    monkeypatch.setattr(DecoderLayer, "forward", lambda self, *a, **k: runs.append(1) or forward(self, *a, **k))

    def run():
        runs.clear()
        (value, _), grads = mx.value_and_grad(lambda p: _loss(model, p, batch))(model.trainable_parameters())
        grads = {k: np.array(v) for k, v in tree_flatten(grads)}
        return value.item(), grads, len(runs)

    kept_loss, kept, kept_runs = run()
    model.language_model.checkpointed = True
    again_loss, again, again_runs = run()
    assert (kept_runs, again_runs) == (len(layers), 2 * len(layers))
    assert again_loss == pytest.approx(kept_loss, rel=1e-6)
    worst = max(np.abs(again[k] - kept[k]).max() / np.abs(kept[k]).max() for k in kept)
    print(f"loss {again_loss} vs {kept_loss}; worst relative gradient |Δ| {worst:.1e}")
    assert worst <= 1e-5
