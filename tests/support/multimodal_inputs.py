"""Multimodal test prompts rebuilt from transformers' own processor goldens (../shared/fixtures/golden).

The goldens hold real-vocabulary token ids, mm_token_type_ids and patch positions, and each resized
image as a PNG. Here they become inputs for the tiny checkpoints of tests/support/reference.py:

- pixels: the PNG cut into 48x48 blocks in raster order (y outer, x inner), each block flattened
  HWC and divided by 255, padded with zero rows at position (-1, -1) to the golden's max_patches;
- token ids: the special ids mapped onto the tiny vocabulary's (reference.SPECIAL_IDS), every other
  id folded into the ordinary range [3, V - 16);
- placeholder runs: resized to the soft-token count of the budget-70 image used in their place, so
  prompts stay short (the prompt goldens were made at the default budget of 280), and the audio run
  of image_and_audio to the frames of AUDIO_CLIP.

A case is a dict: input_ids and mm_token_type_ids (B, T) int64, attention_mask (B, T) or None, and
`media`: the numpy arrays named as transformers' forward takes them.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import reference
from PIL import Image
from safetensors.numpy import load_file

PATCH = 48
REAL_IDS = dict(
    boi_token_id=255999,
    eoi_token_id=258882,
    image_token_id=258880,
    video_token_id=258884,
    boa_token_id=256000,
    eoa_token_index=258883,
    audio_token_id=258881,
)
TINY = {REAL_IDS[name]: tiny for name, tiny in reference.SPECIAL_IDS.items()}
IMAGE, VIDEO, AUDIO = (reference.SPECIAL_IDS[n] for n in ("image_token_id", "video_token_id", "audio_token_id"))
PROMPT_IMAGES = {
    "one_image": ["landscape_rocket_640x427.jpg"],
    "two_images": ["portrait_grace_hopper_512x600.jpg", "panorama_hubble_1000x100.webp"],
    "image_and_audio": ["portrait_grace_hopper_512x600.jpg"],
    "batch_padded": ["tiny_coffee_40x27.png"],
}
AUDIO_CLIP = "speech_22050_mono.flac"  # "What is the capital of France?", 46 frames
VIDEO_CLIP, VIDEO_FRAMES = "pan_coffee_240x160_15fps_2s_vp9.webm__f8", (0, 7)


def remap(ids: np.ndarray) -> np.ndarray:
    """Real Gemma 4 ids -> ids of the tiny vocabulary (pad/bos/eos 0/1/2 and the specials kept apart)."""
    ids = np.asarray(ids, dtype=np.int64)
    folded = np.where(ids < 3, ids, 3 + (ids - 3) % (reference.V - 19))
    for real, tiny in TINY.items():
        folded = np.where(ids == real, tiny, folded)
    return folded


def patches(png: Path, positions: np.ndarray) -> np.ndarray:
    """A resized image (PNG) and its golden (P, 2) positions -> (P, 6912) float32 pixel_values rows."""
    image = np.asarray(Image.open(png).convert("RGB"), dtype=np.float32) / 255.0
    rows_y, cols_x = image.shape[0] // PATCH, image.shape[1] // PATCH
    blocks = image.reshape(rows_y, PATCH, cols_x, PATCH, 3).transpose(0, 2, 1, 3, 4).reshape(rows_y * cols_x, -1)
    out = np.zeros((len(positions), blocks.shape[1]), np.float32)
    out[: len(blocks)] = blocks
    return out


def image_inputs(golden: Path, name: str) -> tuple[np.ndarray, np.ndarray]:
    """Budget-70 image `name` -> pixel_values (1, 70, 6912) and image_position_ids (1, 70, 2)."""
    stem = golden / "images" / f"{name}__t70"
    positions = load_file(f"{stem}.safetensors")["image_position_ids"].astype(np.int64)
    return patches(Path(f"{stem}.png"), positions)[None], positions[None]


def real_count(positions: np.ndarray) -> int:
    return int(np.all(positions != -1, axis=-1).sum())


def resize_runs(ids: np.ndarray, types: np.ndarray, token: int, lengths: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """Replace the k-th maximal run of `token` in a 1-D prompt by lengths[k] copies of it."""
    out_ids, out_types, k, i = [], [], 0, 0
    while i < len(ids):
        if ids[i] != token:
            out_ids.append(ids[i])
            out_types.append(types[i])
            i += 1
            continue
        j = i
        while j < len(ids) and ids[j] == token:
            j += 1
        out_ids += [token] * lengths[k]
        out_types += [types[i]] * lengths[k]
        k, i = k + 1, j
    assert k == len(lengths), f"the prompt has {k} runs of {token}, not {len(lengths)}"
    return np.array(out_ids, np.int64), np.array(out_types, np.int64)


def left_pad(rows: list[tuple[np.ndarray, np.ndarray]]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-row (ids, types) -> left-padded input_ids, mm_token_type_ids, attention_mask (B, T)."""
    width = max(len(ids) for ids, _ in rows)
    ids = np.zeros((len(rows), width), np.int64)
    types, mask = np.zeros_like(ids), np.zeros_like(ids)
    for b, (row_ids, row_types) in enumerate(rows):
        ids[b, width - len(row_ids) :] = row_ids
        types[b, width - len(row_ids) :] = row_types
        mask[b, width - len(row_ids) :] = 1
    return ids, types, mask


