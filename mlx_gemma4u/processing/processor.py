"""`Gemma4UProcessor`: text, images, videos and audio in, model inputs out, as transformers does.

Mirrors transformers 5.23's `Gemma4UnifiedProcessor` without torch: same call shape, same output
keys and values. For a batch of B prompts padded to length L:
  input_ids, attention_mask, mm_token_type_ids   (B, L) int64
  pixel_values (N_img, T, 6912), image_position_ids (N_img, T, 2)             with images
  pixel_values_videos (F, T, 6912), video_position_ids (F, T, 2),
  num_frames_per_video (V,)                                                  with videos
  input_features (N_audio, frames, 640), input_features_mask (N_audio, frames)  with audio
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from mlx_gemma4u.errors import InputError
from mlx_gemma4u.processing.audio import Gemma4UAudioFeatureExtractor, as_clip_list
from mlx_gemma4u.processing.chat_template import default_template, render_chat, render_chat_text, template_text
from mlx_gemma4u.processing.image import Gemma4UImageProcessor, flatten_images
from mlx_gemma4u.processing.messages import MEDIA_SOURCES, check_messages
from mlx_gemma4u.processing.tensors import convert_outputs
from mlx_gemma4u.processing.text import (
    GEMMA4_STOP_IDS,
    MultimodalTokens,
    TextEscapes,
    audio_block,
    encode_batch,
    expand_placeholders,
    image_block,
    load_tokenizer,
    mm_token_type_ids,
    multimodal_tokens,
    video_block,
)
from mlx_gemma4u.processing.tokenizer import read_json
from mlx_gemma4u.processing.video import DEFAULT_NUM_FRAMES, DEFAULT_VIDEO_BUDGET, Gemma4UVideoProcessor


class Gemma4UProcessor:
    """Prompt text plus media to the arrays the model reads; see the module docstring for shapes."""

    def __init__(
        self,
        tokenizer: Any,
        tokens: MultimodalTokens,
        image_processor: Gemma4UImageProcessor,
        video_processor: Gemma4UVideoProcessor,
        feature_extractor: Gemma4UAudioFeatureExtractor,
        chat_template: str | None = None,
    ) -> None:
        self.tokenizer = tokenizer
        self.tokens = tokens
        self.image_processor = image_processor
        self.video_processor = video_processor
        self.feature_extractor = feature_extractor
        self.chat_template = chat_template
        self.image_token, self.image_token_id = tokens.image, tokens.image_id
        self.video_token, self.video_token_id = tokens.video, tokens.video_id
        self.audio_token, self.audio_token_id = tokens.audio, tokens.audio_id

    @classmethod
    def from_pretrained(
        cls,
        model_dir: str | Path,
        max_soft_tokens: int | None = None,
        num_frames: int | None = None,
        max_audio_seconds: float | None = None,
        eos_token_ids: Sequence[int] = GEMMA4_STOP_IDS,
    ) -> Gemma4UProcessor:
        """Build the processor from a model folder (tokenizer files, optional config and processor JSON).

        Arguments given here override the folder's processor_config.json / preprocessor_config.json.
        The chat template is the one the tokenizer loaded (chat_template.jinja or tokenizer_config.json).
        """
        model_dir = Path(model_dir)
        image_settings, video_settings = _processor_settings(model_dir)
        tokenizer = load_tokenizer(model_dir, eos_token_ids)
        return cls(
            tokenizer=tokenizer,
            tokens=multimodal_tokens(tokenizer, read_json(model_dir / "config.json")),
            image_processor=Gemma4UImageProcessor(max_soft_tokens or image_settings.get("max_soft_tokens", 280)),
            video_processor=Gemma4UVideoProcessor(
                num_frames=num_frames or video_settings.get("num_frames", DEFAULT_NUM_FRAMES),
                max_soft_tokens=video_settings.get("max_soft_tokens", DEFAULT_VIDEO_BUDGET),
            ),
            feature_extractor=Gemma4UAudioFeatureExtractor(max_audio_seconds),
            chat_template=default_template(tokenizer.chat_template),
        )

    def __call__(
        self,
        text: str | list[str] | None = None,
        images: Any = None,
        videos: Any = None,
        audio: Any = None,
        return_tensors: str | None = None,
        max_soft_tokens: int | None = None,
        num_frames: int | None = None,
        fps: float | None = None,
        sampling_rate: int | None = None,
        add_special_tokens: bool = True,
        images_kwargs: dict[str, Any] | None = None,
        videos_kwargs: dict[str, Any] | None = None,
        return_metadata: bool = False,
    ) -> dict[str, Any]:
        """Expand each media placeholder in `text` and tokenize; see the module docstring for outputs.

        `max_soft_tokens` applies to images and video frames alike (as in transformers);
        `images_kwargs` / `videos_kwargs` override it per modality. Without `text`, one placeholder
        per image (or per audio clip) is used as the prompt.
        """
        images, videos, audio = _media_lists(images, videos, audio)
        texts = self._prompts(text, images, audio)
        return self._process(
            texts,
            None,
            images,
            videos,
            audio,
            return_tensors,
            add_special_tokens,
            max_soft_tokens=max_soft_tokens,
            num_frames=num_frames,
            fps=fps,
            sampling_rate=sampling_rate,
            images_kwargs=images_kwargs,
            videos_kwargs=videos_kwargs,
            return_metadata=return_metadata,
        )

    def _process(
        self,
        texts: list[str],
        escapes: TextEscapes | None,
        images: list | None,
        videos: list | None,
        audio: list | None,
        return_tensors: str | None,
        add_special_tokens: bool,
        max_soft_tokens: int | None = None,
        num_frames: int | None = None,
        fps: float | None = None,
        sampling_rate: int | None = None,
        images_kwargs: dict[str, Any] | None = None,
        videos_kwargs: dict[str, Any] | None = None,
        return_metadata: bool = False,
    ) -> dict[str, Any]:
        """`__call__` on prompts and media lists; `escapes` marks chat prompts (see TextEscapes)."""
        data: dict[str, Any] = {}
        image_blocks, video_blocks, audio_blocks = [], [], []
        if images:
            image_kwargs = {"max_soft_tokens": max_soft_tokens, **(images_kwargs or {})}
            data.update(self.image_processor(images, **image_kwargs))
            image_blocks = [image_block(self.tokens, int(n)) for n in data.pop("num_soft_tokens_per_image")]
        if videos:
            video_kwargs = {
                "max_soft_tokens": max_soft_tokens,
                "num_frames": num_frames,
                "fps": fps,
                **(videos_kwargs or {}),
            }
            data.update(self.video_processor(videos, **video_kwargs))
            per_frame = data.pop("num_soft_tokens_per_video")
            metadata = data["video_metadata"] if return_metadata else data.pop("video_metadata")
            video_blocks = [video_block(self.tokens, int(n), meta.timestamps) for n, meta in zip(per_frame, metadata)]
        if audio:
            data.update(self.feature_extractor(audio, sampling_rate=sampling_rate))
            audio_blocks = [audio_block(self.tokens, int(n)) for n in data["input_features_mask"].sum(axis=1)]

        expanded = expand_placeholders(texts, self.tokens, image_blocks, video_blocks, audio_blocks)
        input_ids, attention_mask = encode_batch(self.tokenizer, expanded, add_special_tokens, escapes)
        text_data = {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "mm_token_type_ids": mm_token_type_ids(input_ids, self.tokens),
        }
        return convert_outputs({**text_data, **data}, return_tensors)

    def _prompts(self, text: str | list[str] | None, images: list | None, audio: list | None) -> list[str]:
        if text is None:
            if images:
                return [" ".join([self.image_token] * len(images))]
            if audio:
                return [self.audio_token] * len(audio)
            raise InputError("The processor needs text, images or audio; pass at least one of them.")
        texts = [text] if isinstance(text, str) else list(text)
        if not texts or not all(isinstance(sample, str) for sample in texts):
            raise InputError("text must be a string or a non-empty list of strings.")
        return texts

    def apply_chat_template(
        self,
        messages: list[dict[str, Any]] | list[list[dict[str, Any]]],
        add_generation_prompt: bool = False,
        tokenize: bool = False,
        return_dict: bool = False,
        return_tensors: str | None = None,
        enable_thinking: bool | None = None,
        processor_kwargs: dict[str, Any] | None = None,
        **template_kwargs: Any,
    ) -> Any:
        """Render messages in transformers' content-list format; optionally run the processor on them.

        With tokenize=False, returns the prompt string (a list for a batch of conversations).
        With tokenize=True, media named in the messages ({"type": "image", "url"/"path"/"image": ...},
        "audio", "video") are loaded and processed; returns input_ids, or the whole output dict
        with return_dict=True. `processor_kwargs` (max_soft_tokens, num_frames, ...) go to `__call__`.

        Tokenized, the messages' text stays text: a special-token string typed in it (`<|turn>`,
        `<|image|>`, ...) becomes the tokens of that text, never a control token or a placeholder,
        so only the template makes turns and only media items make media blocks. The string that
        tokenize=False returns is the template's as transformers renders it; a raw string prompt
        is read verbatim, so tokenizing it yourself gives typed special-token strings their tokens.
        """
        if self.chat_template is None:
            raise InputError(
                "This model folder has no chat template; format the prompt yourself and call the processor."
            )
        batched = bool(messages) and isinstance(messages[0], (list, tuple))
        conversations = list(messages) if batched else [messages]
        for conversation in conversations:
            check_messages(conversation)
        if enable_thinking is not None:
            template_kwargs["enable_thinking"] = enable_thinking
        special_tokens = self.tokenizer.special_tokens_map
        if not tokenize:
            prompts = [
                render_chat(self.chat_template, conversation, special_tokens, add_generation_prompt, **template_kwargs)
                for conversation in conversations
            ]
            return prompts if batched else prompts[0]
        escapes = TextEscapes.build(self.tokenizer, template_text([conversations, template_kwargs]))
        prompts = [
            render_chat_text(
                self.chat_template, conversation, special_tokens, escapes, add_generation_prompt, **template_kwargs
            )
            for conversation in conversations
        ]
        media = {kind: [item for c in conversations for item in media_items(c, kind)] for kind in MEDIA_SOURCES}
        bos = self.tokenizer.bos_token
        out = self._process(
            prompts,
            escapes,
            *_media_lists(media["image"] or None, media["video"] or None, media["audio"] or None),
            return_tensors=return_tensors,
            add_special_tokens=not (bos and prompts[0].startswith(bos)),
            **(processor_kwargs or {}),
        )
        return out if return_dict else out["input_ids"]


def media_items(conversation: list[dict[str, Any]], kind: str) -> list[Any]:
    """The media of one kind named in a conversation's content lists, in order."""
    items = []
    for message in conversation:
        content = message.get("content")
        if isinstance(content, str) or not content:
            continue
        for block in content:
            if block.get("type") == kind:
                items.extend(block[key] for key in MEDIA_SOURCES[kind] if key in block)
    return items


def _media_lists(images: Any, videos: Any, audio: Any) -> tuple[list | None, list | None, list | None]:
    """Images, videos and audio clips each as a flat list (None where not given)."""
    images = None if images is None else flatten_images(images)
    videos = None if videos is None else (videos if isinstance(videos, list) else [videos])
    audio = None if audio is None else as_clip_list(audio)
    return images, videos, audio


def _processor_settings(model_dir: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """Image and video processor settings from processor_config.json / preprocessor_config.json."""
    image_settings = read_json(model_dir / "preprocessor_config.json")
    nested = read_json(model_dir / "processor_config.json")
    image_settings.update(nested.get("image_processor", {}))
    return image_settings, nested.get("video_processor", {})
