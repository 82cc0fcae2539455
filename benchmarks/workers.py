"""One implementation, one checkpoint, one dtype, in a process of its own (so peak memory is its own).

    python -m benchmarks.workers JOB.json

The job names the implementation ("ours", "ours-1core": ours with the CPU-core cut off, set by the
harness through MLX_GEMMA4U_CPU_CORES; "mlx-vlm", "transformers"), the checkpoint folder, the
dtype ("float32", "bfloat16", "4bit"), the inputs file (an .npz the harness wrote once: the same
token ids and processor arrays for every implementation) and what to do:

    "timing": load; warm up on a short prompt (not counted); then time to first token for the
              text, image and audio prompts, and for each prefill length the time to first token
              plus the decode rate over the next tokens (each implementation's own greedy loop)
    "logits": one plain forward pass per prompt, the last positions' logits saved as float32

It writes a JSON record to the job's "out" path: figures in seconds, tokens/s and MB.
"""

from __future__ import annotations

import json
import resource
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np

GROUP_SIZE, BITS = 64, 4
LOGIT_POSITIONS = 8


def quantizable(path: str, module) -> bool:
    """The layers both MLX implementations quantize to 4 bits: the text model's linears and embedding."""
    return "language_model" in path and hasattr(module, "to_quantized") and module.weight.shape[-1] % GROUP_SIZE == 0


def quantize(model) -> None:
    """Both MLX implementations' text layers to 4 bits, evaluated layer by layer: the peak is then
    the float weights plus one layer's quantized copy, the same every run (evaluated all at once it
    moved by 0.1 MB with the evaluation order, more than ours and mlx-vlm's differ)."""
    import mlx.core as mx
    import mlx.nn as nn

    nn.quantize(model, group_size=GROUP_SIZE, bits=BITS, class_predicate=quantizable)
    for _, module in model.named_modules():
        if isinstance(module, (nn.QuantizedLinear, nn.QuantizedEmbedding)):
            mx.eval(module.parameters())


def cases(inputs: dict) -> dict[str, dict[str, np.ndarray]]:
    """The npz's flat keys ("image.pixel_values", ...) -> {prompt name: {array name: array}}."""
    out: dict[str, dict[str, np.ndarray]] = {}
    for key, value in inputs.items():
        case, name = key.split(".", 1)
        out.setdefault(case, {})[name] = value
    return out


class Ours:
    """mlx_gemma4u: load_model (cast or quantized), stream_inputs, the model's forward pass."""

    def __init__(self, path: Path, dtype: str, vision_mask: str = "gemma4"):
        from mlx_gemma4u.weights.loading import load_model

        self.model = load_model(path, vision_mask=vision_mask, dtype=None if dtype == "4bit" else dtype)
        if dtype == "4bit":
            quantize(self.model)

    def stream(self, case: dict, n: int) -> Iterator[int]:
        from mlx_gemma4u.generation.api import stream_inputs
        from mlx_gemma4u.generation.params import SamplingParams
        from mlx_gemma4u.generation.prompt_cache import PromptCache

        steps = stream_inputs(self.model, None, _mx_inputs(case), SamplingParams(max_tokens=n), PromptCache(self.model))
        return (r.token for r in steps)

    def logits(self, case: dict) -> np.ndarray:
        inputs = _mx_inputs(case)
        out = self.model(inputs.pop("input_ids"), **inputs, logits_to_keep=LOGIT_POSITIONS)
        return _mx_numpy(out)


class MlxVlm:
    """mlx-vlm 0.7.10's gemma4_unified: its loader, its generate_step, its Model.__call__."""

    def __init__(self, path: Path, dtype: str):
        import mlx.core as mx
        from mlx_vlm.utils import load_model

        self.model = load_model(Path(path))
        if dtype == "float32":
            self.model.set_dtype(mx.float32)
        elif dtype == "4bit":
            quantize(self.model)
        _mx_eval(self.model.parameters())

    def stream(self, case: dict, n: int) -> Iterator[int]:
        from mlx_vlm.generate import generate_step

        inputs = _mx_inputs(case)
        ids, pixels = inputs.pop("input_ids"), inputs.pop("pixel_values", None)
        steps = generate_step(ids, self.model, pixels, None, max_tokens=n, temperature=0.0, **inputs)
        return (int(token) for token, _ in steps)

    def logits(self, case: dict) -> np.ndarray:
        inputs = _mx_inputs(case)
        out = self.model(inputs.pop("input_ids"), **inputs, logits_to_keep=LOGIT_POSITIONS)
        return _mx_numpy(out.logits)


class Transformers:
    """transformers 5.23 (torch CPU): from_pretrained in the dtype, generate() greedy, forward."""

    def __init__(self, path: Path, dtype: str):
        import torch
        from transformers import Gemma4UnifiedForConditionalGeneration

        if dtype == "4bit":
            raise NotImplementedError("no 4-bit CPU backend for transformers in the bench extra")
        self.dtype = getattr(torch, dtype)
        self.model = Gemma4UnifiedForConditionalGeneration.from_pretrained(path, dtype=self.dtype).eval()

    def _inputs(self, case: dict) -> dict:
        import torch

        out = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in case.items()}
        for k, v in out.items():
            if v.is_floating_point():
                out[k] = v.to(self.dtype)
        out["attention_mask"] = torch.ones_like(out["input_ids"])
        return out

    def stream(self, case: dict, n: int) -> Iterator[int]:
        """generate() runs to the end in one call; a streamer stamps each token as it is produced."""
        import torch
        from transformers import GenerationConfig

        stamps: list[tuple[float, int]] = []
        streamer = _Stamps(stamps)
        config = GenerationConfig(
            max_new_tokens=n, min_new_tokens=n, do_sample=False, eos_token_id=None, pad_token_id=0
        )
        with torch.no_grad():
            self.model.generate(**self._inputs(case), generation_config=config, streamer=streamer)
        return iter(stamps)

    def logits(self, case: dict) -> np.ndarray:
        import torch

        with torch.no_grad():
            out = self.model(**self._inputs(case), logits_to_keep=LOGIT_POSITIONS)
        return out.logits.float().numpy()


