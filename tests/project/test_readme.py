"""README.md runs as written: its set-up commands are .ci/run's, and every other command and Python
example in it runs, on stand-ins, through the public API only.

Stand-ins: the commands and examples run verbatim in a scratch folder where each model id the
README names (google/gemma-4-12B-it, ...) is a folder of that path, and load() takes a local folder
before a repo id: the demo checkpoint, a quantized conversion of it, or the demo drafter. photo.jpg,
speech.wav and clip.mp4 there are the shared fixtures. Only two things change: the server's port
(to a free one), and every reply is cut to SHORT tokens (the demo's replies are nonsense, and a
thousand of them would make this test the slowest of the suite).
"""

import ast
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from commands import cli as run_cli
from serving import free_port

REPO = Path(__file__).resolve().parents[2]
README = (REPO / "README.md").read_text()
SERVER = "127.0.0.1:8080"  # the address the README's client example talks to
SHORT = 8  # tokens per reply

# model id the README names -> what stands in for it: the demo, a conversion of the demo with these
# convert flags, or the demo drafter
STAND_INS = {
    "google/gemma-4-12B-it": "demo",
    "google/gemma-4-12B-it-qat-q4_0-unquantized": "demo",
    "mlx-community/gemma-4-12B-it-4bit": ["-q"],
    "mlx-community/gemma-4-12B-it-8bit": ["-q", "--q-bits", "8"],
    "google/gemma-4-12B-it-assistant": "drafter",
}
DATA = "my_data"  # the fine-tuning data folder the README names: a few chat lines stand in
MEDIA = {
    "photo.jpg": "images/landscape_rocket_640x427.jpg",
    "speech.wav": "audio/speech_16k_mono.wav",
    "clip.mp4": "video/kenburns_astronaut_320x240_24fps_3s_h264_aac.mp4",
}


def section(title: str) -> str:
    return README.split(f"\n## {title}\n", 1)[1].split("\n## ", 1)[0]


