"""The multimodal path against transformers 5.23.0 `Gemma4UnifiedForConditionalGeneration`.

One random tiny float32 checkpoint (reference.py's "full" text config plus the vision and audio
embedders), prompts rebuilt from transformers' own processor goldens (tests/support/multimodal_inputs.py).
Both vision-mask semantics (SPEC.md section 3.6) are checked against the transformers call that
defines them: "gemma4" against `model(..., attention_mask=model.create_masks_for_generate(...))`,
"hf-forward" against the plain `model(...)`. A left-padded batch gets generate()'s positions
(cumsum(mask) - 1) and the 2-D mask on both sides.

Bound: 1e-4, relative to max|logit| / 5 where logits exceed 5 (as in test_text_parity.py); here
max|logit| is about 28, so the bound is 5.5e-4 to 5.8e-4. Measured max |Δ|, gemma4 / hf-forward:
one_image 8.0e-5 / 8.7e-5, two_images 1.9e-4 / 1.5e-4, video 9.4e-5 / 9.6e-5, audio 7.4e-5 / 7.4e-5,
image_and_audio 1.6e-4 / 1.5e-4, batch_padded 1.0e-4 / 7.7e-5 (real positions only).

Conditioning. With reference.py's default norm weights, Gemma 4's scale-1.0 attention is so sharp
on these 50-150 token prompts that transformers' own float32 logits are 2.7e-4 to 3.6e-3 away from
its float64 logits, beyond the bound itself; q_norm / k_norm weights scaled by QK_NORM_SCALE bring
that drift to 3e-5..7e-5 while the final norm keeps logits in the softcap's non-linear range.
Images whose patches are nearly flat (the transparent border of rgba_chelsea) are ill-conditioned
too (LN1 divides by sqrt(var + 1e-5) ~ 3e-3), so the prompts use photographs without such patches.
"""

import mlx.core as mx
import multimodal_inputs as mi
import numpy as np
import pytest
import reference
import torch
from mlx.utils import tree_flatten

from mlx_gemma4u.errors import CheckpointError, InputError
from mlx_gemma4u.models.config import SLIDING
from mlx_gemma4u.weights.loading import load_model, read_weights

SEMANTICS = ("gemma4", "hf-forward")
CASES = ("one_image", "two_images", "video", "audio", "image_and_audio", "batch_padded")
STEPS = 20


def bound(ref: np.ndarray) -> float:
    return 1e-4 * max(1.0, float(np.abs(ref).max()) / 5)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """reference.py's well-conditioned "full" checkpoint (q_norm / k_norm weights scaled down)."""
    model = reference.well_conditioned(seed=11)
    return model, reference.save(model, tmp_path_factory.mktemp("multimodal") / "saved")


@pytest.fixture(scope="module")
def ours(checkpoint):
    return {semantics: load_model(checkpoint[1], vision_mask=semantics) for semantics in SEMANTICS}


@pytest.fixture(scope="module")
def cases(golden_dir):
    return {case: mi.build_case(golden_dir, case) for case in CASES}


def theirs(model, semantics: str, ids, types, mask, media: dict, keep: int = 0) -> np.ndarray:
    """transformers' logits (B, T or keep, V) under the given mask semantics."""
    B, T = ids.shape
    t = lambda a: torch.from_numpy(np.asarray(a))
    kwargs = {name: t(value) for name, value in media.items()}
    attention = position_ids = None
    if mask is not None:
        attention, position_ids = t(mask), t(np.clip(mask.cumsum(1) - 1, 0, None))
    if semantics == "gemma4":
        attention = model.create_masks_for_generate(
            config=model.config,
            inputs_embeds=torch.zeros(B, T, 1),
            past_key_values=None,
            attention_mask=attention if attention is not None else torch.ones(B, T, dtype=torch.long),
            position_ids=position_ids if position_ids is not None else torch.arange(T)[None],
            mm_token_type_ids=t(types),
        )
    with torch.no_grad():
        out = model(
            input_ids=t(ids),
            attention_mask=attention,
            position_ids=position_ids,
            mm_token_type_ids=t(types),
            logits_to_keep=keep,
            **kwargs,
        )
    return out.logits.float().numpy()


