"""`mlx-gemma4u lora` as a user runs it, on the demo checkpoint and a few lines of chat data:
bad data refused by file and line, adapters saved, resumed, loaded by generate, batch_generate
and serve with the same replies, and a run stopped by Ctrl-C or killed leaves good adapters."""

import json
import os
import signal
import subprocess
import sys
import threading
import time

import mlx.core as mx
import pytest
from commands import cli
from serving import running

from mlx_gemma4u import batch_generate, generate
from mlx_gemma4u.weights.adapters import CONFIG, WEIGHTS
from mlx_gemma4u.weights.loading import load

CHAT = [
    {"messages": [{"role": "user", "content": f"Say {word}."}, {"role": "assistant", "content": word}]}
    for word in ("hello", "world", "sea", "sky", "stone", "tree")
]
PICTURE = {
    "messages": [
        {"role": "user", "content": [{"type": "image", "image": "photo.png"}, {"type": "text", "text": "Say what."}]},
        {"role": "assistant", "content": "camera"},
    ]
}
PROMPT = [{"role": "user", "content": "Say sky."}]
TRAIN = ("--batch-size", "2", "--learning-rate", "0.02", "--steps-per-report", "2", "--num-layers", "-1")
MEDIA = ("--adapt-media", "--max-soft-tokens", "70")  # the patch projection trains on the picture


def lora_args(data, out, iters: int, *more: str) -> list[str]:
    """`mlx-gemma4u lora` on the demo: train `iters` steps on `data`, adapters to `out`."""
    return [
        "lora",
        "--demo",
        "--train",
        "--data",
        str(data),
        "--iters",
        str(iters),
        "--adapter-path",
        str(out),
        *TRAIN,
        *more,
    ]


@pytest.fixture(scope="module")
def data(tmp_path_factory, fixtures_dir):
    folder = tmp_path_factory.mktemp("data")
    (folder / "photo.png").write_bytes((fixtures_dir / "images" / "gray_camera_512x512.png").read_bytes())
    for split in ("train", "valid"):
        (folder / f"{split}.jsonl").write_text("\n".join(json.dumps(line) for line in [*CHAT, PICTURE]))
    return folder


@pytest.fixture(scope="module")
def text_data(tmp_path_factory):
    """The chat lines alone: the runs stopped by a signal need only short, even steps."""
    folder = tmp_path_factory.mktemp("text_data")
    for split in ("train", "valid"):
        (folder / f"{split}.jsonl").write_text("\n".join(json.dumps(line) for line in CHAT))
    return folder


@pytest.fixture(scope="module")
def trained(data, demo_home, tmp_path_factory):
    """Adapters of a 6-step run (decoder and media projections), and what the command printed."""
    out = tmp_path_factory.mktemp("run") / "adapters"
    run = cli(*lora_args(data, out, 6, *MEDIA), home=demo_home)
    assert run.returncode == 0, run.stderr
    return out, run.stderr


def test_a_run_reports_and_saves_its_adapters(trained):
    out, printed = trained
    config = json.loads((out / CONFIG).read_text())
    assert config["iteration"] == 6 and config["fine_tune_type"] == "lora" and config["num_layers"] == -1
    assert "train loss" in printed and "val loss" in printed and "tok/s" in printed and "peak" in printed
    assert "Trainable parameters" in printed
    assert not list(out.glob("*.partial*"))
    weights = mx.load(str(out / WEIGHTS))
    assert mx.abs(weights["embed_vision.patch_dense.lora_b"]).max().item() > 0  # trained on the picture
    assert mx.abs(weights["embed_audio.embedding_projection.lora_b"]).max().item() == 0  # no audio in the data


