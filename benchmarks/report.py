"""The comparison's report as tables: rich on the terminal, Markdown for the README; and the machine.

Both renderings come from the same rows, so the README shows exactly what the run printed.
"""

from __future__ import annotations

import json
import os
import platform
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from mlx_gemma4u.files import write_text

# "ours-1core": this package with the CPU-core cut off (MLX_GEMMA4U_CPU_CORES=1), one MLX stream as
# on a Mac's GPU, so its ratio to mlx-vlm is the one that carries to a Mac.
IMPLS = ("ours", "ours-1core", "mlx-vlm", "transformers")
PAIRS = (("ours", "mlx-vlm"), ("ours-1core", "mlx-vlm"), ("ours", "transformers"))  # the ratio columns
HEADER = ["size", "dtype", "figure", *IMPLS, *(f"{a} vs {b}" for a, b in PAIRS)]
LABELS = {
    "load_s": "load (s)",
    "ttft_text_s": "TTFT text (s)",
    "ttft_image_s": "TTFT 280-token image (s)",
    "ttft_audio_s": "TTFT 10 s audio (s)",
    "decode_tps": "decode (tok/s)",
    "peak_rss_mb": "peak RSS (MB)",
    "mlx_peak_mb": "MLX peak (MB)",
    "mlx_run_peak_mb": "MLX peak after load (MB)",
}


def machine() -> dict:
    """What the figures were measured on: CPU, cores, memory, MLX device, versions, load average."""
    import mlx.core as mx

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    versions = {}
    for name in ("mlx", "mlx-lm", "mlx-vlm", "torch", "transformers", "numpy"):
        try:
            versions[name] = version(name)
        except PackageNotFoundError:
            versions[name] = None
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "ram_gb": os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1e9,
        "mlx_device": str(mx.default_device()),
        "mlx_backend": "Metal" if mx.metal.is_available() else "CPU",
        "platform": platform.platform(),
        "python": platform.python_version(),
        "versions": versions,
        "load_before": os.getloadavg(),
    }


def label(metric: str) -> str:
    if metric.startswith("prefill_"):
        return f"prefill {metric.split('_')[1]} (tok/s)"
    return LABELS.get(metric, metric)


def rows(report: dict) -> list[list[str]]:
    """One row per size, dtype and figure: medians ± half the range, then ours' ratio to each peer."""
    out = []
    for size, by_dtype in report["results"].items():
        for dtype, cells in by_dtype.items():
            metrics = list(dict.fromkeys(m for c in cells.values() for m in c if m != "n/a"))
            ratio = report["ratios"].get(size, {}).get(dtype, {})
            for metric in metrics:
                values = [_cell(cells.get(i, {}), metric) for i in IMPLS]
                ratios = [f"{ratio[p][metric]:.2f}x" if metric in ratio.get(p, {}) else "" for p in pair_names()]
                out.append([size, dtype, label(metric), *values, *ratios])
            out.append([size, dtype, "decode / bandwidth bound", *_bound(report, size, dtype), *[""] * len(PAIRS)])
    return out


def pair_names() -> list[str]:
    return [f"{a} vs {b}" for a, b in PAIRS]


def _cell(cell: dict, metric: str) -> str:
    if "n/a" in cell:
        return "n/a"
    if metric not in cell:
        return ""
    stats = cell[metric]
    return f"{stats['median']:.4g} ±{stats['spread']:.2g}"


def _bound(report: dict, size: str, dtype: str) -> list[str]:
    bound = report["decode_bound"][size][dtype]
    shares = bound["fraction"]
    return [f"{shares[i]:.0%} of {bound['bound_tps']:.4g}" if i in shares else "" for i in IMPLS]


def correctness_rows(report: dict) -> list[list[str]]:
    """One row per size, prompt and pair: the max |logit difference| (float32), and the logits' scale."""
    out = []
    for size, prompts in report["correctness"].items():
        for prompt, pairs in prompts.items():
            for pair, d in pairs.items():
                out.append([size, prompt, pair, f"{d['max_abs_diff']:.3g}", f"{d['max_abs_logit']:.3g}"])
    return out


CORRECTNESS_HEADER = ["size", "prompt", "pair", "max |diff|", "max |logit|"]


def notes(report: dict) -> list[str]:
    """Why cells say n/a, what the ratios mean, and the plan's own notes."""
    out = [
        "ratios: >1 means ours is better (faster, or less memory); medians of "
        f"{report['plan']['repeats']} interleaved runs, ± half their range.",
        "ours-1core: the same package with the CPU-core cut off (MLX_GEMMA4U_CPU_CORES=1), one MLX stream "
        "as on a Mac's GPU: read its ratio to mlx-vlm for a Mac; the ours column adds this CPU's cut.",
        f"bandwidth bound: {report['bandwidth_gbs']:.1f} GB/s numpy copy (read + write) / bytes one decode step "
        "must read (text weights, tied head once, KV cache at the mean decode context).",
    ]
    reasons = {}
    for size, by_dtype in report["results"].items():
        for dtype, cells in by_dtype.items():
            for impl, cell in cells.items():
                if "n/a" in cell:
                    reasons.setdefault(f"{impl}: {cell['n/a']}", []).append(f"{size}/{dtype}")
    out += [f"n/a {reason} ({', '.join(where)})" for reason, where in reasons.items()]
    return out + list(report["plan"].get("notes", []))


def markdown(report: dict) -> str:
    """The report's tables and notes in Markdown, for the README."""
    m = report["machine"]
    lines = [
        f"Machine: {m['cpu']}, {m['cores']} cores, {m['ram_gb']:.0f} GB RAM, MLX on {m['mlx_backend']} "
        f"({m['platform']}); load average {m['load_before'][0]:.1f} before, {m['load_after'][0]:.1f} after.",
        "",
    ]
    lines += _md_table(HEADER, rows(report)) + [""]
    if report["correctness"]:
        lines += _md_table(CORRECTNESS_HEADER, correctness_rows(report)) + [""]
    lines += [f"- {n}" for n in notes(report)]
    return "\n".join(lines) + "\n"


def _md_table(header: list[str], body: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + ["| " + " | ".join(r) + " |" for r in body]


def print_tables(report: dict) -> None:
    """The speed table, the correctness table and the notes, with rich."""
    from rich.console import Console
    from rich.table import Table

    console = Console(width=200)
    for title, header, body in (
        ("Speed and memory", HEADER, rows(report)),
        ("Logits, float32", CORRECTNESS_HEADER, correctness_rows(report)),
    ):
        if not body:
            continue
        table = Table(title=title)
        for name in header:
            table.add_column(name, justify="left" if name in ("size", "dtype", "figure", "prompt", "pair") else "right")
        for row in body:
            table.add_row(*row)
        console.print(table)
    for note in notes(report):
        console.print(f"- {note}", highlight=False)


def save(out: Path, report: dict, table: str) -> None:
    """Write `report` (with this machine's description) to `out` (JSON) and `table` beside it
    (Markdown, the same name), and print the table."""
    write_text(out, json.dumps({"machine": machine(), **report}, indent=1))
    write_text(out.with_suffix(".md"), table + "\n")
    print(table)
