"""generation/reply.py's Reply: a streamed reply's tokens -> its answer, its thought channel (the
channel's name dropped) and its tool calls, with per-token deltas that add up to them; and the chat
and the server, which both read replies through it, see the same parts of the same stream."""

import asyncio
import io
import json

import pytest
from rich.console import Console

from mlx_gemma4u.cli.chat import ReplyView
from mlx_gemma4u.generation.reply import Delta, Reply, ReplyText
from mlx_gemma4u.processing.text import load_tokenizer
from mlx_gemma4u.serve import schemas
from mlx_gemma4u.serve.responses import AnthropicMessage, OpenAIChat
from mlx_gemma4u.serve.worker import Token

CALL = '<|tool_call>call:get_weather{city:<|"|>Paris, France<|"|>,days:3}<tool_call|>'
MIXED = f"<|channel>thought\nThe user wants weather.\n\nAsk the tool.<channel|>Let me check é.{CALL}Done."


@pytest.fixture(scope="module")
def tokenizer(hf_tokenizer_dir):
    return load_tokenizer(hf_tokenizer_dir)


def stream(tokenizer, text: str, stop: list[str] | None = None) -> list[tuple[int, str]]:
    """`text`'s tokens with the text segments the engine hands out for them (special tokens hidden)."""
    ids = tokenizer.encode(text, add_special_tokens=False)
    shown = ReplyText(tokenizer, stop)
    return [(token, shown.add(token, last=i == len(ids) - 1)[0]) for i, token in enumerate(ids)]


def fed(tokenizer, text: str, stop: list[str] | None = None) -> tuple[Reply, list[Delta]]:
    reply = Reply(tokenizer)
    deltas = [reply.add(token, segment) for token, segment in stream(tokenizer, text, stop)]
    return reply, [*deltas, reply.finish()]


def test_text_held_back_for_stop_strings_stays_in_its_part(tokenizer):
    """A stop string holds back the last few characters; a marker token releases them, so the
    thought, the answer and the tool call split as they do without stop strings."""
    plain, _ = fed(tokenizer, MIXED)
    held, _ = fed(tokenizer, MIXED, stop=["ZZZZZ"])
    calls = [[(c.name, c.arguments) for c in r.tool_calls] for r in (plain, held)]
    assert (held.reasoning, held.content) == (plain.reasoning, plain.content) and calls[0] == calls[1] != []
    assert held.reasoning == "The user wants weather.\n\nAsk the tool." and held.content.startswith("Let me check é.")


def test_the_thought_channel_is_split_from_the_answer_without_its_name(tokenizer):
    reply = Reply(tokenizer)
    pairs = stream(tokenizer, "<|channel>thought\nSky is\n\nblue.<channel|>It is blue.")
    inside = []
    for token, segment in pairs:
        reply.add(token, segment)
        inside.append(reply.in_thought)
    assert reply.reasoning == "Sky is\n\nblue."
    assert reply.content == "It is blue."
    end = [token for token, _ in pairs].index(reply.channel_end)
    assert inside == [True] * end + [False] * (len(pairs) - end) and reply.tool_calls == []


@pytest.mark.parametrize(
    "written, reasoning",
    [
        ("thought\n\nIndented", "\nIndented"),  # only the name's own line is dropped
        ("thoughtful words", "thoughtful words"),  # "thought" without its newline is not the name
        ("Plain words", "Plain words"),  # a channel without the name keeps all it says
        ("thought\n", ""),  # the empty channel the template writes when thinking is off
        ("thought", ""),  # a name cut short by the channel's end is still the name
    ],
)
def test_only_the_channels_name_line_is_dropped(tokenizer, written, reasoning):
    reply, deltas = fed(tokenizer, f"<|channel>{written}<channel|>Answer.")
    assert (reply.reasoning, reply.content) == (reasoning, "Answer.")
    assert "".join(d.reasoning for d in deltas) == reasoning


def test_a_tool_call_is_parsed_with_its_arguments(tokenizer):
    reply, deltas = fed(tokenizer, f"Let me check.{CALL}{CALL.replace('Paris, France', 'Oslo')}")
    assert reply.content == "Let me check."
    assert [(c.name, c.arguments) for c in reply.tool_calls] == [
        ("get_weather", {"city": "Paris, France", "days": 3}),
        ("get_weather", {"city": "Oslo", "days": 3}),
    ]
    assert len({c.id for c in reply.tool_calls}) == 2 and all(c.id.startswith("call_") for c in reply.tool_calls)
    assert [len(d.tool_calls) for d in deltas if d.tool_calls] == [1, 1]  # each with the token that closes it


@pytest.mark.parametrize(
    "text, kept",
    [
        ('<|tool_call>call:get_weather{city:<|"|>Paris<tool_call|>', 'call:get_weather{city:<|"|>Paris'),  # bad
        ('<|tool_call>call:get_weather{city:<|"|>Par', 'call:get_weather{city:<|"|>Par'),  # the reply ended inside
    ],
)
def test_a_tool_call_that_is_not_one_stays_in_the_answer_as_written(tokenizer, text, kept):
    reply, deltas = fed(tokenizer, "Before." + text)
    assert reply.tool_calls == []
    assert reply.content == "Before." + kept
    assert "".join(d.content for d in deltas) == reply.content