def image_prompt(golden: Path, case: str) -> dict:
    """A prompt golden with budget-70 images in place of its default-budget ones."""
    arrays = load_file(str(golden / "prompts" / f"{case}.safetensors"))
    images = [image_inputs(golden, name) for name in PROMPT_IMAGES[case]]
    counts = [real_count(pos[0]) for _, pos in images]
    audio = audio_inputs(golden, AUDIO_CLIP)
    rows = []
    for ids, types, mask in zip(arrays["input_ids"], arrays["mm_token_type_ids"], arrays["attention_mask"]):
        ids, types = remap(ids[mask == 1]), types[mask == 1].astype(np.int64)
        n_runs = len(np.flatnonzero(np.diff(np.r_[0, ids == IMAGE]) == 1))
        ids, types = resize_runs(ids, types, IMAGE, counts[:n_runs])
        if case == "image_and_audio":
            ids, types = resize_runs(ids, types, AUDIO, [int(audio["input_features_mask"].sum())])
        rows.append((ids, types))
        counts = counts[n_runs:]
    input_ids, types, mask = left_pad(rows)
    media = dict(
        pixel_values=np.concatenate([pv for pv, _ in images]),
        image_position_ids=np.concatenate([pos for _, pos in images]),
    )
    if case == "image_and_audio":
        media.update(audio)
    return dict(
        input_ids=input_ids, mm_token_type_ids=types, attention_mask=mask if len(rows) > 1 else None, media=media
    )


def audio_inputs(golden: Path, name: str) -> dict:
    arrays = load_file(str(golden / "audio" / f"{name}.safetensors"))
    return dict(
        input_features=arrays["input_features"][None], input_features_mask=arrays["input_features_mask"][None] == 1
    )


def audio_prompt(golden: Path, name: str = "speech_16k_mono.wav") -> dict:
    """The audio golden's own prompt ("Transcribe: <audio>") with its raw 640-sample frames."""
    arrays = load_file(str(golden / "audio" / f"{name}.safetensors"))
    return dict(
        input_ids=remap(arrays["input_ids"])[None],
        mm_token_type_ids=arrays["mm_token_type_ids"][None].astype(np.int64),
        attention_mask=None,
        media=audio_inputs(golden, name),
    )


def video_prompt(golden: Path) -> dict:
    """The f8 video golden cut after its second frame block; the frames are the golden's first and
    last (the PNGs it keeps), each with its own 60 placeholders and positions."""
    arrays = load_file(str(golden / "videos" / f"{VIDEO_CLIP}.safetensors"))
    ids, types = remap(arrays["input_ids"]), arrays["mm_token_type_ids"].astype(np.int64)
    second_end = np.flatnonzero(ids == reference.SPECIAL_IDS["eoi_token_id"])[len(VIDEO_FRAMES) - 1]
    positions = arrays["video_position_ids"][list(VIDEO_FRAMES)].astype(np.int64)
    pixels = np.stack(
        [patches(golden / "videos" / f"{VIDEO_CLIP}__frame{f:02d}.png", pos) for f, pos in zip(VIDEO_FRAMES, positions)]
    )
    media = dict(
        pixel_values_videos=pixels, video_position_ids=positions, num_frames_per_video=np.array([len(VIDEO_FRAMES)])
    )
    return dict(
        input_ids=ids[None, : second_end + 1],
        mm_token_type_ids=types[None, : second_end + 1],
        attention_mask=None,
        media=media,
    )


def build_case(golden: Path, case: str) -> dict:
    if case == "video":
        return video_prompt(golden)
    if case == "audio":
        return audio_prompt(golden)
    return image_prompt(golden, case)