def mx_media(media: dict) -> dict:
    return {name: mx.array(value) for name, value in media.items()}


def mine(model, ids, types, mask, media: dict, cache=None) -> mx.array:
    return model(
        mx.array(ids, dtype=mx.int32),
        cache=cache,
        mm_token_type_ids=mx.array(types),
        attention_mask=None if mask is None else mx.array(mask),
        **mx_media(media),
    )


def real_positions(case: dict) -> np.ndarray:
    mask = case["attention_mask"]
    return np.ones(case["input_ids"].shape, bool) if mask is None else mask.astype(bool)


@pytest.mark.parametrize("semantics", SEMANTICS)
@pytest.mark.parametrize("name", CASES)
def test_logits_match_transformers(name, semantics, checkpoint, ours, cases):
    case = cases[name]
    args = case["input_ids"], case["mm_token_type_ids"], case["attention_mask"], case["media"]
    ref = theirs(checkpoint[0], semantics, *args)
    out = np.array(mine(ours[semantics], *args))
    real = real_positions(case)
    assert out.shape == ref.shape
    err = float(np.abs(out[real] - ref[real]).max())
    print(f"{name} {semantics}: max|Δ| {err:.2e} at max|logit| {np.abs(ref[real]).max():.1f}")
    assert err <= bound(ref[real])


def test_the_two_semantics_differ_on_vision_prompts(checkpoint, cases):
    """Guards against a vacuous pass: transformers' two mask definitions really disagree on vision
    prompts (so each parity test above pins one of them), and agree where there is no vision block."""
    model = checkpoint[0]
    for name in CASES:
        case = cases[name]
        args = case["input_ids"], case["mm_token_type_ids"], case["attention_mask"], case["media"]
        real = real_positions(case)
        gap = np.abs(theirs(model, "gemma4", *args) - theirs(model, "hf-forward", *args))[real].max()
        assert gap > 1e-2 if name != "audio" else gap < 1e-5, (name, gap)


@pytest.mark.parametrize("semantics", SEMANTICS)
@pytest.mark.parametrize("name", CASES)
def test_greedy_tokens_with_cache(name, semantics, checkpoint, ours, cases):
    """20 greedy tokens per row, our prefill + one-token decode steps through the caches, equal the
    argmax of transformers' full forward over the growing sequence (media every step, the new
    tokens typed 0), at every step."""
    case, model = cases[name], ours[semantics]
    ids, types, mask, media = case["input_ids"], case["mm_token_type_ids"], case["attention_mask"], case["media"]
    cache = model.make_cache()
    logits = mine(model, ids, types, mask, media, cache=cache)
    got, expected = [], []
    for _ in range(STEPS):
        got.append(np.array(mx.argmax(logits[:, -1], axis=-1)).tolist())
        token = theirs(checkpoint[0], semantics, ids, types, mask, media, keep=1)[:, -1].argmax(-1)
        expected.append(token.tolist())
        ids = np.concatenate([ids, token[:, None]], axis=1)
        types = np.pad(types, [(0, 0), (0, 1)])
        mask = None if mask is None else np.pad(mask, [(0, 0), (0, 1)], constant_values=1)
        logits = model(
            mx.array(token[:, None], dtype=mx.int32),
            cache=cache,
            attention_mask=None if mask is None else mx.array(mask),
        )
    assert got == expected


def first_sliding_layer(model, ids: mx.array, types: mx.array, media: dict) -> np.ndarray:
    """(T, D) output of decoder layer 0 (a sliding layer) for one prompt, no cache."""
    assert model.config.text.layers[0].layer_type == SLIDING
    h = model.embed(ids, **mx_media(media))
    return np.array(model.language_model.layers[0](h, model._step(ids.shape, None, None, types)))[0]