def test_text_that_comes_with_a_marker_belongs_to_the_part_it_ends(tokenizer):
    """A segment may hold text of earlier tokens (held back, as the stop-string cut holds it): the text
    handed out with a marker token was written before the marker."""
    reply = Reply(tokenizer)
    for token, segment in [
        (reply.channel_start, "Before."),
        (None, "thought\nThinking h"),
        (reply.channel_end, "ard."),
        (None, "Let me ch"),
        (reply.call_start, "eck."),
    ]:
        reply.add(token, segment)
    assert (reply.content, reply.reasoning) == ("Before.Let me check.", "Thinking hard.")


def test_a_reply_whose_time_ran_out_inside_a_tool_call(tokenizer):
    """The server's last Token of a timed-out reply has no token id; the call's text still comes back."""
    reply = Reply(tokenizer)
    for token, segment in stream(tokenizer, "<|tool_call>call:f{a:1"):
        reply.add(token, segment)
    assert reply.add(None, "") == Delta()
    assert reply.finish().content == reply.content == "call:f{a:1"


def test_the_deltas_of_a_stream_add_up_to_the_whole(tokenizer):
    reply, deltas = fed(tokenizer, MIXED)
    assert "".join(d.content for d in deltas) == reply.content == "Let me check é.Done."
    assert "".join(d.reasoning for d in deltas) == reply.reasoning == "The user wants weather.\n\nAsk the tool."
    assert [c for d in deltas for c in d.tool_calls] == reply.tool_calls and len(reply.tool_calls) == 1


def tokens(tokenizer, text: str) -> list[Token]:
    """`text` as the server's worker hands it to a request: the last token says why the reply ended."""
    pairs = stream(tokenizer, text)
    return [
        Token(segment, token, "stop" if i == len(pairs) - 1 else None, 10, 10, i + 1)
        for i, (token, segment) in enumerate(pairs)
    ]


async def _aiter(items):
    for item in items:
        yield item


def served(tokenizer, text: str) -> dict:
    """The server's OpenAI reply to `text`, whole and streamed, and its Anthropic message."""
    chat = schemas.ChatCompletion(messages=[{"role": "user", "content": "Hi"}])
    message = schemas.Message(messages=[{"role": "user", "content": "Hi"}], max_tokens=64)

    async def run():
        whole = await OpenAIChat(tokenizer, "demo", chat).whole(_aiter(tokens(tokenizer, text)))
        chunks = [c async for c in OpenAIChat(tokenizer, "demo", chat).stream(_aiter(tokens(tokenizer, text)))]
        anthropic = await AnthropicMessage(tokenizer, "demo", message).whole(_aiter(tokens(tokenizer, text)))
        events = [e async for e in AnthropicMessage(tokenizer, "demo", message).stream(_aiter(tokens(tokenizer, text)))]
        return whole, chunks, anthropic, events

    whole, chunks, anthropic, events = asyncio.run(run())
    deltas = [c["choices"][0]["delta"] for c in chunks if c["choices"]]
    streamed_text = "".join(e["delta"].get("text", "") for e in events if e["type"] == "content_block_delta")
    return {
        "message": whole["choices"][0]["message"],
        "finish": whole["choices"][0]["finish_reason"],
        "streamed_content": "".join(d.get("content", "") for d in deltas),
        "streamed_reasoning": "".join(d.get("reasoning_content", "") for d in deltas),
        "streamed_calls": [c for d in deltas for c in d.get("tool_calls", [])],
        "anthropic": anthropic["content"],
        "anthropic_streamed_text": streamed_text,
    }


def chat_view(tokenizer, text: str) -> tuple[ReplyView, str]:
    """The terminal chat's view of `text`, as it streams there, and what it prints once it is done."""
    view = ReplyView(Reply(tokenizer), show_thinking=True)
    for token, segment in stream(tokenizer, text):
        view.add(token, segment)
    view.finish()
    console = Console(file=io.StringIO(), width=200)
    console.print(view.final())
    return view, console.file.getvalue()


def test_the_chat_and_the_server_see_the_same_parts(tokenizer):
    text = "<|channel>thought\nThe user greets me.<channel|>Hello **there** é."
    server, (view, printed) = served(tokenizer, text), chat_view(tokenizer, text)
    assert server["message"]["reasoning_content"] == server["streamed_reasoning"] == view.reply.reasoning
    assert server["message"]["content"] == server["streamed_content"] == view.answer == "Hello **there** é."
    assert server["anthropic"] == [
        {"type": "thinking", "thinking": view.reply.reasoning, "signature": ""},
        {"type": "text", "text": view.answer},
    ]
    assert "The user greets me." in printed and "Hello there é." in printed and "thought" not in printed


def test_a_tool_call_is_a_call_on_the_server_and_shown_in_the_chat(tokenizer):
    server, (view, printed) = served(tokenizer, MIXED), chat_view(tokenizer, MIXED)
    call = server["message"]["tool_calls"][0]["function"]
    assert (call["name"], json.loads(call["arguments"])) == ("get_weather", {"city": "Paris, France", "days": 3})
    assert server["streamed_calls"][0]["function"] == call and server["finish"] == "tool_calls"
    assert server["message"]["content"] == server["streamed_content"] == view.reply.content
    assert server["anthropic_streamed_text"] == view.reply.content
    assert [b["input"] for b in server["anthropic"] if b["type"] == "tool_use"] == [json.loads(call["arguments"])]
    # the chat declares no tools: the call is shown, in its place, as what the model said
    assert view.answer == 'Let me check é.\n\n`get_weather({"city": "Paris, France", "days": 3})`\n\nDone.'
    assert 'get_weather({"city": "Paris, France", "days": 3})' in printed