def test_adapters_give_the_same_reply_in_generate_batch_generate_and_serve(trained, demo_home, tmp_path):
    out, _ = trained
    model, processor = load(demo_home / "demo-v1", adapter_path=out)
    plain = generate(*load(demo_home / "demo-v1"), PROMPT, max_tokens=8)
    reply = generate(model, processor, PROMPT, max_tokens=8)
    assert reply != plain  # the adapters change the model
    assert [r.text for r in batch_generate(model, processor, [PROMPT, PROMPT], max_tokens=8)] == [reply, reply]
    run = cli(
        "generate",
        "--demo",
        "--adapter-path",
        str(out),
        "--prompt",
        "Say sky.",
        "--max-tokens",
        "8",
        "--temp",
        "0",
        home=demo_home,
    )
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == reply.strip()
    from openai import OpenAI

    with running(demo_home, tmp_path / "serve.log", "--adapter-path", str(out)) as (url, _):
        client = OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=60)
        answer = client.chat.completions.create(model="demo", messages=PROMPT, max_tokens=8, temperature=0)
    assert answer.choices[0].message.content == reply


def test_resume_continues_from_the_saved_step(trained, data, demo_home, tmp_path):
    """A resumed run (here with gradient checkpointing on) goes on from the saved step and loss."""
    out, printed = trained
    again = tmp_path / "again"
    resume = ("--resume-adapter-file", str(out / WEIGHTS), "--grad-checkpoint")
    run = cli(*lora_args(data, again, 8, *resume), home=demo_home)
    assert run.returncode == 0, run.stderr
    assert json.loads((again / CONFIG).read_text())["iteration"] == 8
    steps = [
        line.split(":")[0] for line in run.stderr.splitlines() if line.startswith("step ") and "train loss" in line
    ]
    assert set(steps) == {"step 8"}  # steps 7 and 8 only: reported at 8
    last = float(printed.split("train loss")[-1].split()[0])
    resumed = float(run.stderr.split("train loss")[-1].split()[0])
    assert resumed < 1.5 * last  # the curve goes on from where it was, not from the start


@pytest.mark.parametrize(
    "line, reason",
    [
        ("{not json", "not JSON"),
        (json.dumps({"messages": "hi"}), "list of at least two messages"),
        (json.dumps({"input": "x"}), '"messages", "prompt" and "completion", or "text"'),
        (
            json.dumps(
                {
                    "messages": [
                        {"role": "user", "content": [{"type": "image", "image": "nope.png"}]},
                        {"role": "assistant", "content": "x"},
                    ]
                }
            ),
            "nope.png",
        ),
    ],
)
def test_a_bad_data_line_is_refused_with_its_file_line_and_reason(line, reason, demo_home, tmp_path):
    (tmp_path / "train.jsonl").write_text(json.dumps(CHAT[0]) + "\n" + line + "\n")
    out = tmp_path / "adapters"
    run = cli("lora", "--demo", "--train", "--data", str(tmp_path), "--adapter-path", str(out), home=demo_home)
    assert run.returncode == 1
    error = run.stderr.strip().splitlines()[-1]
    assert error.startswith("error: ") and "train.jsonl:2:" in error and reason in error, error
    assert not out.exists()


def _train_in_background(data, demo_home, out, *more):
    env = {**os.environ, "MLX_GEMMA4U_HOME": str(demo_home)}
    args = lora_args(data, out, 100000, *more)
    return subprocess.Popen(
        [sys.executable, "-m", "mlx_gemma4u", *args],
        env=env,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=_ctrl_c_as_in_a_terminal,
    )