@pytest.mark.parametrize("semantics", SEMANTICS)
def test_one_patch_reaches_earlier_image_tokens_but_not_earlier_text(semantics, ours, cases):
    """Changing the image's last patch changes every earlier token of that image at the first
    sliding layer's output (bidirectional within the block, even 59 tokens back across a window of
    8) and nothing at the text before the image, there or in the final logits (causal)."""
    model, case = ours[semantics], cases["one_image"]
    ids, types = mx.array(case["input_ids"], dtype=mx.int32), mx.array(case["mm_token_type_ids"])
    image = np.flatnonzero(case["input_ids"][0] == mi.IMAGE)
    changed = {**case["media"], "pixel_values": case["media"]["pixel_values"].copy()}
    changed["pixel_values"][0, len(image) - 1] = np.random.default_rng(0).random(6912)
    layer_gap = np.abs(
        first_sliding_layer(model, ids, types, changed) - first_sliding_layer(model, ids, types, case["media"])
    ).max(-1)
    assert layer_gap[image[:-1]].min() > 1e-4
    assert layer_gap[: image[0]].max() == 0
    logit_gap = np.abs(
        np.array(model(ids, mm_token_type_ids=types, **mx_media(changed)))
        - np.array(model(ids, mm_token_type_ids=types, **mx_media(case["media"])))
    ).max(-1)[0]
    assert logit_gap[image[:-1]].min() > 1e-4
    assert logit_gap[: image[0]].max() == 0


@pytest.mark.parametrize("semantics", SEMANTICS)
@pytest.mark.parametrize("name", ["two_images", "video"])
def test_chunked_prefill_between_blocks_equals_one_pass(name, semantics, ours, cases):
    """A prompt embedded once and prefilled through the caches in chunks that end between vision
    blocks (right before a block, right after one, and in the text) gives one pass's logits."""
    model, case = ours[semantics], cases[name]
    ids, types = mx.array(case["input_ids"], dtype=mx.int32), mx.array(case["mm_token_type_ids"])
    vision = np.flatnonzero(case["mm_token_type_ids"][0] > 0)
    starts = vision[np.r_[True, np.diff(vision) > 1]]
    ends = vision[np.r_[np.diff(vision) > 1, True]] + 1
    cuts = sorted({0, int(starts[0]), int(ends[0]), int(ends[0]) + 2, int(starts[1]), int(ends[1]), ids.shape[1]})
    whole = np.array(model(ids, mm_token_type_ids=types, **mx_media(case["media"])))
    embeds = model.embed(ids, **mx_media(case["media"]))
    cache = model.make_cache()
    parts = [
        np.array(model(ids[:, a:b], cache=cache, inputs_embeds=embeds[:, a:b], mm_token_type_ids=types[:, a:b]))
        for a, b in zip(cuts, cuts[1:])
    ]
    assert np.abs(np.concatenate(parts, axis=1) - whole).max() <= bound(whole)


