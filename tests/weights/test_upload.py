"""The hub upload, against fake huggingface_hub APIs that record their calls (the HTTP side is
tested in test_convert.py), and the model card written without huggingface_hub's log noise."""

import os
import subprocess
import sys

import pytest

from mlx_gemma4u.convert.upload import COMMIT_MESSAGE, UploadError, upload


class Hub2:
    """huggingface_hub 2.x: upload_folder resumes by itself (hf_xet); there is no upload_large_folder."""

    calls: list = []

    def __init__(self, endpoint=None, token=None):
        self.calls.append(("HfApi", endpoint, token))

    def create_repo(self, repo_id, exist_ok=False):
        self.calls.append(("create_repo", repo_id, exist_ok))
        return f"https://hub.test/{repo_id}"

    def upload_folder(self, **kwargs):
        self.calls.append(("upload_folder", kwargs))


class HubBefore2(Hub2):
    """huggingface_hub before 2.x: upload_folder is one commit that starts over; upload_large_folder resumes."""

    def upload_large_folder(self, **kwargs):
        self.calls.append(("upload_large_folder", kwargs))


class BrokenHub(HubBefore2):
    def upload_large_folder(self, **kwargs):
        raise ConnectionError("connection reset after 9 GB")


@pytest.fixture
def fake_hub(monkeypatch):
    def use(api):
        api.calls.clear()
        monkeypatch.setattr("huggingface_hub.HfApi", api)
        return api.calls

    monkeypatch.setenv("HF_ENDPOINT", "https://hub.test")
    return use


def test_upload_goes_through_the_resumable_upload_large_folder(fake_hub, tmp_path):
    calls = fake_hub(HubBefore2)
    assert upload(tmp_path, "me/model", "hf_x") == "https://hub.test/me/model"
    assert calls == [
        ("HfApi", "https://hub.test", "hf_x"),
        ("create_repo", "me/model", True),
        ("upload_large_folder", {"repo_id": "me/model", "folder_path": tmp_path, "repo_type": "model"}),
    ]


def test_upload_uses_upload_folder_where_it_resumes_itself(fake_hub, tmp_path):
    calls = fake_hub(Hub2)
    upload(tmp_path, "me/model", "hf_x")
    assert calls[-1] == (
        "upload_folder",
        {"repo_id": "me/model", "folder_path": tmp_path, "commit_message": COMMIT_MESSAGE},
    )


def test_installed_hub_upload_folder_resumes():
    """The premise of the fallback: the installed huggingface_hub either has upload_large_folder or
    an upload_folder that says it resumes."""
    from huggingface_hub import HfApi

    assert hasattr(HfApi, "upload_large_folder") or "resumes" in HfApi.upload_folder.__doc__


def test_a_broken_upload_says_how_to_resume(fake_hub, tmp_path):
    fake_hub(BrokenHub)
    with pytest.raises(UploadError) as caught:
        upload(tmp_path, "me/model", "hf_x")
    message = str(caught.value)
    assert "ConnectionError" in message and f"hf upload me/model {tmp_path}" in message and "\n" not in message


def test_convert_prints_no_hub_log_lines(demo_home, tmp_path):
    """The demo's card has no metadata block; huggingface_hub's warning about that stays out of convert."""
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "mlx_gemma4u",
            "convert",
            "--hf-path",
            str(demo_home / "demo-v1"),
            "--mlx-path",
            str(tmp_path / "out"),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "MLX_GEMMA4U_HOME": str(demo_home)},
    )
    assert run.returncode == 0, run.stderr
    assert "metadata block" not in run.stderr and "bits per weight" in run.stderr
