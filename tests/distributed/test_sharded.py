"""The model across local processes: `mlx.launch -n N --backend ring` runs tests/support/sharded_run.py,
each rank loading its part of a random tiny checkpoint with sharded_load_model, and its answers
are compared with this process's single model on the same prompts.

- Pipeline: float32 logits bit-identical on text, image and audio prompts, greedy replies identical
  for 64 tokens past the sliding window (8), with 2 ranks (and 3 where the split allows); each rank
  reads only the index's files that hold its layers and holds its layers' weights only.
- Tensor parallel: logits within 3e-5 of max|logit| (the all_sums add in another order; measured
  5e-6 to 1e-5), greedy replies identical; a 4-bit checkpoint shards both ways.
- A rank that dies mid-reply ends the run within seconds (the others fail on the lost connection or
  mlx.launch stops them, whichever comes first), and no process is left.
- Loading ends with a time-bound first collective: a rank that could not load its part, one that
  loaded another checkpoint, or one that never answers is reported by rank 0 in one sentence, and
  no process is left waiting.
"""

import json
import shutil
import sys
import time
from pathlib import Path

import multimodal_inputs as mi
import numpy as np
import pytest
import reference
from launching import launched, left_running
from sharded_run import answers

from mlx_gemma4u.errors import InputError
from mlx_gemma4u.models import parallel
from mlx_gemma4u.models.config import ModelConfig
from mlx_gemma4u.models.model import Model
from mlx_gemma4u.weights.loading import load_draft_model, load_model

SCRIPT = Path(__file__).resolve().parents[1] / "support" / "sharded_run.py"
LOADING = SCRIPT.with_name("loading_run.py")
TOKENS = 64 + 12  # every reply token past the window of 8 once the prompt is in; 64 of them at least


def launch(n: int, checkpoint: Path, mode: str, inputs: Path, out: Path, env: dict | None = None, drafter=""):
    """The script under `mlx.launch -n n --backend ring` -> (exit code, output)."""
    script = [sys.executable, str(SCRIPT), str(checkpoint), mode, str(inputs), str(out), str(TOKENS), str(drafter)]
    return launched(n, script, env)


def save(model, folder: Path) -> Path:
    """save_pretrained in shards of at most 200 KB, with an index (so a rank can skip files)."""
    model.save_pretrained(folder, max_shard_size="200KB")
    return folder


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("sharded")
    return {
        "full": save(reference.build(reference.TEXT_CONFIGS["full"], seed=3), root / "full"),
        "plain": save(reference.build(reference.TEXT_CONFIGS["plain"], seed=4), root / "plain"),
    }


@pytest.fixture(scope="module")
def drafting(tmp_path_factory) -> tuple[Path, Path]:
    """A "full" target that often repeats itself, in shards, and an assistant drafting its repeats
    (so that rounds accept some drafts and reject others)."""
    import draft_reference as dr

    root = tmp_path_factory.mktemp("drafting")
    full = reference.TEXT_CONFIGS["full"]
    with dr.kv_sharing_5_24():
        target = dr.repetitive_target(full)
        assistant = dr.build_assistant(full, seed=7, hidden=reference.BASE_TEXT["hidden_size"])
        dr.passthrough(assistant, target)
    return save(target, root / "target"), dr.save(assistant, root / "assistant")


@pytest.fixture(scope="module")
def inputs(golden_dir, tmp_path_factory) -> Path:
    """A text, an image and an audio prompt, as the script reads them."""
    rng = np.random.default_rng(0)
    cases = {"text": {"input_ids": rng.integers(3, reference.V - 20, (1, 20))}}
    for case in ("one_image", "audio"):
        c = mi.build_case(golden_dir, case)
        cases[case] = {"input_ids": c["input_ids"], "mm_token_type_ids": c["mm_token_type_ids"], **c["media"]}
    arrays = {
        f"{case}.{name}": np.asarray(v).astype(np.int32) if np.asarray(v).dtype == np.int64 else np.asarray(v)
        for case, named in cases.items()
        for name, v in named.items()
    }
    path = tmp_path_factory.mktemp("inputs") / "inputs.npz"
    np.savez(path, **arrays)
    return path