def test_rebuilt_patches_equal_the_golden_rows(golden_dir):
    """The PNG -> pixel_values mapping reproduces the rows transformers' processors stored."""
    from safetensors.numpy import load_file

    for name in ["landscape_rocket_640x427.jpg", "panorama_hubble_1000x100.webp"]:
        golden = load_file(str(golden_dir / "images" / f"{name}__t70.safetensors"))
        pixels, positions = mi.image_inputs(golden_dir, name)
        assert np.abs(pixels[0][golden["row_index"]] - golden["rows"]).max() < 1e-6
        n = mi.real_count(positions[0])
        width = positions[0, :n, 0].max() + 1
        assert np.array_equal(positions[0, :n], np.stack([np.arange(n) % width, np.arange(n) // width], 1))
    video = mi.video_prompt(golden_dir)
    golden = load_file(str(golden_dir / "videos" / f"{mi.VIDEO_CLIP}.safetensors"))
    for i, frame in enumerate(mi.VIDEO_FRAMES):
        n = mi.real_count(video["media"]["video_position_ids"][i])
        rows = video["media"]["pixel_values_videos"][i][[0, n - 1]]
        assert np.abs(rows - golden[f"rows_frame{frame:02d}"]).max() < 1e-6


# ---- bad inputs -------------------------------------------------------------------------------


@pytest.fixture
def image_case(ours, cases):
    case = cases["one_image"]
    return ours["gemma4"], mx.array(case["input_ids"], dtype=mx.int32), dict(case["media"])


@pytest.mark.parametrize(
    "pixels, message",
    [
        (
            np.zeros((1, 70, 6911), np.float32),
            r"pixel_values must have shape \(images, patches, 6912\), got \(1, 70, 6911\)",
        ),
        (np.zeros((70, 6912), np.float32), r"pixel_values must have shape \(images, patches, 6912\), got \(70, 6912\)"),
        (
            np.zeros((1, 70, 6912), np.uint8),
            r"pixel_values must be floating point \(pixels scaled to \[0, 1\]\), got .*uint8",
        ),
        (np.zeros((1, 69, 6912), np.float32), r"position ids must have shape \(1, 69, 2\)"),
    ],
)
def test_bad_pixel_values(pixels, message, image_case):
    model, ids, media = image_case
    with pytest.raises(InputError, match=message):
        model(ids, pixel_values=mx.array(pixels), image_position_ids=mx.array(media["image_position_ids"]))


@pytest.mark.parametrize(
    "value, message",
    [
        (64, r"must lie in \[0, 64\) \(or be -1 for padding\); got values from -1 to 64"),
        (-2, r"must lie in \[0, 64\) .*got values from -2 to"),
    ],
)
def test_position_ids_outside_the_table(value, message, image_case):
    model, ids, media = image_case
    positions = media["image_position_ids"].copy()
    positions[0, 3, 0] = value
    with pytest.raises(InputError, match=message):
        model(ids, pixel_values=mx.array(media["pixel_values"]), image_position_ids=mx.array(positions))


def test_pixels_without_positions(image_case):
    model, ids, media = image_case
    with pytest.raises(InputError, match="image pixel values need their image_position_ids"):
        model(ids, pixel_values=mx.array(media["pixel_values"]))


def test_more_soft_tokens_than_placeholders(image_case):
    model, ids, media = image_case
    fewer = np.array(ids)
    fewer[0, np.flatnonzero(fewer[0] == mi.IMAGE)[0]] = 7
    with pytest.raises(InputError, match="59 image placeholder tokens but the image inputs give 60 soft tokens"):
        model(mx.array(fewer), **mx_media(media))


def test_audio_frames_of_the_wrong_size_or_count(ours, cases):
    model, case = ours["gemma4"], cases["audio"]
    ids, media = mx.array(case["input_ids"], dtype=mx.int32), case["media"]
    with pytest.raises(InputError, match=r"input_features must have shape \(clips, frames, 640\), got \(1, 73, 320\)"):
        model(ids, input_features=mx.zeros((1, 73, 320)), input_features_mask=mx.array(media["input_features_mask"]))
    more = np.concatenate([media["input_features"], media["input_features"][:, :1]], axis=1)
    with pytest.raises(InputError, match="73 audio placeholder tokens but the audio inputs give 74 soft tokens"):
        model(ids, input_features=mx.array(more), input_features_mask=mx.ones(more.shape[:2], dtype=mx.bool_))


# ---- checkpoint keys --------------------------------------------------------------------------


def test_sanitize_maps_every_saved_and_in_memory_key(checkpoint, ours):
    model = ours["gemma4"]
    saved = read_weights(checkpoint[1])
    assert {
        "model.embed_vision.embedding_projection.weight",
        "model.embed_audio.embedding_projection.weight",
        "model.vision_embedder.pos_embedding",
        "model.vision_embedder.patch_dense.weight",
    } <= set(saved)
    expected = set(dict(tree_flatten(model.parameters())))
    mapped = model.sanitize(saved)
    assert len(mapped) == len(saved) and set(mapped) == expected
    assert (
        mapped["embed_vision.multimodal_embedder.embedding_projection.weight"]
        is saved["model.embed_vision.embedding_projection.weight"]
    )
    assert mapped["embed_vision.pos_embedding"] is saved["model.vision_embedder.pos_embedding"]
    in_memory = {k: mx.array(v.numpy()) for k, v in checkpoint[0].state_dict().items()}
    assert set(model.sanitize(in_memory)) == expected  # tied lm_head.weight dropped


@pytest.mark.parametrize(
    "key",
    [
        "model.vision_embedder.patch_ln3.weight",
        "model.embed_audio.extra.weight",
        "model.embed_vision.embedding_projection.bias",
    ],
)
def test_sanitize_names_an_unknown_key(key, checkpoint, ours):
    saved = {**read_weights(checkpoint[1]), key: mx.zeros((3,))}
    with pytest.raises(CheckpointError, match=f"'{key}'".replace(".", r"\.")):
        ours["gemma4"].sanitize(saved)


def test_bfloat16_is_no_further_from_float32_than_transformers_bfloat16(checkpoint, cases):
    """Image + audio + text in bfloat16 (pixels and frames rounded to bf16 first, norm statistics in
    float32, as transformers does): our error against the float32 truth is at most 1.5x
    transformers' own bf16 error, in max and mean |Δ|. Measured, ours / transformers: max 1.34 / 1.21,
    mean 0.158 / 0.144 (at max|logit| about 28)."""
    import copy

    torch_model, path = checkpoint
    case = cases["image_and_audio"]
    args = (case["input_ids"], case["mm_token_type_ids"], case["attention_mask"], case["media"])
    truth = theirs(torch_model, "gemma4", *args)
    their_error = theirs(copy.deepcopy(torch_model).to(torch.bfloat16), "gemma4", *args) - truth
    out = mine(load_model(path, dtype="bfloat16"), *args)
    assert out.dtype == mx.bfloat16
    our_error = np.array(out.astype(mx.float32)) - truth
    assert np.abs(our_error).max() <= 1.5 * np.abs(their_error).max()
    assert np.abs(our_error).mean() <= 1.5 * np.abs(their_error).mean()


@pytest.mark.parametrize("name", ["one_image", "two_images", "video", "audio"])
def test_float32_is_as_close_to_float64_as_transformers_float32(name, checkpoint, ours, cases):
    """Against transformers in float64, our float32 logits are at most 1.5x as far off as transformers'
    float32 ones, in max and mean |Δ|. Measured, max / mean ratio: one_image 1.05 / 0.99, two_images
    1.18 / 1.08, video 0.82 / 1.07, audio 1.07 / 1.04 (before the patch LayerNorm's mean correction and
    the patch Dense's summing in pieces: 2.17 / 1.82, 3.28 / 2.53, 1.43 / 1.79, 1.23 / 1.18)."""
    import copy

    case = cases[name]
    args = case["input_ids"], case["mm_token_type_ids"], case["attention_mask"]
    media64 = {k: v.astype(np.float64) if v.dtype == np.float32 else v for k, v in case["media"].items()}
    truth = theirs(copy.deepcopy(checkpoint[0]).double(), "gemma4", *args, media64)
    their_error = np.abs(theirs(checkpoint[0], "gemma4", *args, case["media"]) - truth)
    our_error = np.abs(np.array(mine(ours["gemma4"], *args, case["media"])) - truth)
    assert our_error.max() <= 1.5 * their_error.max()
    assert our_error.mean() <= 1.5 * their_error.mean()
