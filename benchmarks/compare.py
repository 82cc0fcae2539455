"""This package against mlx-vlm's gemma4_unified and transformers (torch CPU), side by side in one run.

    python -m benchmarks.compare [--quick] [--out FILE]        (or: mlx-gemma4u bench ...)

Flow: random checkpoints (checkpoints.py, cached) and one inputs file (the same token ids and
processor arrays for everyone) -> copy bandwidth of the machine -> for each repeat, for each
size and dtype, ours, mlx-vlm, transformers in turn, each in a fresh process (workers.py) ->
median and spread per figure, ratios to each peer, decode speed against the memory-bandwidth
bound -> one float32 forward pass per implementation and prompt, logits compared -> a table
(rich) on stdout and a JSON file (plus the same tables in Markdown beside it).

The harness lives in benchmarks/, beside the package rather than inside it: it imports the peers,
writes into the checkout (benchmarks/results/) and is a development tool, so the installed
package stays free of it; `mlx-gemma4u bench` runs it from a source checkout (editable install).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from importlib.util import find_spec
from pathlib import Path

import numpy as np

from mlx_gemma4u.files import write_text

from .checkpoints import ensure_checkpoint
from .report import IMPLS, PAIRS, machine, markdown, print_tables

NEEDS = {"ours": ("mlx",), "ours-1core": ("mlx",), "mlx-vlm": ("mlx_vlm",), "transformers": ("torch", "transformers")}
DTYPE_BYTES = {"float32": 4.0, "bfloat16": 2.0, "4bit": 0.5 + 2 * 2 / 64}  # 4-bit: bf16 scale and bias per 64
KV_BYTES = {"float32": 4, "bfloat16": 2, "4bit": 2}
RESULTS = Path(__file__).resolve().parent / "results"
CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "mlx-gemma4u" / "bench"


@dataclass(frozen=True)
class Run:
    """One checkpoint size in one dtype, and what it is measured with."""

    size: str
    dtype: str
    prefill_lengths: tuple[int, ...]
    decode_tokens: int
    media: bool = True


@dataclass(frozen=True)
class Plan:
    runs: tuple[Run, ...]
    repeats: int
    correctness: tuple[str, ...]  # the sizes whose float32 logits are compared
    timeout_s: int = 600
    impls: tuple[str, ...] = IMPLS
    notes: tuple[str, ...] = ()

    @property
    def sizes(self) -> list[str]:
        return list(dict.fromkeys(r.size for r in self.runs))


ALL_DTYPES = ("float32", "bfloat16", "4bit")
MLX_CPU_NOTE = (
    "MLX's CPU backend (Linux wheel) multiplies matrices at about 2 GFLOP/s in float32 and 5 in bfloat16 "
    "here, against about 110 for torch, so MLX runs are cut to fit the time budget."
)
FULL = Plan(
    runs=(
        Run("demo", "float32", (512, 4096), 128),
        Run("demo", "bfloat16", (512, 4096), 128),
        Run("demo", "4bit", (512,), 32),
        Run("mid", "float32", (512,), 32, media=False),
        Run("mid", "bfloat16", (512,), 32, media=False),
        Run("mid", "4bit", (128,), 16, media=False),
        Run("12b-2l", "float32", (64,), 8, media=False),
        Run("12b-2l", "bfloat16", (64,), 8, media=False),
        Run("12b-2l", "4bit", (16,), 8, media=False),
    ),
    repeats=2,
    correctness=("demo", "mid"),
    notes=(
        MLX_CPU_NOTE,
        "Full: 4,096-token prefill on the demo only (past its 128-token window); mid and 12b-2l text "
        "prompts only, shorter where MLX's CPU quantized matmuls are slow (mid 4-bit: 128-token prefill, "
        "16 decode tokens; 12b-2l: 64-token prefill, 16 at 4 bits, 8 decode tokens); float32 logits on demo and mid.",
    ),
)
QUICK = Plan(
    runs=(Run("demo", "bfloat16", (512,), 32), Run("mid", "bfloat16", (128,), 8, media=False)),
    repeats=2,
    correctness=("demo",),
    notes=(
        MLX_CPU_NOTE,
        "--quick: demo (512-token prefill, 32 decode tokens) and mid (text only, 128-token "
        "prefill, 8 decode tokens), bfloat16; float32 logits on the demo.",
    ),
)

TEXT = "Write a short poem about the sea, in four lines."
IMAGE_SIZE = (960, 672)  # 20 x 14 blocks of 48 px: exactly 280 soft tokens
AUDIO_SECONDS = 10.0


def build_inputs(checkpoint: Path, max_length: int, out: Path) -> Path:
    """The prompts every implementation gets, as the processor's arrays in one .npz."""
    from PIL import Image

    from mlx_gemma4u.weights.loading import load_processor

    processor = load_processor(checkpoint)
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (IMAGE_SIZE[1], IMAGE_SIZE[0], 3), dtype=np.uint8))
    t = np.arange(int(16000 * AUDIO_SECONDS)) / 16000
    audio = (0.3 * np.sin(2 * np.pi * 220 * t) + 0.05 * rng.standard_normal(t.size)).astype(np.float32)
    prompts = {
        "text": processor(text=TEXT, return_tensors="np"),
        "image": processor(text=f"Describe this: {processor.image_token}", images=[image], return_tensors="np"),
        "audio": processor(text=f"Transcribe: {processor.audio_token}", audio=[audio], return_tensors="np"),
    }
    ids = rng.integers(1000, 200000, (1, max_length))
    ids[0, 0] = 2
    arrays = {"prefill.input_ids": ids}
    for name, inputs in prompts.items():
        arrays.update({f"{name}.{k}": np.asarray(v) for k, v in inputs.items() if k != "attention_mask"})
    np.savez(out, **arrays)
    return out


