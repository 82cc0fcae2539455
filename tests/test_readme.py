"""README's set-up commands: the first needs the runtime dependencies only, and .ci/run runs both verbatim."""

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def setup_commands() -> list[str]:
    section = (REPO / "README.md").read_text().split("## Set up", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```sh\n(.*?)\n```", section, re.S)


def test_the_first_command_installs_the_runtime_dependencies_only():
    install, test = setup_commands()
    assert "pip install -e . &&" in install and "[test]" not in install and "--demo" in install
    assert 'pip install -e ".[test]"' in test and test.endswith("python -m pytest -q")


def test_ci_runs_the_readme_commands_verbatim():
    lines = (REPO / ".ci/run").read_text().splitlines()
    assert all(command in lines for command in setup_commands())