def alone(checkpoint: Path, inputs: Path, drafter: Path | None = None) -> dict:
    """What one process answers: each prompt's logits and greedy reply (and drafted replies)."""
    model = load_model(checkpoint)
    return answers(model, str(inputs), TOKENS, drafter=load_draft_model(drafter) if drafter else None)


def sharded(n: int, checkpoint: Path, mode: str, inputs: Path, tmp_path: Path, drafter: Path | None = None) -> dict:
    out = tmp_path / f"{mode}-{n}.npz"
    code, output = launch(n, checkpoint, mode, inputs, out, drafter=drafter or "")
    assert code == 0 and out.is_file(), output[-3000:]  # (mlx.launch exits 0 even when a rank fails)
    with np.load(out) as data:
        return {k: data[k] for k in data.files}


def layer_shares(checkpoint: Path, n: int) -> np.ndarray:
    """Each of n pipeline stages' share of the decoder's bytes, from the one-process model's layers."""
    model = load_model(checkpoint)
    sizes = [sum(v.nbytes for v in _leaves(layer)) for layer in model.language_model.layers]
    starts = parallel.split(model.config.text, n) + [len(sizes)]
    return np.array([sum(sizes[a:b]) for a, b in zip(starts, starts[1:])]) / sum(sizes)


def whole_decoder_bytes(checkpoint: Path) -> float:
    model = load_model(checkpoint)
    return float(sum(v.nbytes for layer in model.language_model.layers for v in _leaves(layer)))


def same_answers(got: dict, want: dict, bound: float = 0.0, replies: bool = True) -> None:
    """Every prompt's logits equal (bound 0) or within `bound` of the largest one, and (if `replies`)
    the same greedy reply of TOKENS tokens."""
    for case in ("text", "one_image", "audio"):
        ours, theirs = got[f"{case}.logits"], want[f"{case}.logits"]
        gap = np.abs(ours - theirs).max() / np.abs(theirs).max()
        print(f"{case}: max |Δ logit| / max |logit| = {gap:.1e}")
        assert np.array_equal(ours, theirs) if bound == 0 else gap <= bound, case
        if replies:
            assert list(got[f"{case}.reply"]) == list(want[f"{case}.reply"]) and len(want[f"{case}.reply"]) == TOKENS


def _layer(key: str) -> int | None:
    """The decoder layer number in a stored tensor name (None outside the layers)."""
    _, found, rest = key.partition(".layers.")
    return int(rest.split(".")[0]) if found else None


def _leaves(module):
    from mlx.utils import tree_flatten

    return [v for _, v in tree_flatten(module.parameters())]


def test_pipeline_of_two_is_bit_identical_and_each_rank_reads_its_files(checkpoints, inputs, tmp_path):
    got = sharded(2, checkpoints["full"], "pipeline", inputs, tmp_path)
    same_answers(got, alone(checkpoints["full"], inputs))
    index = json.loads((checkpoints["full"] / "model.safetensors.index.json").read_text())["weight_map"]
    read = [Path(f).name for f in json.loads(str(got["files_read"]))[0]]
    later = {f for f in index.values() if all(_layer(k) in (3, 4, 5) for k, g in index.items() if g == f)}
    assert later and read and not later & set(read)  # rank 0 (layers 0-1) never opened a file of only later layers
    shares = got["decoder_bytes"] / whole_decoder_bytes(checkpoints["full"])
    print("pipeline of 2, decoder bytes per rank / whole:", shares)  # measured 0.267, 0.733
    assert np.allclose(shares, layer_shares(checkpoints["full"], 2), atol=0.01)  # layers 0-1 and 2-5


def test_pipeline_of_three_is_bit_identical(checkpoints, inputs, tmp_path):
    got = sharded(3, checkpoints["plain"], "pipeline", inputs, tmp_path)
    same_answers(got, alone(checkpoints["plain"], inputs))
    shares = got["decoder_bytes"] / whole_decoder_bytes(checkpoints["plain"])
    print("pipeline of 3, decoder bytes per rank / whole:", shares)
    assert np.allclose(shares, layer_shares(checkpoints["plain"], 3), atol=0.01)  # 7 layers: 3, 2, 2
    assert shares.max() < 0.45


