"""One dispatch and self-check mechanism shared by every kernel.

A `Kernel` pairs a pure-MLX reference (what Linux, and any Mac whose kernel fails, runs) with a
builder for its Metal version, and is called like the reference:

    call --(forced off by MLX_GEMMA4U_KERNELS=reference|0, no Metal, or unsupported args)--> reference
         --(first call for this dtype and row size: build, run on a small random input, compare
            with the reference)--> Metal if it matched, else reference for the rest of the process

No Metal kernel can be run before it reaches a user's Mac, so each proves itself where it runs. A
kernel that fails to build or run, or whose output is off by more than the dtype's tolerance, is
switched off for the process with one warning line; it never takes the model down. Builders
create Metal objects only through `metal_kernel`, and are called only when `metal_available()`.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import mlx.core as mx

ENV = "MLX_GEMMA4U_KERNELS"
OFF_VALUES = ("reference", "0", "off")
# |metal - reference| <= tol * (1 + |reference|): a few units in the last place of each dtype.
TOLERANCE = {mx.float32: 1e-4, mx.float16: 4e-3, mx.bfloat16: 3e-2}
KERNELS: dict[str, Kernel] = {}
FLOATS = (mx.float32, mx.float16, mx.bfloat16)

# Metal helper for the row kernels (one threadgroup of TG threads per row): the sum of every
# thread's v, returned to all of them. `partial` is threadgroup scratch of TG / 32 floats.
ROW_SUM = """
template <int TG>
inline float row_sum(float v, threadgroup float* partial, uint lane, uint simd) {
    v = metal::simd_sum(v);
    if (lane == 0) { partial[simd] = v; }
    metal::threadgroup_barrier(metal::mem_flags::mem_threadgroup);
    float total = 0.0f;
    for (int i = 0; i < TG / 32; ++i) { total += partial[i]; }
    metal::threadgroup_barrier(metal::mem_flags::mem_threadgroup);
    return total;
}
"""


def metal_available() -> bool:
    """Whether Metal kernels can run here: Metal present and the GPU the default device. The one
    question asked of the machine; tests answer it differently to reach the Metal path."""
    return mx.metal.is_available() and mx.default_device() == mx.gpu


_references_only = 0  # > 0 inside `references_only()`


def forced_reference() -> bool:
    return _references_only > 0 or os.environ.get(ENV, "").strip().lower() in OFF_VALUES


@contextmanager
def references_only() -> Iterator[None]:
    """Every kernel called inside runs its MLX reference: what training differentiates, since a
    Metal kernel has no gradient."""
    global _references_only
    _references_only += 1
    try:
        yield
    finally:
        _references_only -= 1


def metal_kernel(name: str, inputs: list[str], outputs: list[str], source: str, header: str = "") -> Callable:
    """Create a Metal kernel object; the only place that does (compiling happens on its first call)."""
    return mx.fast.metal_kernel(
        name=f"gemma4u_{name}", input_names=inputs, output_names=outputs, source=source, header=header
    )


def row_threads(n: int) -> int:
    """Threads per row for a row of n values: about 4 values a thread, whole simdgroups, at most 256
    (which every pipeline allows, whatever its register use)."""
    return min(256, max(32, -(-n // 128) * 32))


def normal(shape: tuple, dtype, seed: int) -> mx.array:
    """Random check input from its own key, so a self-check leaves the global random state alone."""
    return mx.random.normal(shape, key=mx.random.key(seed)).astype(dtype)


class Kernel:
    """A fused operation: `reference(*args)` always works; the Metal version is used once proven.

    build() -> a function with the reference's signature that runs the Metal kernel.
    supports(*args) -> whether the Metal version handles these arguments (dtype, shapes).
    sample(*args) -> small random arguments like `args` (same dtype and row size) to check on.
    """

    def __init__(
        self,
        name: str,
        reference: Callable,
        build: Callable[[], Callable],
        supports: Callable[..., bool],
        sample: Callable[..., tuple],
    ):
        self.name, self.reference, self.build, self.supports, self.sample = name, reference, build, supports, sample
        self.checked: set[tuple] = set()  # (dtype, row size) pairs the Metal version has matched on
        self.disabled = False
        self._metal: Callable | None = None
        KERNELS[name] = self

    def __call__(self, *args):
        if self.uses_metal(*args):
            return self._metal(*args)
        return self.reference(*args)

    def uses_metal(self, *args) -> bool:
        """Whether these arguments go to Metal, self-checking first for a new dtype and row size
        (each is its own compiled instance of the kernel)."""
        if self.disabled or forced_reference() or not metal_available() or not self.supports(*args):
            return False
        key = (args[0].dtype, args[0].shape[-1])
        if key not in self.checked:
            error = self._self_check(key, args)
            if error is not None:
                self.disabled = True
                warnings.warn(
                    f"mlx-gemma4u: Metal kernel {self.name!r} switched off ({key[0]}, rows of "
                    f"{key[1]}): {error}; using the MLX reference.",
                    RuntimeWarning,
                    stacklevel=3,
                )
                return False
            self.checked.add(key)
        return True

    def reset(self) -> None:
        """Forget what the self-checks found (and the built kernel), as in a fresh process."""
        self.checked.clear()
        self.disabled = False
        self._metal = None

    def _self_check(self, key: tuple, args: tuple) -> str | None:
        """None if the Metal version builds, runs and matches the reference on small random
        arguments like `args`, else why not."""
        try:
            if self._metal is None:
                self._metal = self.build()
            small = self.sample(*args)
            return mismatch(self._metal(*small), self.reference(*small), TOLERANCE[key[0]])
        except Exception as e:  # a Metal compile or launch failure surfaces as any exception type
            return f"failed to run ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"


def mismatch(got, want, tol: float) -> str | None:
    """None if every output matches the reference within tol, else what is off."""
    got, want = (got, want) if isinstance(want, tuple) else ((got,), (want,))
    for g, w in zip(got, want, strict=True):
        if g.shape != w.shape or g.dtype != w.dtype:
            return f"returned {g.dtype}{tuple(g.shape)}, expected {w.dtype}{tuple(w.shape)}"
        g, w = g.astype(mx.float32), w.astype(mx.float32)
        ratio = (mx.abs(g - w) / (1 + mx.abs(w))).max().item()
        if not ratio <= tol:  # also catches NaN
            return f"differs from the reference by {ratio:.3g} (bound {tol:g})"
    return None
