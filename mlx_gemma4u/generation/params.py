"""SamplingParams: how one reply is generated, checked once, wherever the settings come from.

Python keywords, the command line's flags, chat's /set and the server's JSON bodies all build a
SamplingParams; building it is the check, so a value is refused in one sentence before any work,
with the same bounds everywhere.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from mlx_lm.sample_utils import make_logits_processors, make_sampler

from mlx_gemma4u.errors import InputError
from mlx_gemma4u.generation.constraints import Constraint

SEEDS = range(2**64)  # the seeds mx.random.key takes
PENALTIES = {"repetition_penalty": (0.1, 10.0), "presence_penalty": (-2.0, 2.0), "frequency_penalty": (-2.0, 2.0)}
KV_BITS = (4, 8)


@dataclass(frozen=True)
class SamplingParams:
    """One reply's settings: sampling (0 turns top_p, top_k, min_p off; temperature 0 is greedy),
    penalties (None: off), stop strings, seed (None: the global random stream), the most new
    tokens, kv_bits (quantize the full-attention caches to 4 or 8 bits), thinking, and the
    response format the answer must match (any form Constraint.of takes; None: free text)."""

    max_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 0.0
    top_k: int = 0
    min_p: float = 0.0
    seed: int | None = None
    repetition_penalty: float | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    stop: tuple[str, ...] = ()
    kv_bits: int | None = None
    enable_thinking: bool = False
    response_format: Constraint | None = None

    def __post_init__(self) -> None:
        if isinstance(self.stop, str) or not (
            isinstance(self.stop, (list, tuple)) and all(isinstance(s, str) for s in self.stop)
        ):
            raise InputError(f"stop must be a list of strings, got {self.stop!r}.")
        object.__setattr__(self, "stop", tuple(self.stop))
        if not _whole(self.max_tokens) or self.max_tokens < 1:
            raise InputError(f"max_tokens must be a positive integer, got {self.max_tokens!r}.")
        for name in ("temperature", "top_p", "min_p"):
            if not _number(getattr(self, name)):
                raise InputError(f"{name} must be a finite number, got {getattr(self, name)!r}.")
        if self.temperature < 0:
            raise InputError(f"temperature must be 0 (greedy) or more, got {self.temperature}.")
        if not 0 <= self.top_p <= 1:
            raise InputError(f"top_p must be in [0, 1] (0 turns it off), got {self.top_p}.")
        if not _whole(self.top_k) or self.top_k < 0:
            raise InputError(f"top_k must be 0 (off) or a positive integer, got {self.top_k!r}.")
        if not 0 <= self.min_p < 1:
            raise InputError(f"min_p must be in [0, 1), got {self.min_p}.")
        if self.seed is not None and not (_whole(self.seed) and self.seed in SEEDS):
            raise InputError(f"seed must be a whole number from 0 to 2**64 - 1, got {self.seed!r}.")
        for name, (low, high) in PENALTIES.items():
            value = getattr(self, name)
            if value is not None and not (_number(value) and low <= value <= high):
                raise InputError(f"{name} must be a number from {low:g} to {high:g} (or unset), got {value!r}.")
        if self.kv_bits is not None and self.kv_bits not in KV_BITS:
            raise InputError(f"kv_bits must be 4 or 8 (or unset), got {self.kv_bits!r}.")
        if not isinstance(self.enable_thinking, bool):
            raise InputError(f"enable_thinking must be true or false, got {self.enable_thinking!r}.")
        object.__setattr__(self, "response_format", Constraint.of(self.response_format))

    @classmethod
    def split(cls, settings: dict[str, Any], base: SamplingParams | None = None) -> tuple[SamplingParams, dict]:
        """Keyword settings -> (their SamplingParams over `base`, the rest: the processor's options)."""
        own = {k: v for k, v in settings.items() if k in NAMES}
        params = dataclasses.replace(base, **own) if base is not None else cls(**own)
        return params, {k: v for k, v in settings.items() if k not in NAMES}

    def replace(self, **changes: Any) -> SamplingParams:
        """A copy with `changes`, checked like any other."""
        return dataclasses.replace(self, **changes)

    def sampler(self) -> Callable:
        return make_sampler(temp=self.temperature, top_p=self.top_p, top_k=self.top_k, min_p=self.min_p)

    def logits_processors(self) -> list:
        return make_logits_processors(
            repetition_penalty=self.repetition_penalty,
            presence_penalty=self.presence_penalty,
            frequency_penalty=self.frequency_penalty,
        )


NAMES = frozenset(f.name for f in dataclasses.fields(SamplingParams))


def _whole(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
