"""PromptCache: a conversation's KV caches and the tokens they hold, carried from turn to turn.

Its file records what the keys and values depend on besides the tokens (the config, quantization,
weight dtype and vision mask), so a cache is never loaded into a model it does not belong to. It
also keeps the soft tokens of the conversation's media (`SoftTokens`, in memory only), so a turn
after an image embeds only its new text.
"""

import dataclasses
import hashlib
import json
import os
from pathlib import Path

import mlx.core as mx
import numpy as np
from mlx.utils import tree_unflatten
from mlx_lm.models.cache import KVCache, QuantizedKVCache, save_prompt_cache

from mlx_gemma4u.errors import CheckpointError, InputError
from mlx_gemma4u.files import replacing
from mlx_gemma4u.media import KINDS
from mlx_gemma4u.models.cache import SlidingKVCache, can_rewind, rewind
from mlx_gemma4u.weights.headers import check_safetensors

FORMAT = "mlx-gemma4u prompt cache 2"
CACHE_TYPES = {c.__name__: c for c in (KVCache, QuantizedKVCache, SlidingKVCache)}
# What a cache's keys and values depend on besides its tokens, in the order a mismatch is reported.
FINGERPRINT = ("quantization", "dtype", "vision_mask", "config")


class SoftTokens:
    """The soft tokens of each image, video frame and audio clip of the last prompt, keyed by a hash of
    its processed arrays: the next turn, which re-renders the same media, takes them from here instead
    of running the embedders again. Media the latest prompt no longer has are let go."""

    def __init__(self):
        self._rows: dict[bytes, mx.array] = {}
        self.keys: list[bytes] = []  # the last prompt's media, in order: what its cached keys and values saw

    @staticmethod
    def keys_of(inputs: dict) -> list[bytes]:
        """The hashes of a prompt's images, video frames and audio clips, in order."""
        keys = []
        for kind in KINDS:
            values, extra = inputs.get(kind.values), inputs.get(kind.extra)
            for i in range(0 if values is None else values.shape[0]):
                keys.append(_digest(kind.name, values[i : i + 1], None if extra is None else extra[i : i + 1]))
        return keys

    def of(self, model, inputs: dict, keys: list[bytes]) -> dict[str, mx.array]:
        """Media kind -> (M, D) soft tokens, for the kinds of media in `inputs` (processor names;
        `keys`: their keys_of)."""
        rows, out = self._embedded(model, inputs, keys), {}
        ordered = iter(keys)
        for kind in KINDS:
            values = inputs.get(kind.values)
            if values is not None:
                parts = [rows[next(ordered)] for _ in range(values.shape[0])]
                out[kind.name] = mx.concatenate(parts) if len(parts) > 1 else parts[0]
        self._rows, self.keys = rows, keys
        return out

    def embed(self, model, inputs: dict) -> None:
        """Run the embedders on `inputs`' new media now (kept for `of`): where a model is split
        across processes, a request whose media fail to embed is then refused before the others
        hear of it."""
        rows = self._embedded(model, inputs, self.keys_of(inputs))
        mx.eval(rows)
        self._rows.update(rows)

    def _embedded(self, model, inputs: dict, keys: list[bytes]) -> dict[bytes, mx.array]:
        """Key -> (M, D) soft tokens of each of `inputs`' media: kept ones, or embedded now."""
        rows, ordered = {}, iter(keys)
        for kind in KINDS:
            values, extra = inputs.get(kind.values), inputs.get(kind.extra)
            for i in range(0 if values is None else values.shape[0]):  # one image, video frame or audio clip
                key = next(ordered)
                if key not in rows:
                    kept = self._rows.get(key)
                    row_extra = None if extra is None else extra[i : i + 1]
                    rows[key] = kept if kept is not None else model.soft_tokens(kind.name, values[i : i + 1], row_extra)
        return rows


def _digest(kind: str, *arrays: mx.array | None) -> bytes:
    """A hash of the kind and the arrays' shapes, dtypes and values (SHA-256, which CPUs accelerate)."""
    h = hashlib.sha256(kind.encode())
    for a in arrays:
        if a is not None:
            h.update(f"{a.shape}{a.dtype}".encode())
            h.update(memoryview(np.ascontiguousarray(a.view(mx.uint8))))  # bytes: numpy has no bfloat16
    return h.digest()