def copy_bandwidth(megabytes: int = 256, tries: int = 5) -> float:
    """Bytes read plus bytes written per second by a large numpy copy (best of `tries`), in GB/s."""
    src = np.ones(megabytes * 2**20 // 8)
    dst = np.empty_like(src)
    best = float("inf")
    for _ in range(tries):
        start = time.perf_counter()
        np.copyto(dst, src)
        best = min(best, time.perf_counter() - start)
    return 2 * src.nbytes / best / 1e9


def decode_bytes(checkpoint: Path, dtype: str, context: int) -> float:
    """Bytes one decode step must read at least: the text model's weights (the tied embedding once,
    as the output head) and the KV cache at `context` tokens."""
    header = _header(checkpoint / "model.safetensors")
    params = sum(int(np.prod(v["shape"])) for k, v in header.items() if k.startswith("model.language_model."))
    text = json.loads((checkpoint / "config.json").read_text())["text_config"]
    kv = 0
    for kind in text["layer_types"]:
        if kind == "sliding_attention":
            kv += 2 * min(context, text["sliding_window"]) * text["num_key_value_heads"] * text["head_dim"]
        else:
            tensors = 1 if text["attention_k_eq_v"] else 2
            kv += tensors * context * text["num_global_key_value_heads"] * text["global_head_dim"]
    return params * DTYPE_BYTES[dtype] + kv * KV_BYTES[dtype]


def _header(file: Path) -> dict:
    with open(file, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(n))
    header.pop("__metadata__", None)
    return header


def missing(impl: str) -> str | None:
    """Why `impl` cannot run in this interpreter, or None."""
    absent = [m for m in NEEDS[impl] if find_spec(m) is None]
    return f"not installed ({', '.join(absent)}); pip install -e '.[bench]'" if absent else None


def run_job(job: dict, work: Path, timeout_s: int) -> dict:
    """One worker process -> its JSON record, or {"error": reason} if it failed."""
    path = work / f"{job['impl']}-{job['size']}-{job['dtype']}-{job['mode']}-{job.get('repeat', 0)}.json"
    job = {**job, "out": str(path.with_suffix(".out"))}
    path.write_text(json.dumps(job))
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "MLX_GEMMA4U_CPU_CORES": "1"} if job["impl"] == "ours-1core" else None
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "benchmarks.workers", str(path)],
            cwd=root,
            env=env,
            capture_output=True,
            text=True,
            timeout=timeout_s,
        )
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout_s} s"}
    if proc.returncode != 0:
        lines = [line for line in proc.stderr.strip().splitlines() if line.strip()]
        return {"error": lines[-1] if lines else f"exit code {proc.returncode}"}
    return json.loads(Path(job["out"]).read_text())


