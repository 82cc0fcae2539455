"""The built-in demo checkpoint and the `mlx-gemma4u generate` command on it."""

import mlx.core as mx
import numpy as np
import pytest
import torch
from commands import cli
from transformers import Gemma4UnifiedForConditionalGeneration

from mlx_gemma4u.cli.main import main, parse_args
from mlx_gemma4u.weights import demo
from mlx_gemma4u.weights.loading import load_model


def test_demo_is_a_real_transformers_checkpoint(demo_home):
    """transformers loads the demo folder as it is and computes the same logits as we do."""
    path = demo_home / "demo-v1"
    theirs = Gemma4UnifiedForConditionalGeneration.from_pretrained(path, dtype=torch.float32).eval()
    ids = [2, 105, 2364, 107, 9259, 106, 107, 105, 4368, 107]
    with torch.no_grad():
        ref = theirs(input_ids=torch.tensor([ids])).logits.numpy()
    ours = np.array(load_model(path, dtype="float32")(mx.array([ids], dtype=mx.int32)))
    assert theirs.config.text_config.vocab_size == 262144
    assert np.abs(ours - ref).max() <= 1e-4 * max(1.0, np.abs(ref).max() / 5)


def test_load_demo_from_python(demo_home, monkeypatch, tmp_path):
    import mlx_gemma4u

    monkeypatch.setenv("MLX_GEMMA4U_HOME", str(demo_home))
    monkeypatch.chdir(tmp_path)  # no folder named demo here
    model, processor = mlx_gemma4u.load("demo")
    assert model.config.text.hidden_size == 64 and model.config.text.vocab_size == 262144
    assert len(mlx_gemma4u.generate(model, processor, "Hi", max_tokens=3)) > 0


def test_demo_is_written_once_and_atomically(tmp_path):
    target = tmp_path / "demo"
    assert demo.ensure_demo(target) == target
    stamp = (target / "model.safetensors").stat().st_mtime_ns
    assert demo.ensure_demo(target) == target
    assert (target / "model.safetensors").stat().st_mtime_ns == stamp
    assert "nonsense" in (target / "README.md").read_text()
    assert [p.name for p in tmp_path.iterdir()] == ["demo"]  # no staging folder left behind


def test_generate_streams_text_on_the_demo(demo_home):
    run = cli("generate", "--demo", "--prompt", "Hello", "--max-tokens", "12", home=demo_home)
    assert run.returncode == 0, run.stderr
    assert "random weights" in run.stderr
    assert "generation: 12 tokens" in run.stderr
    assert run.stdout.strip()
    again = cli("generate", "--demo", "--prompt", "Hello", "--max-tokens", "12", home=demo_home)
    assert again.stdout == run.stdout  # greedy by default: the same text twice


def test_cli_errors_are_one_line(tmp_path, demo_home):
    run = cli("generate", "--model", str(tmp_path), "--prompt", "Hi", home=demo_home)
    assert run.returncode == 1
    assert run.stderr.strip().count("\n") == 0 and run.stderr.startswith("error: ")
    assert "config.json" in run.stderr
    run = cli("generate", "--demo", "--prompt", "Hi", "--image", str(tmp_path / "missing.png"), home=demo_home)
    assert run.returncode == 1 and run.stderr.strip().splitlines()[-1].startswith("error: ")
    assert "Traceback" not in run.stderr