def _ctrl_c_as_in_a_terminal() -> None:
    """A shell's background job (a CI script run with &) ignores SIGINT, and so would the run: give
    it the default disposition, as a terminal's foreground command has."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _wait_for(process, text: str, seconds: float = 120) -> list[str]:
    """Read the run's stderr up to a line with `text` -> the lines read; the rest is drained into
    that list in the background, so the run never blocks on a full pipe."""
    lines: list[str] = []
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        lines.append(process.stderr.readline())
        if text in lines[-1]:
            threading.Thread(target=lambda: lines.extend(process.stderr), daemon=True).start()
            return lines
        assert lines[-1] or process.poll() is None, "the run ended early"
    raise AssertionError(f"no {text!r} within {seconds} s")


def test_ctrl_c_saves_the_adapters_and_stops(text_data, demo_home, tmp_path):
    out = tmp_path / "adapters"
    process = _train_in_background(text_data, demo_home, out)
    try:
        said = _wait_for(process, "train loss")
        process.send_signal(signal.SIGINT)
        try:
            process.wait(timeout=120)
        except subprocess.TimeoutExpired:
            pytest.fail("the run did not stop within 120 s of Ctrl-C; it printed:\n" + "".join(said[-40:]))
    finally:
        process.kill()
    assert process.returncode == 0
    saved = json.loads((out / CONFIG).read_text())["iteration"]
    assert saved >= 2
    model, processor = load(demo_home / "demo-v1", adapter_path=out)  # the saved adapters load
    assert generate(model, processor, PROMPT, max_tokens=2)


def test_a_killed_run_leaves_the_last_good_adapters(text_data, demo_home, tmp_path):
    out = tmp_path / "adapters"
    process = _train_in_background(text_data, demo_home, out, "--save-every", "2")
    try:
        _wait_for(process, "adapters saved")
        time.sleep(1.0)  # more saves under way
        process.kill()
        process.wait(timeout=30)
    finally:
        process.kill()
    weights = mx.load(str(out / WEIGHTS))  # whole: written under another name, then renamed
    assert weights and json.loads((out / CONFIG).read_text())["iteration"] % 2 == 0
    load(demo_home / "demo-v1", adapter_path=out)


def test_the_fused_model_equals_base_plus_adapters(trained, demo_home, tmp_path):
    """bfloat16 demo: fusing rounds W + scale * (A B)^T to bfloat16 once, where the adapted model
    adds the two products; bound 5% of max|logit| and of the adapters' own change to the logits.
    Measured: 0.0205, 2.2% of max|logit| 0.926 and 1.8% of the change, 1.15."""
    out, _ = trained
    fused = tmp_path / "fused"
    run = cli("fuse", "--demo", "--adapter-path", str(out), "--save-path", str(fused), "--quiet", home=demo_home)
    assert run.returncode == 0, run.stderr
    ids = mx.array([[2, 105, 2364, 107, 4521, 106]], dtype=mx.int32)
    adapted = load(demo_home / "demo-v1", adapter_path=out)[0](ids).astype(mx.float32)
    merged = load(fused)[0](ids).astype(mx.float32)
    base = load(demo_home / "demo-v1")[0](ids).astype(mx.float32)
    gap, change = mx.abs(merged - adapted).max().item(), mx.abs(base - adapted).max().item()
    print(f"fused vs adapted {gap:.3g}, base vs adapted {change:.3g}, max|logit| {mx.abs(adapted).max().item():.3g}")
    assert gap <= 0.05 * mx.abs(adapted).max().item() and gap <= 0.05 * change


@pytest.mark.parametrize(
    "flags, config, message",
    [
        (["--iters", "0"], None, "iters must be a whole number > 0"),
        (["--seed", "-1"], None, "seed must be a whole number >= 0"),
        ([], "batch_size: 0\n", "batch-size must be a whole number > 0"),
        ([], "learning_rate: 1e-5\nrank: eight\n", "rank must be a whole number > 0"),
        ([], "epochs: 3\n", "unknown setting 'epochs'"),
        ([], "grad_checkpoint: 3\n", "grad-checkpoint must be true or false"),
    ],
)
def test_a_bad_setting_is_refused_in_one_sentence_before_the_model_loads(flags, config, message, data, tmp_path):

    extra = []
    if config is not None:
        (tmp_path / "c.yaml").write_text(config)
        extra = ["--config", str(tmp_path / "c.yaml")]
    run = cli(
        "lora", "--model", str(tmp_path / "nowhere"), "--train", "--data", str(data), *flags, *extra, home=tmp_path
    )
    assert run.returncode == 1 and message in run.stderr and "Traceback" not in run.stderr, run.stderr
