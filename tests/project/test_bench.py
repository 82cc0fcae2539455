"""The comparison harness on the demo checkpoint, in its quickest form: a well-formed report, no timings judged.

Peers that are not installed in this environment (mlx-vlm, usually, outside the bench extra) must
be skipped with the reason, not fail the run.
"""

import json
import sys
from importlib.util import find_spec
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from benchmarks import compare  # noqa: E402

FIGURES = {"load_s", "ttft_text_s", "ttft_image_s", "ttft_audio_s", "prefill_32_tps", "decode_tps", "peak_rss_mb"}


@pytest.fixture(scope="module")
def report(demo_home, tmp_path_factory):
    args = compare.parse_args(
        ["--sizes", "demo", "--dtypes", "bfloat16", "--repeats", "1", "--prefill", "32", "--decode", "4"]
    )
    out = tmp_path_factory.mktemp("bench") / "report.json"
    compare.run(compare.plan_from_args(args), out, demo_home)
    return out


def installed(impl: str) -> bool:
    return all(find_spec(m) is not None for m in compare.NEEDS[impl])


def test_report_json_is_well_formed(report):
    data = json.loads(report.read_text())
    assert {"machine", "plan", "bandwidth_gbs", "results", "ratios", "decode_bound", "correctness", "raw"} <= set(data)
    assert data["bandwidth_gbs"] > 0 and data["machine"]["cores"] > 0
    cells = data["results"]["demo"]["bfloat16"]
    assert set(cells) == set(compare.IMPLS)
    for impl, cell in cells.items():
        if not installed(impl):
            assert "not installed" in cell["n/a"]
            continue
        assert FIGURES <= set(cell), impl
        for stats in cell.values():
            assert stats["median"] > 0 and stats["spread"] >= 0 and stats["n"] == 1
    assert "mlx_peak_mb" in cells["ours"]
    assert 0 < cells["ours"]["mlx_run_peak_mb"]["median"] <= cells["ours"]["mlx_peak_mb"]["median"]


def test_ratios_bound_and_logits_where_peers_ran(report):
    data = json.loads(report.read_text())
    ran = [p for p in ("mlx-vlm", "transformers") if installed(p)]
    pairs = [f"{a} vs {b}" for a, b in compare.PAIRS if b in ran]
    assert sorted(data["ratios"].get("demo", {}).get("bfloat16", {})) == sorted(pairs)
    for pair in pairs:
        assert all(r > 0 for r in data["ratios"]["demo"]["bfloat16"][pair].values())
    assert "ours-1core vs mlx-vlm" in pairs or "mlx-vlm" not in ran  # the cut off, beside the peer
    bound = data["decode_bound"]["demo"]["bfloat16"]
    assert bound["bound_tps"] > 0 and 0 < bound["fraction"]["ours"]
    pairs = data["correctness"]["demo"]
    if ran:
        assert set(pairs) == {"text", "image", "audio"}
        assert pairs["text"][f"ours vs {ran[0]}"]["max_abs_diff"] < 1e-3


def test_tables_render(report, capsys):
    data = json.loads(report.read_text())
    compare.print_tables(data)
    printed = capsys.readouterr().out
    assert "Speed and memory" in printed and "decode / bandwidth bound" in printed
    md = report.with_suffix(".md").read_text()
    assert md.count("| demo | bfloat16 |") >= len(FIGURES) and "Machine:" in md


def test_the_cli_has_no_bench_command(capsys):
    """The benchmarks ship with the checkout, not the package: `python -m benchmarks.compare`."""
    from mlx_gemma4u.cli.main import main

    with pytest.raises(SystemExit):
        main(["bench", "--quick"])
    assert "invalid choice: 'bench'" in capsys.readouterr().err


def test_graph_counts_the_primitives_and_the_weights_a_step_reads():
    import mlx.core as mx

    from benchmarks import graph

    x, w, unused = mx.ones((1, 4)), mx.ones((4, 4)), mx.ones((1000,))
    mx.eval(x, w, unused)
    counts = graph.graph([mx.exp(x @ w).sum()], {"w": w, "unused": unused})
    assert counts["kinds"]["Matmul"] == 1 and counts["kinds"]["Exp"] == 1 and counts["kinds"]["Sum"] == 1
    assert counts["weight_bytes"] == w.nbytes  # `unused` is not an input of the graph


def test_graph_of_a_decode_step(demo_home):
    """Per row, one attention per layer; the weights are read once per step, whatever the batch."""
    import json

    from benchmarks import graph

    steps = graph.ours(demo_home / "demo-v1", None, context=8)
    layers = json.loads((demo_home / "demo-v1" / "config.json").read_text())["text_config"]["num_hidden_layers"]
    one, eight = steps["decode, batch 1"], steps["decode, batch 8"]
    assert graph.attention_calls(one) == layers
    assert one["weight_bytes"] == eight["weight_bytes"] > 33_000_000  # the 262,144 x 64 bfloat16 embedding, tied head
    assert eight["ops"] > one["ops"]