def test_stages_are_as_even_as_kv_sharing_allows(checkpoints):
    full = ModelConfig.from_file(checkpoints["full"] / "config.json").text  # S S F S S F, the last two reuse
    plain = ModelConfig.from_file(checkpoints["plain"] / "config.json").text  # 7 layers, no sharing
    assert parallel.split(full, 2) == [0, 2]  # not [0, 3]: layer 5 reads layer 2's keys and values
    assert parallel.split(plain, 3) == [0, 3, 5]
    assert parallel.split(plain, 7) == list(range(7))
    for config, size in ((full, 3), (plain, 8)):
        with pytest.raises(InputError, match=f"{size} processes cannot split the {len(config.layers)} decoder layers"):
            parallel.split(config, size)


class _Rank:
    """What pipeline() asks of a group: its rank and size (no collective runs while a stage is made)."""

    def __init__(self, rank: int, size: int):
        self.rank, self.size = (lambda: rank), (lambda: size)


def test_the_drafter_drafts_on_the_stage_that_holds_its_keys(checkpoints, drafting):
    """A drafter reads the last full and the last sliding layer that compute keys: the stage holding
    both drafts ("full": S S F S S F, layers 2 and 3; "plain": S S S S S F F, layers 4 and 6). A split
    that parts them has no such stage, and a drafter is refused on it in one sentence."""
    drafter = load_draft_model(drafting[1])
    for name, size, want in (("full", 2, 1), ("plain", 2, 1), ("plain", 3, None)):
        config = ModelConfig.from_file(checkpoints[name] / "config.json")
        for rank in range(size):
            model = Model(config)
            model.pipeline(_Rank(rank, size))
            assert model.language_model.stage.drafter_rank == want, (name, size, rank)
    with pytest.raises(InputError, match="which this pipeline split puts on different processes; use fewer"):
        drafter.check_target(model)


def test_a_split_that_would_part_kv_shared_layers_is_refused(checkpoints, inputs, tmp_path):
    _, output = launch(3, checkpoints["full"], "pipeline", inputs, tmp_path / "x.npz")
    assert "3 processes cannot split the 6 decoder layers" in output and not (tmp_path / "x.npz").exists()


def test_tensor_parallel_is_within_rounding_and_replies_the_same(checkpoints, inputs, tmp_path):
    got = sharded(2, checkpoints["full"], "tensor", inputs, tmp_path)
    same_answers(got, alone(checkpoints["full"], inputs), bound=3e-5)
    shares = got["decoder_bytes"] / whole_decoder_bytes(checkpoints["full"])
    assert np.all(shares < 0.55)  # every projection split, but the one shared key-value head of full layers