class _Stamps:
    """A transformers streamer that records (time, token) for every generated token (not the prompt)."""

    def __init__(self, stamps: list):
        self.stamps, self.prompt_seen = stamps, False

    def put(self, value) -> None:
        if self.prompt_seen:
            self.stamps.append((time.perf_counter(), int(value.reshape(-1)[0])))
        self.prompt_seen = True

    def end(self) -> None:
        pass


IMPLEMENTATIONS: dict[str, Callable] = {
    "ours": Ours,
    "ours-1core": Ours,
    "mlx-vlm": MlxVlm,
    "transformers": Transformers,
}


def timed_stream(impl, case: dict, n: int) -> tuple[float, float | None]:
    """(seconds to the first token, decode tokens/s over the remaining n - 1) for one greedy run."""
    start = time.perf_counter()
    stamps = [item if isinstance(item, tuple) else (time.perf_counter(), item) for item in impl.stream(case, n)]
    first, last = stamps[0][0], stamps[-1][0]
    return first - start, (len(stamps) - 1) / (last - first) if len(stamps) > 1 else None


def run_timing(impl, prompts: dict, job: dict) -> dict:
    """The timing figures of one process: TTFT per prompt, prefill and decode rates per length."""
    if not job["media"]:
        prompts = {k: v for k, v in prompts.items() if k not in ("image", "audio")}
    timed_stream(impl, {"input_ids": prompts["prefill"]["input_ids"][:, :16]}, 4)
    for name in ("image", "audio"):
        if name in prompts:
            timed_stream(impl, prompts[name], 1)
    record = {}
    for name in ("text", "image", "audio"):
        if name in prompts:
            record[f"ttft_{name}_s"] = timed_stream(impl, prompts[name], 1)[0]
    for length in job["prefill_lengths"]:
        ttft, decode = timed_stream(
            impl,
            {"input_ids": prompts["prefill"]["input_ids"][:, :length]},
            job["decode_tokens"] if length == job["decode_after"] else 1,
        )
        record[f"prefill_{length}_tps"] = length / ttft
        if decode is not None:
            record["decode_tps"] = decode
    return record


def run_logits(impl, prompts: dict) -> dict[str, np.ndarray]:
    """The last positions' logits of every prompt but the long prefill one."""
    return {name: impl.logits(case) for name, case in prompts.items() if name != "prefill"}


def peak_memory() -> dict:
    """This process's peak resident memory, and MLX's own peak allocation when MLX was used (MB)."""
    out = {"peak_rss_mb": peak_rss_mb()}
    if (mlx_peak := _mx_peak_mb()) is not None:
        out["mlx_peak_mb"] = mlx_peak
    return out


def _mx_peak_mb(reset: bool = False) -> float | None:
    """MLX's peak allocation so far (MB; None where MLX was not used), its count restarted if `reset`."""
    mx = sys.modules.get("mlx.core")
    if mx is None:
        return None
    peak = mx.get_peak_memory() / 2**20
    if reset:
        mx.reset_peak_memory()
    return peak


def peak_rss_mb() -> float:
    """Peak resident memory of this process in MB.

    On Linux from /proc (VmHWM): getrusage's maxrss survives exec, so a worker would report its
    parent's peak if that was higher. Elsewhere getrusage (bytes on macOS).
    """
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) / 1024
    except (OSError, StopIteration):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / (2**20 if sys.platform == "darwin" else 1024)


def main(job_file: str) -> None:
    job = json.loads(Path(job_file).read_text())
    with np.load(job["inputs"]) as data:
        prompts = cases(dict(data))
    start = time.perf_counter()
    impl = load(job)
    load_s = time.perf_counter() - start
    if job["mode"] == "logits":
        np.savez(job["out"] + ".npz", **run_logits(impl, prompts))
        record = {}
    else:
        at_load = _mx_peak_mb(reset=True)
        record = {"load_s": load_s, **run_timing(impl, prompts, job)}
        if at_load is not None:  # the peak of generating alone, and of the whole process
            record["mlx_run_peak_mb"] = _mx_peak_mb()
            record["mlx_peak_mb"] = max(at_load, record["mlx_run_peak_mb"])
    Path(job["out"]).write_text(json.dumps({**peak_memory(), **record}))


def load(job: dict):
    """The job's implementation, loaded; ours in logits mode with transformers' plain-forward vision mask."""
    if job["impl"] == "ours" and job["mode"] == "logits":
        return Ours(Path(job["checkpoint"]), job["dtype"], vision_mask="hf-forward")
    return IMPLEMENTATIONS[job["impl"]](Path(job["checkpoint"]), job["dtype"])


def _mx_inputs(case: dict) -> dict:
    """The npz arrays as MLX arrays, int64 ids narrowed to int32 (what both MLX models take)."""
    import mlx.core as mx

    return {k: mx.array(v.astype(np.int32) if v.dtype == np.int64 else v) for k, v in case.items()}


def _mx_eval(tree) -> None:
    import mlx.core as mx

    mx.eval(tree)


def _mx_numpy(logits) -> np.ndarray:
    import mlx.core as mx

    return np.array(logits.astype(mx.float32))


if __name__ == "__main__":
    main(sys.argv[1])