@pytest.mark.parametrize(
    "flag, value, message",
    [
        ("--temp", "-1", "temperature must be 0 (greedy) or more"),
        ("--top-p", "2", "top_p must be in [0, 1]"),
        ("--min-p", "1", "min_p must be in [0, 1)"),
        ("--top-k", "-1", "top_k must be 0 (off) or a positive integer"),
        ("--max-tokens", "0", "max_tokens must be a positive integer"),
        ("--seed", "-1", "seed must be a whole number from 0 to 2**64 - 1, got -1"),
        ("--seed", str(2**64), "seed must be a whole number from 0"),
    ],
)
@pytest.mark.parametrize("command", [["generate", "--demo", "--prompt", "Hi"], ["chat", "--demo"]])
def test_bad_settings_are_refused_as_the_engine_refuses_them_before_anything_loads(
    command, flag, value, message, monkeypatch, capsys
):
    """The flags build a SamplingParams, whose check is the engine's: the same bounds and words as
    Python's keywords and the server's JSON, in one line, exit 1, before the model loads."""
    monkeypatch.setattr("mlx_gemma4u.cli.flags.load_from_args", no_loading)
    assert main([*command, flag, value]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and err.count("\n") == 1


@pytest.mark.parametrize(
    "flag, value, message",
    [
        ("--max-tokens", "x", "--max-tokens: must be a whole number, got 'x'"),
        ("--seed", "1.5", "--seed: must be a whole"),
        ("--temp", "hot", "--temp: must be a number, got 'hot'"),
        ("--kv-bits", "3", "--kv-bits: invalid choice: 3"),
        ("--num-draft-tokens", "-1", "--num-draft-tokens: must be an integer >= 0"),
    ],
)
@pytest.mark.parametrize("command", [["generate", "--demo", "--prompt", "Hi"], ["chat", "--demo"]])
def test_unreadable_flags_are_argparse_usage_errors(command, flag, value, message, monkeypatch, capsys):
    monkeypatch.setattr("mlx_gemma4u.cli.flags.load_from_args", no_loading)
    with pytest.raises(SystemExit) as exit_:
        main([*command, flag, value])
    assert exit_.value.code == 2 and message in capsys.readouterr().err


def no_loading(args, adapter_path=None):
    raise AssertionError("the model was loaded before the flags were checked")


@pytest.mark.parametrize("flag, kind", [("--image", "image"), ("--video", "video"), ("--audio", "audio")])
def test_a_missing_media_file_is_refused_before_the_model_loads(flag, kind, tmp_path, monkeypatch, capsys):
    """generate checks its local media paths first (one sentence, exit 1): the model loader is never
    called; a URL is left to the processor, so loading goes ahead."""
    monkeypatch.setattr("mlx_gemma4u.cli.flags.load_from_args", no_loading)
    missing = str(tmp_path / "gone.file")
    assert main(["generate", "--demo", "--prompt", "Hi", flag, missing]) == 1
    assert capsys.readouterr().err == f"error: The {kind} file {missing!r} does not exist; check the path.\n"
    assert main(["generate", "--demo", "--prompt", "Hi", flag, str(tmp_path)]) == 1
    assert "is a folder, not a" in capsys.readouterr().err
    with pytest.raises(AssertionError, match="the model was loaded"):
        main(["generate", "--demo", "--prompt", "Hi", flag, "https://example.com/a.file"])


@pytest.mark.parametrize("where", [0, 1, 2, 4, 6])
def test_debug_is_accepted_anywhere(where):
    line = ["generate", "--demo", "--prompt", "Hi", "--max-tokens", "3"]
    args = parse_args(line[:where] + ["--debug"] + line[where:])
    assert args.debug and args.command == "generate" and args.max_tokens == 3 and args.prompt == "Hi"
    assert not parse_args(line).debug


def test_debug_after_the_subcommand_shows_the_traceback(demo_home):
    run = cli("generate", "--demo", "--prompt", "Hi", "--image", "missing.png", "--debug", home=demo_home)
    assert run.returncode == 1 and "Traceback" in run.stderr and "InputError: " in run.stderr


@pytest.mark.parametrize(
    "line, expected",
    [
        (["generate", "--demo", "--prompt", "Hi"], 32),
        (["generate", "--model", "m", "--prompt", "Hi"], 256),
        (["chat", "--demo"], 32),
        (["chat", "--model", "m"], 1024),
        (["generate", "--demo", "--prompt", "Hi", "--max-tokens", "100"], 100),
    ],
)
def test_max_tokens_defaults(line, expected):
    assert parse_args(line).max_tokens == expected


def test_the_first_command_prints_the_warning_first_and_a_short_reply(demo_home):
    run = cli("generate", "--demo", "--prompt", "Hello", home=demo_home)
    assert run.returncode == 0, run.stderr
    assert run.stderr.splitlines()[0] == demo.WARNING
    assert int(run.stderr.split("generation: ")[1].split()[0]) <= 32


def test_generate_takes_media_files(demo_home, fixtures_dir):
    run = cli(
        "generate",
        "--demo",
        "--prompt",
        "Describe both.",
        "--max-tokens",
        "3",
        "--image",
        str(fixtures_dir / "images/tiny_coffee_40x27.png"),
        "--audio",
        str(fixtures_dir / "audio/speech_tiny_25ms_16k.wav"),
        home=demo_home,
    )
    assert run.returncode == 0, run.stderr
    prompt_tokens = int(run.stderr.split("prompt: ")[1].split()[0])
    assert prompt_tokens > 260  # 260 image soft tokens plus the audio token and the text
    missing = cli("generate", "--demo", "--prompt", "Hi", "--image", "no/such.png", home=demo_home)
    assert missing.returncode == 1 and "no/such.png" in missing.stderr and "Traceback" not in missing.stderr
    assert demo.WARNING not in missing.stderr  # refused before the model loads


def test_generate_holds_the_reply_to_a_schema_a_regex_or_a_grammar(demo_home, tmp_path, monkeypatch, capsys):
    """--json-schema FILE, --regex, --grammar FILE: the printed reply matches; a bad or missing
    file is refused in one line before the model loads."""
    import json
    import re

    import jsonschema

    monkeypatch.setenv("MLX_GEMMA4U_HOME", str(demo_home))
    schema = {"type": "object", "properties": {"n": {"enum": [1, 2, 3]}}, "required": ["n"]}
    (tmp_path / "schema.json").write_text(json.dumps(schema))
    (tmp_path / "yes.lark").write_text('start: "yes" | "no"')
    base = ["generate", "--demo", "--prompt", "Hi", "--max-tokens", "40"]
    replies = []
    for shape in (
        ["--json-schema", str(tmp_path / "schema.json")],
        ["--regex", "[0-9]{3}"],
        ["--grammar", str(tmp_path / "yes.lark")],
    ):
        assert main([*base, *shape]) == 0
        replies.append(capsys.readouterr().out.strip())
    jsonschema.validate(json.loads(replies[0]), schema)
    assert re.fullmatch("[0-9]{3}", replies[1]) and replies[2] in ("yes", "no")

    monkeypatch.setattr("mlx_gemma4u.cli.flags.load_from_args", no_loading)
    (tmp_path / "bad.json").write_text("{not json")
    for shape, message in (
        (["--json-schema", str(tmp_path / "bad.json")], "is not JSON"),
        (["--json-schema", str(tmp_path / "gone.json")], "Could not read --json-schema"),
        (["--regex", "(("], "regular expression cannot be used"),
        (["--grammar", str(tmp_path / "schema.json")], "grammar cannot be used"),
    ):
        assert main([*base, *shape]) == 1
        err = capsys.readouterr().err
        assert err.startswith("error: ") and message in err and err.count("\n") == 1, err