@pytest.mark.parametrize("mode", ["pipeline", "tensor"])
def test_a_4bit_checkpoint_shards(mode, checkpoints, inputs, tmp_path, demo_home):
    from commands import cli

    quantized = tmp_path / "q4"
    run = cli(
        "convert", "--hf-path", str(checkpoints["full"]), "--mlx-path", str(quantized), "-q",
        "--q-group-size", "32", "--quant-recipe", "uniform", home=demo_home,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    got = sharded(2, quantized, mode, inputs, tmp_path)
    same_answers(got, alone(quantized, inputs), bound=0.0 if mode == "pipeline" else 3e-5, replies=mode == "pipeline")


def test_a_rank_that_dies_mid_reply_ends_the_others(checkpoints, inputs, tmp_path):
    _, output = launch(2, checkpoints["full"], "pipeline", inputs, tmp_path / "x.npz", env={"DIE_AT_TOKEN": "5"})
    # Rank 0 either fails on the lost connection first or is stopped by mlx.launch first (timing).
    assert "Node with rank 1 exited with code 9" in output and not (tmp_path / "x.npz").exists(), output[-2000:]
    assert not left_running(str(SCRIPT))


@pytest.mark.parametrize("flags", [["--pipeline", "--draft-model", "demo"], ["--tensor-parallel"]])
def test_generate_under_mlx_launch_prints_what_one_process_prints(flags, demo_home):
    """Every process generates; the first prints the reply, once: with --pipeline (and a drafter)
    the very reply of one process alone. The demo is bfloat16 and random, so tensor parallel's other
    order of sums flips a near-tie within a few tokens: there the reply starts the same."""
    from commands import cli

    words = ["generate", "--demo", "--prompt", "Tell me about the sea.", "--max-tokens", "24"]
    alone_run = cli(*words, home=demo_home)
    assert alone_run.returncode == 0, alone_run.stderr
    code, output = launched(
        2,
        [sys.executable, "-m", "mlx_gemma4u", *words, *flags],
        env={"MLX_GEMMA4U_HOME": str(demo_home)},
        stdout_only=True,
    )
    assert code == 0 and output.count("\n") == 1 and alone_run.stdout.strip()
    if flags[0] == "--pipeline":
        assert output == alone_run.stdout
    else:
        assert output.split()[:3] == alone_run.stdout.split()[:3]


def test_pipeline_without_mlx_launch_is_refused_in_one_sentence(demo_home):
    from commands import cli

    run = cli("generate", "--demo", "--prompt", "Hi", "--pipeline", home=demo_home)
    assert run.returncode == 1 and "start it with `mlx.launch -n 2" in run.stderr and "Traceback" not in run.stderr


def loading(first: Path, second: Path, timeout: float = 120, sleep: float = 0) -> tuple[str, float]:
    """tests/support/loading_run.py on 2 ranks (rank r loading checkpoint r) -> (output, seconds)."""
    start = time.monotonic()
    _, output = launched(2, [sys.executable, str(LOADING), str(first), str(second), str(timeout), str(sleep)])
    return output, time.monotonic() - start


def test_processes_with_different_checkpoints_are_refused_by_rank_0(checkpoints):
    output, _ = loading(checkpoints["full"], checkpoints["plain"])
    assert output.count("error:") == 1, output[-2000:]
    assert "rank 0: error: Process 1 of 2 loaded another checkpoint than process 0" in output, output[-2000:]


def test_a_shard_file_missing_on_one_rank_is_reported_by_rank_0(checkpoints, tmp_path):
    copy = shutil.copytree(checkpoints["full"], tmp_path / "full")
    output, _ = loading(copy, copy)
    assert "rank 0: loaded" in output and "rank 1: loaded" in output, output[-2000:]
    index = json.loads((copy / "model.safetensors.index.json").read_text())["weight_map"]
    later = sorted({f for f in index.values() if all(_layer(k) in (3, 4, 5) for k, g in index.items() if g == f)})
    (copy / later[0]).unlink()  # only rank 1 (layers 2-5) reads it
    output, _ = loading(copy, copy)
    assert output.count("error:") == 1, output[-2000:]
    assert "rank 0: error: Process 1 of 2 could not load its part of the model:" in output, output[-2000:]
    assert later[0] in output


def test_a_process_that_never_loads_fails_rank_0_within_the_bound(checkpoints):
    output, seconds = loading(checkpoints["full"], checkpoints["full"], timeout=3, sleep=120)
    assert "rank 0: error: Another process of the group did not finish loading within 3 s" in output, output[-2000:]
    assert seconds < 60 and "loaded" not in output  # rank 1 was still asleep: mlx.launch stopped it
    assert not left_running(str(LOADING))


@pytest.mark.parametrize("mode", ["pipeline", "tensor"])
def test_a_drafter_on_a_split_model_keeps_the_reply(mode, drafting, inputs, tmp_path):
    """The drafter on the process that holds the keys it reads (pipeline), or split as the model is
    (tensor): drafted replies (K = 3 and adaptive K, rank 0's on every process) are the plain ones,
    and drafts are accepted as one process accepts them."""
    target, drafter = drafting
    got, want = sharded(2, target, mode, inputs, tmp_path, drafter), alone(target, inputs, drafter)
    for case in ("text", "one_image", "audio"):
        plain = list(want[f"{case}.reply"])
        for key in (f"{case}.reply", f"{case}.drafted3", f"{case}.drafted"):
            assert list(got[key]) == list(want[key]) == plain, key
        assert got[f"{case}.accepted3"] == want[f"{case}.accepted3"]
    print({case: int(want[f"{case}.accepted3"]) for case in ("text", "one_image", "audio")})
    assert sum(int(want[f"{case}.accepted3"]) for case in ("text", "one_image", "audio")) > 0
