"""Request bodies, checked by pydantic: a known field of the wrong type (or a non-finite number)
is a 400, unknown fields are ignored (clients send many we do not use). The ranges of the
generation settings are checked once, by SamplingParams; only limits of an API itself
(Anthropic's temperature, OpenAI's top_logprobs) are stated here."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)


class Sampling(_Body):
    temperature: float = 0.0
    top_p: float = 0.0
    top_k: int = 0
    min_p: float = 0.0
    seed: int | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    repetition_penalty: float | None = None
    stream: bool = False


SAMPLING = (
    "temperature",
    "top_p",
    "top_k",
    "min_p",
    "seed",
    "presence_penalty",
    "frequency_penalty",
    "repetition_penalty",
)  # Sampling's fields that are SamplingParams' too


class StreamOptions(_Body):
    include_usage: bool = False


class ChatCompletion(Sampling):
    model: str | None = None
    messages: list[dict[str, Any]] = Field(min_length=1)
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    stop: str | list[str] | None = None
    n: int = 1
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    stream_options: StreamOptions | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    reasoning_effort: str | None = None
    thinking: bool | dict[str, Any] | None = None
    response_format: dict[str, Any] | None = None


class Completion(Sampling):
    model: str | None = None
    prompt: str
    max_tokens: int = 16
    stop: str | list[str] | None = None
    n: int = 1
    logprobs: int | None = Field(None, ge=0, le=5)
    stream_options: StreamOptions | None = None


class MessagePrompt(_Body):
    """What an Anthropic request's prompt is made of (all /v1/messages/count_tokens reads)."""

    model: str | None = None
    messages: list[dict[str, Any]] = Field(min_length=1)
    system: str | list[dict[str, Any]] | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: dict[str, Any] | None = None
    thinking: dict[str, Any] | None = None


class Message(Sampling, MessagePrompt):
    max_tokens: int
    stop_sequences: list[str] | None = None
    temperature: float = Field(0.0, ge=0, le=1)


class Transcription(Sampling):
    """OpenAI's audio transcription and translation form fields (the file comes apart)."""

    model: str | None = None
    language: str | None = None
    prompt: str | None = None
    response_format: Literal["json", "text", "verbose_json"] = "json"


class ResponseCreate(Sampling):
    """OpenAI's Responses API request (POST /v1/responses)."""

    model: str | None = None
    input: str | list[dict[str, Any]]
    instructions: str | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    reasoning: dict[str, Any] | None = None
    max_output_tokens: int | None = None
    text: dict[str, Any] | None = None
    previous_response_id: str | None = None
    store: bool = True
    background: bool = False
    metadata: dict[str, str] | None = None
    parallel_tool_calls: bool = True
