"""Model card and upload of a converted folder to the Hugging Face hub.

The upload goes through huggingface_hub and is resumable, so a 24 GB upload that breaks does not
start over: create_repo, then upload_large_folder where the installed huggingface_hub has it (before
2.x: many commits, resumed from what reached the hub, a progress report), else upload_folder, which
from 2.x does the same itself (hf_xet's pipeline, with progress bars) and replaced
upload_large_folder. HF_ENDPOINT and HF_TOKEN are read when the upload starts, not when
huggingface_hub was imported, so a caller may set them late. Every failure is one sentence
(UploadError).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from mlx_gemma4u.errors import Gemma4UError

COMMIT_MESSAGE = "Upload MLX model made with mlx-gemma4u"


class _NoMissingMetadataNotice(logging.Filter):
    """Drop huggingface_hub's warning that a model card has no metadata block: a local source's
    card often has none, the converter does without it, and the warning would break --quiet."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "metadata block was not found" not in record.getMessage()


logging.getLogger("huggingface_hub.repocard").addFilter(_NoMissingMetadataNotice())


class UploadError(Gemma4UError, OSError):
    """The converted folder could not be uploaded (no token, offline, refused)."""


_ABOUT = "Gemma 4 Unified (text, images, video, audio) in MLX format for Apple silicon"
_RUN = """```sh
pip install mlx-gemma4u
mlx-gemma4u generate --model <this repo or folder> --prompt "Describe this picture." --image photo.jpg
```

```python
import mlx_gemma4u
model, processor = mlx_gemma4u.load("<this repo or folder>")
print(mlx_gemma4u.generate(model, processor, [{"role": "user", "content": "Hello"}], max_tokens=100))
```"""
_ABOUT_ASSISTANT = "Gemma 4's multi-token-prediction assistant (the drafter for speculative decoding) in MLX format"
_RUN_ASSISTANT = """```sh
pip install mlx-gemma4u
mlx-gemma4u generate --model <its target model> --draft-model <this repo or folder> --prompt "Hello"
```

```python
import mlx_gemma4u
model, processor = mlx_gemma4u.load("<its target model>")
assistant = mlx_gemma4u.load_draft_model("<this repo or folder>")
print(mlx_gemma4u.generate(model, processor, "Hello", draft_model=assistant, max_tokens=100))
```"""


def write_model_card(
    out: Path, base_model: str | None, license_: str | None, made_with: str, stats: str, assistant: bool = False
) -> None:
    """README.md with the hub metadata block, how the folder was made, and how to run it (an
    `assistant`: beside its target model)."""
    from huggingface_hub import ModelCard, ModelCardData

    data = ModelCardData(
        library_name="mlx",
        pipeline_tag=None if assistant else "image-text-to-text",
        license=license_,
        base_model=base_model,
        tags=["mlx", "gemma4", "mlx-gemma4u"],
    )
    name = out.name if base_model is None else f"{base_model} for MLX"
    source = f"[{base_model}](https://huggingface.co/{base_model})" if base_model else "a local checkpoint"
    text = f"""---
{data.to_yaml()}
---

# {name}

{_ABOUT_ASSISTANT if assistant else _ABOUT}, made with
mlx-gemma4u from {source}.

## How it was made

```sh
{made_with}
```

{stats}

## Run it

{_RUN_ASSISTANT if assistant else _RUN}
"""
    ModelCard(text).save(out / "README.md")


def upload_token(repo: str) -> str:
    """Check `repo` and find a token before any work is done -> the token (HF_TOKEN or the login's)."""
    from huggingface_hub import get_token

    if repo.count("/") != 1 or not all(repo.split("/")):
        raise UploadError(f"--upload-repo must look like USER/NAME, got {repo!r}.")
    token = os.environ.get("HF_TOKEN") or get_token()
    if not token:
        raise UploadError("Uploading needs a Hugging Face token: set HF_TOKEN or run `hf auth login`.")
    return token


def upload(folder: Path, repo: str, token: str) -> str:
    """Create `repo` if needed and upload `folder`, resumably -> the repo's URL."""
    from huggingface_hub import HfApi

    endpoint = os.environ.get("HF_ENDPOINT") or None
    api = HfApi(endpoint=endpoint, token=token)
    try:
        url = api.create_repo(repo, exist_ok=True)
        if hasattr(api, "upload_large_folder"):
            api.upload_large_folder(repo_id=repo, folder_path=folder, repo_type="model")
        else:
            api.upload_folder(repo_id=repo, folder_path=folder, commit_message=COMMIT_MESSAGE)
    except Exception as e:  # the hub client raises many types: offline, 401, 403, 5xx
        where = endpoint or "the Hugging Face hub"
        raise UploadError(
            f"Could not upload {folder} to {repo} on {where} ({type(e).__name__}); check the network "
            f"and that your token may write there; the converted model stays in place, and "
            f"`hf upload {repo} {folder}` sends what did not get there."
        ) from e
    return str(url)