class PromptCache:
    """A conversation's KV caches and the tokens they hold, so turn N+1 prefills only its new tokens,
    and its media's soft tokens, so turn N+1 embeds only its new media."""

    def __init__(self, model, kv_bits: int | None = None):
        self.config = model.config.text
        self._model = model  # its fingerprint goes into a saved file
        self._fresh = model.make_cache
        self.caches = model.make_cache()
        self.tokens: list[int] = []
        self.kv_bits = kv_bits
        self.reused = 0  # tokens of the last prompt that were already cached
        self.media = SoftTokens()

    def reusable(self, ids: list[int], blocks: np.ndarray, media: list[bytes], first_media: int) -> int:
        """How many leading tokens of `ids` can stay cached: the common prefix, short of the last
        token (its logits are needed), never ending inside a vision block, and only if the caches
        can be trimmed back to it. Media placeholders are alike for any media, so unless the prompt's
        media (their hashes, `media`) are the cached prompt's, the prefix ends at the first one."""
        n = 0
        for a, b in zip(self.tokens, ids[:-1]):
            if a != b:
                break
            n += 1
        if media != self.media.keys:
            n = min(n, first_media)
        while 0 < n < len(ids) and blocks[n] >= 0 and blocks[n] == blocks[n - 1]:
            n -= 1
        surplus = len(self.tokens) - n
        if surplus and not all(can_rewind(c, surplus) for c in self.caches):
            return 0
        return n

    def keep(self, n: int) -> None:
        """Drop everything after the first n cached tokens (all of it when n is 0)."""
        if n == 0:
            self.caches, self.tokens = self._fresh(), []
            return
        for c in self.caches:
            rewind(c, len(self.tokens) - n)
        self.tokens = self.tokens[:n]

    def quantize(self) -> None:
        """Quantize the full-attention caches to kv_bits, if set (mlx-lm cannot quantize rotating ones,
        nor heads narrower than its smallest group of 32, which stay as they are)."""
        if self.kv_bits is None:
            return
        self.caches = [
            c.to_quantized(group_size=64 if c.keys.shape[-1] % 64 == 0 else 32, bits=self.kv_bits)
            if isinstance(c, KVCache) and c.keys is not None and c.keys.shape[-1] % 32 == 0
            else c
            for c in self.caches
        ]

    def save(self, path: str | os.PathLike) -> None:
        """Write the caches, their tokens and the model's fingerprint to a safetensors file at
        exactly `path` (any name), atomically: a failed save leaves nothing behind."""
        path = Path(path)
        if path.is_dir():
            raise InputError(f"{path} is a folder; give PromptCache.save a file name.")
        path.parent.mkdir(parents=True, exist_ok=True)
        with replacing(path, suffix=".safetensors") as tmp:
            save_prompt_cache(
                str(tmp), self.caches, {**model_fingerprint(self._model), "tokens": json.dumps(self.tokens)}
            )

    @classmethod
    def load(cls, path: str | os.PathLike, model) -> "PromptCache":
        """A cache written by `save`, refused unless it was made with this model's config,
        quantization, dtype and vision mask."""
        path = Path(path)
        _check_belongs(path, model_fingerprint(model))
        caches, metadata = _read(path)
        cache = cls(model)
        cache.caches, cache.tokens = caches, json.loads(metadata["tokens"])
        return cache


def model_fingerprint(model) -> dict[str, str]:
    """The FINGERPRINT entries of `model`, as the strings a cache file stores."""
    config = json.dumps(dataclasses.asdict(model.config), sort_keys=True, default=str)
    q = model.config.quantization
    return {
        "format": FORMAT,
        "quantization": f"{q.get('bits', 4)}-bit {q.get('mode', 'affine')}" if q else "none",
        "dtype": str(model.language_model.norm.weight.dtype).removeprefix("mlx.core."),
        "vision_mask": model.vision_mask,
        "config": hashlib.sha256(config.encode()).hexdigest()[:16],
    }


def _check_belongs(path: Path, wanted: dict[str, str]) -> None:
    """Refuse, in one sentence, a missing or foreign file or one saved from another model."""
    if path.is_dir():
        raise InputError(f"{path} is a folder, not a prompt cache file.")
    if not path.is_file():
        raise InputError(f"There is no prompt cache file at {path}.")
    try:
        check_safetensors(path)
        _, header = mx.load(str(path), format="safetensors", return_metadata=True)
    except (CheckpointError, RuntimeError, ValueError):
        raise InputError(f"{path} is not a prompt cache file (not a readable safetensors file).") from None
    saved = {k.removeprefix("0."): v for k, v in header.items() if k.startswith("0.")}
    if saved.get("format") != FORMAT or "tokens" not in saved:
        raise InputError(f"{path} was not written by PromptCache.save of this version; make a new cache.")
    for key in FINGERPRINT:
        if saved.get(key) != wanted[key]:
            raise InputError(
                f"{path} holds a prompt cache of another model (saved with {key.replace('_', ' ')} "
                f"{saved.get(key)}, this model has {wanted[key]}); start a new PromptCache."
            )


def _read(path: Path) -> tuple[list, dict]:
    """The caches and metadata of a file in mlx-lm's prompt-cache layout (save_prompt_cache: each
    cache's state, its class name, and which state entries were numbers or None)."""
    arrays, header = mx.load(str(path), format="safetensors", return_metadata=True)
    metadata, classes, scalars = tree_unflatten(list(header.items()))
    if any(name not in CACHE_TYPES for name in classes) or any(
        kind not in ("scalar", "none") for _, kind in scalars[1:]
    ):
        raise InputError(f"{path} holds a kind of cache this version does not make; make a new cache.")
    for key, kind in scalars[1:]:
        arrays[key] = arrays[key].item() if kind == "scalar" else None
    states = tree_unflatten(list(arrays.items()))
    caches = [CACHE_TYPES[name].from_state(state) for name, state in zip(classes, states)]
    mx.eval([c.state for c in caches])
    return caches, metadata