def measure(plan: Plan, checkpoints: dict[str, Path], inputs: Path, work: Path, unavailable: dict) -> list[dict]:
    """Every timing record, interleaved: repeat > size > dtype > implementation."""
    records = []
    for repeat in range(plan.repeats):
        for run in plan.runs:
            for impl in plan.impls:
                if impl in unavailable or (impl == "transformers" and run.dtype == "4bit"):
                    continue
                base = {"impl": impl, "size": run.size, "dtype": run.dtype, "repeat": repeat}
                job = {
                    **base,
                    "mode": "timing",
                    "checkpoint": str(checkpoints[run.size]),
                    "inputs": str(inputs),
                    "prefill_lengths": list(run.prefill_lengths),
                    "decode_after": run.prefill_lengths[0],
                    "decode_tokens": run.decode_tokens,
                    "media": run.media,
                }
                started = time.perf_counter()
                records.append({**base, **run_job(job, work, plan.timeout_s)})
                _log(
                    f"{impl:12s} {run.size:7s} {run.dtype:9s} repeat {repeat}: {time.perf_counter() - started:5.1f} s"
                    + (f"  ERROR {records[-1]['error']}" if "error" in records[-1] else "")
                )
    return records


def summarize(records: list[dict], plan: Plan, unavailable: dict) -> dict:
    """size -> dtype -> impl -> metric -> {median, spread, n}, or {"n/a": reason}."""
    out: dict = {}
    for run in plan.runs:
        for impl in plan.impls:
            mine = [r for r in records if (r["impl"], r["size"], r["dtype"]) == (impl, run.size, run.dtype)]
            out.setdefault(run.size, {}).setdefault(run.dtype, {})[impl] = _cell(impl, run.dtype, mine, unavailable)
    return out


def _cell(impl: str, dtype: str, runs: list[dict], unavailable: dict) -> dict:
    if impl in unavailable:
        return {"n/a": unavailable[impl]}
    if impl == "transformers" and dtype == "4bit":
        return {"n/a": "no 4-bit CPU backend for transformers in the bench extra (bitsandbytes needs CUDA)"}
    good = [r for r in runs if "error" not in r]
    if not good:
        return {"n/a": runs[0]["error"] if runs else "not run"}
    metrics = [k for k in good[0] if k not in ("impl", "size", "dtype", "repeat")]
    return {m: _stats([r[m] for r in good if m in r]) for m in metrics}


def _stats(values: list[float]) -> dict:
    return {"median": statistics.median(values), "spread": (max(values) - min(values)) / 2, "n": len(values)}


def ratios(results: dict) -> dict:
    """size -> dtype -> "ours vs peer" -> metric -> how many times better ours is (>1: faster or smaller),
    for each pair of report.PAIRS that both ran."""
    out: dict = {}
    for size, by_dtype in results.items():
        for dtype, cells in by_dtype.items():
            for mine, peer in PAIRS:
                ours, theirs = cells.get(mine, {}), cells.get(peer, {})
                shared = [m for m in ours if m in theirs and m != "n/a"]
                if "n/a" in ours or "n/a" in theirs or not shared:
                    continue
                out.setdefault(size, {}).setdefault(dtype, {})[f"{mine} vs {peer}"] = {
                    m: _better(m, ours[m]["median"], theirs[m]["median"]) for m in shared
                }
    return out


def _better(metric: str, ours: float, theirs: float) -> float:
    return ours / theirs if metric.endswith("_tps") else theirs / ours


def bounds(results: dict, plan: Plan, checkpoints: dict[str, Path], bandwidth: float) -> dict:
    """size -> dtype -> the decode tokens/s the copy bandwidth allows, and each implementation's share of it."""
    out: dict = {}
    for run in plan.runs:
        context = run.prefill_lengths[0] + run.decode_tokens // 2
        nbytes = decode_bytes(checkpoints[run.size], run.dtype, context)
        bound = bandwidth * 1e9 / nbytes
        shares = {
            impl: cell["decode_tps"]["median"] / bound
            for impl, cell in results[run.size][run.dtype].items()
            if "decode_tps" in cell
        }
        out.setdefault(run.size, {})[run.dtype] = {
            "bytes_per_token": nbytes,
            "context": context,
            "bound_tps": bound,
            "fraction": shares,
        }
    return out


def correctness(plan: Plan, checkpoints: dict[str, Path], inputs: Path, work: Path, unavailable: dict) -> dict:
    """size -> prompt -> "a vs b" -> max |logit difference| over the last positions, float32."""
    out: dict = {}
    for size in plan.correctness:
        logits = {}
        for impl in (i for i in plan.impls if i not in unavailable and i != "ours-1core"):  # the cut is exact
            job = {
                "impl": impl,
                "size": size,
                "dtype": "float32",
                "mode": "logits",
                "checkpoint": str(checkpoints[size]),
                "inputs": str(inputs),
            }
            record = run_job(job, work, plan.timeout_s)
            if "error" in record:
                _log(f"logits {impl} {size}: ERROR {record['error']}")
                continue
            with np.load(str(work / f"{impl}-{size}-float32-logits-0.out.npz")) as data:
                logits[impl] = dict(data)
        out[size] = _diffs(logits)
    return out