def blocks(language: str, text: str = README) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)\n```", text, re.S)


def setup_commands() -> list[str]:
    return blocks("sh", section("Set up"))


def commands() -> list[str]:
    """Every command line of the README's sh blocks outside "Set up" (which .ci/run runs)."""
    setup = set(setup_commands())
    return [line for block in blocks("sh") if block not in setup for line in block.splitlines() if line.strip()]


def python_examples() -> list[str]:
    return blocks("python")


def test_the_first_command_installs_the_runtime_dependencies_only():
    install, test = setup_commands()
    assert "pip install -e . &&" in install and "[test]" not in install and "--demo" in install
    assert 'pip install -e ".[test]"' in test and test.endswith("python -m pytest -q")


def test_ci_runs_the_readme_commands_verbatim():
    lines = (REPO / ".ci/run").read_text().splitlines()
    assert all(command in lines for command in setup_commands())


def test_the_readme_is_short():
    assert len(README.splitlines()) < 260


def slug(heading: str) -> str:
    """GitHub's anchor of a Markdown heading."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    return {slug(m) for m in re.findall(r"^#+ (.*)$", path.read_text(), re.M)}


def test_every_docs_link_exists_and_every_doc_is_linked():
    docs = sorted((REPO / "docs").glob("*.md"))
    pages = {"README.md": README, **{f"docs/{p.name}": p.read_text() for p in docs}}
    for page, text in pages.items():
        base = (REPO / page).parent
        for target, anchor in re.findall(r"\]\(((?:docs/)?[\w-]+\.md)(?:#([\w-]+))?\)", text):
            path = (base / target).resolve()
            assert path.is_file(), f"{page} links to {target}, which does not exist"
            assert not anchor or anchor in anchors(path), f"{page} links to {target}#{anchor}, no such heading"
    linked = set(re.findall(r"\]\((docs/[\w-]+\.md)", README))
    assert {f"docs/{p.name}" for p in docs} <= linked, "every docs/*.md is linked from the README"


def test_every_model_id_in_the_examples_has_a_stand_in():
    named = set(re.findall(r"\b[\w-]+/gemma-4-[\w.-]*\w", "\n".join(blocks("sh") + python_examples())))
    assert named and named <= set(STAND_INS), f"no stand-in for {named - set(STAND_INS)}"


def test_the_python_examples_use_only_the_public_api():
    import mlx_gemma4u

    for example in python_examples():
        for node in ast.walk(ast.parse(example)):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("mlx_gemma4u"):
                assert node.module == "mlx_gemma4u", f"{node.module} is not the public API"
                assert {a.name for a in node.names} <= set(mlx_gemma4u.__all__)
            elif isinstance(node, ast.Import):
                assert all(a.name == "mlx_gemma4u" or not a.name.startswith("mlx_gemma4u") for a in node.names)
            elif isinstance(node, ast.Attribute) and getattr(node.value, "id", None) == "mlx_gemma4u":
                assert node.attr in mlx_gemma4u.__all__, f"mlx_gemma4u.{node.attr} is not the public API"


@pytest.fixture(scope="module")
def scratch(demo_home, fixtures_dir, tmp_path_factory) -> Path:
    """A folder where the README's model ids and media names are the stand-ins."""
    from mlx_gemma4u.weights.demo import ensure_demo_drafter

    root = tmp_path_factory.mktemp("readme")
    demo, drafter = demo_home / "demo-v1", ensure_demo_drafter(demo_home / "demo-drafter-v1")
    for name, source in MEDIA.items():
        shutil.copy(fixtures_dir / source, root / name)
    (root / DATA).mkdir()
    chat = [{"messages": [{"role": "user", "content": w}, {"role": "assistant", "content": w}]} for w in ("a", "b")]
    for split in ("train", "valid"):
        (root / DATA / f"{split}.jsonl").write_text("\n".join(json.dumps(line) for line in chat))
    for repo, stand_in in STAND_INS.items():
        folder = root / repo
        folder.parent.mkdir(exist_ok=True)
        if stand_in == "demo":
            folder.symlink_to(demo, target_is_directory=True)
        elif stand_in == "drafter":
            folder.symlink_to(drafter, target_is_directory=True)
        else:
            cli("convert", "--demo", "--mlx-path", str(folder), "--quiet", *stand_in, home=demo_home, cwd=root)
    return root


def cli(*args: str, home: Path, cwd: Path, stdin: str = "") -> subprocess.CompletedProcess:
    done = run_cli(*args, home=home, cwd=cwd, stdin=stdin)
    assert done.returncode == 0, f"mlx-gemma4u {shlex.join(args)} failed:\n{done.stderr[-2000:]}"
    return done


def words(line: str) -> list[str]:
    argv = shlex.split(line, comments=True)
    assert argv[0] == "mlx-gemma4u", f"the README's commands are mlx-gemma4u commands, not {line!r}"
    return argv[1:]


def shortened(argv: list[str]) -> list[str]:
    """The command with its replies cut to SHORT tokens (and a training run to SHORT steps)."""
    if argv[0] == "lora" and "--iters" in argv:
        at = argv.index("--iters") + 1
        return [*argv[:at], str(SHORT), *argv[at + 1 :]]
    if argv[0] not in ("generate", "chat", "serve") or "--help" in argv:
        return argv
    if "--max-tokens" in argv:
        at = argv.index("--max-tokens") + 1
        return [*argv[:at], str(SHORT), *argv[at + 1 :]]
    return [*argv, "--max-tokens", str(SHORT)]


def shortened_example(example: str) -> str:
    return re.sub(r"""(max_tokens=|"max_tokens": )\d+""", rf"\g<1>{SHORT}", example)


def test_every_command_runs(scratch, demo_home):
    """In the README's order, so a command can use what an earlier one converted."""
    ran = set()
    for line in commands():
        argv = words(line)
        if argv[0] == "serve":
            continue  # test_serve_and_the_client_example
        done = cli(*shortened(argv), home=demo_home, cwd=scratch, stdin="Hello\n" if argv[0] == "chat" else "")
        if "--help" in argv:
            assert done.stdout.startswith("usage:"), line
        elif argv[0] == "generate":
            assert "generation:" in done.stderr, line  # the statistics line after the reply
        elif argv[0] == "chat":
            assert "tokens/s" in done.stdout, line  # the status line after the reply
        elif argv[0] == "convert":
            assert (scratch / argv[argv.index("--mlx-path") + 1] / "config.json").is_file(), line
        elif argv[0] == "lora":
            assert (scratch / "adapters" / "adapters.safetensors").is_file() and "train loss" in done.stderr, line
        elif argv[0] == "fuse":
            assert (scratch / argv[argv.index("--save-path") + 1] / "config.json").is_file(), line
        ran.add(argv[0])
    assert ran == {"generate", "chat", "convert", "lora", "fuse"}


@pytest.mark.parametrize("example", [e for e in python_examples() if SERVER not in e])
def test_the_python_example_runs(example, scratch, demo_home, monkeypatch, capsys):
    monkeypatch.chdir(scratch)
    monkeypatch.setenv("MLX_GEMMA4U_HOME", str(demo_home))
    assert shortened_example(example) != example, "each example names its max_tokens"
    exec(compile(shortened_example(example), "README.md", "exec"), {"__name__": "__readme__"})
    assert capsys.readouterr().out.strip()


def test_serve_and_the_client_example(scratch, demo_home, tmp_path):
    serve = [words(line) for line in commands() if words(line)[0] == "serve"]
    clients = [e for e in python_examples() if SERVER in e]
    assert serve and clients
    for argv in serve:
        port = free_port()
        env = {**os.environ, "MLX_GEMMA4U_HOME": str(demo_home), "HF_HUB_OFFLINE": "1"}
        log = tmp_path / f"serve-{port}.log"
        with open(log, "wb") as out:
            process = subprocess.Popen(
                [sys.executable, "-m", "mlx_gemma4u", *shortened(argv), "--port", str(port)],
                cwd=scratch,
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        try:
            wait_for(f"http://127.0.0.1:{port}/health", process, log)
            for example in clients:
                namespace = {"__name__": "__readme__"}
                exec(compile(example.replace(SERVER, f"127.0.0.1:{port}"), "README.md", "exec"), namespace)
                assert namespace["reply"].choices[0].message.content
        finally:
            process.terminate()
            process.wait(timeout=30)


def wait_for(url: str, process: subprocess.Popen, log: Path) -> None:
    for _ in range(240):  # at most two minutes
        try:
            urllib.request.urlopen(url, timeout=1)
            return
        except OSError:
            if process.poll() is not None:
                raise AssertionError(f"the server exited: {log.read_text()[-2000:]}") from None
            time.sleep(0.5)
    raise AssertionError("the server did not answer /health within two minutes")