def _diffs(logits: dict[str, dict[str, np.ndarray]]) -> dict:
    names = list(logits)
    out: dict = {}
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            for prompt in logits[a]:
                diff = float(np.max(np.abs(logits[a][prompt] - logits[b][prompt])))
                scale = float(np.max(np.abs(logits[b][prompt])))
                out.setdefault(prompt, {})[f"{a} vs {b}"] = {"max_abs_diff": diff, "max_abs_logit": scale}
    return out


def run(plan: Plan, out: Path, cache: Path) -> dict:
    """The whole comparison -> the report (also written to `out` as JSON and Markdown)."""
    started = time.perf_counter()
    unavailable = {impl: why for impl in plan.impls if (why := missing(impl))}
    checkpoints = {size: ensure_checkpoint(size, cache) for size in plan.sizes}
    _log(f"checkpoints ready ({time.perf_counter() - started:.0f} s); skipped: {unavailable or 'none'}")
    report = {"machine": machine(), "plan": asdict(plan), "unavailable": unavailable, "bandwidth_gbs": copy_bandwidth()}
    with tempfile.TemporaryDirectory(prefix="mlx-gemma4u-bench-") as tmp:
        work = Path(tmp)
        longest = max(max(r.prefill_lengths) for r in plan.runs)
        inputs = build_inputs(next(iter(checkpoints.values())), longest, work / "inputs.npz")
        records = measure(plan, checkpoints, inputs, work, unavailable)
        report["results"] = summarize(records, plan, unavailable)
        report["correctness"] = correctness(plan, checkpoints, inputs, work, unavailable)
    report.update(
        ratios=ratios(report["results"]),
        raw=records,
        decode_bound=bounds(report["results"], plan, checkpoints, report["bandwidth_gbs"]),
    )
    report["machine"]["load_after"] = os.getloadavg()
    report["elapsed_s"] = time.perf_counter() - started
    write_text(out, json.dumps(report, indent=1))
    write_text(out.with_suffix(".md"), markdown(report))
    return report


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="mlx-gemma4u bench", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="demo and mid sizes only, short prompts (< 3 minutes)")
    parser.add_argument("--out", type=Path, help="the JSON file (default benchmarks/results/<mode>-<date>.json)")
    parser.add_argument("--cache", type=Path, default=CACHE, help=f"where the random checkpoints live ({CACHE})")
    parser.add_argument("--sizes", nargs="+", choices=["demo", "mid", "12b-2l"], help="only these sizes")
    parser.add_argument("--dtypes", nargs="+", choices=ALL_DTYPES, help="only these dtypes")
    parser.add_argument("--impls", nargs="+", choices=IMPLS, default=list(IMPLS), help="only these implementations")
    parser.add_argument("--repeats", type=int, help="measured repeats of every process (default: 2)")
    parser.add_argument("--prefill", type=int, nargs="+", help="prefill lengths; decode runs after the first")
    parser.add_argument("--decode", type=int, help="decode tokens")
    parser.add_argument("--no-correctness", action="store_true", help="skip the float32 logits comparison")
    return parser.parse_args(argv)


def plan_from_args(args: argparse.Namespace) -> Plan:
    """The quick or full plan, narrowed by the command-line overrides."""
    plan = QUICK if args.quick else FULL
    runs = [
        replace(
            r, prefill_lengths=tuple(args.prefill or r.prefill_lengths), decode_tokens=args.decode or r.decode_tokens
        )
        for r in plan.runs
        if (not args.sizes or r.size in args.sizes) and (not args.dtypes or r.dtype in args.dtypes)
    ]
    return replace(
        plan,
        runs=tuple(runs),
        repeats=args.repeats or plan.repeats,
        impls=tuple(args.impls),
        correctness=() if args.no_correctness else tuple(s for s in plan.correctness if s in {r.size for r in runs}),
    )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    plan = plan_from_args(args)
    out = args.out or RESULTS / f"{'quick' if args.quick else 'full'}-{time.strftime('%Y%m%d-%H%M')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    report = run(plan, out, args.cache)
    print_tables(report)
    print(f"JSON: {out}  Markdown: {out.with_suffix('.md')}  ({report['elapsed_s']:.0f} s)")
    return 0


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


if __name__ == "__main__":
    sys.exit(main())
