"""A multi-turn chat that reuses its KV cache: each turn prefills only its new tokens.

python examples/multi_turn_chat.py [--model google/gemma-4-12B-it]

Each turn re-renders the whole conversation through the chat template, and the cache keeps the
longest common prefix of what it holds and the new prompt. On the demo the previous reply is
prefilled again (turn 3: 78 of 169 tokens) for two reasons, both measured: the template trims the
reply (the demo's nonsense starts with a space and ends with newlines, so the re-rendered reply
starts with other tokens: "v" "ouch" instead of " vouch"), and randomly sampled tokens do not
survive detokenize-retokenize (60 generated tokens come back as 63). Both are inherent to
re-rendering from text: the model must see the conversation as the template writes it, which is
also why a turn after thinking (chat --think) re-prefills its reply, whose thoughts the template
drops. A trained model's replies rarely start with a space and are tokenized as the tokenizer
would, so there the reply usually stays cached and a turn prefills only its new tokens.
"""

from _common import load_model

import mlx_gemma4u
from mlx_gemma4u.generation.prompt_cache import PromptCache

model, processor, _ = load_model(__doc__)
cache = PromptCache(model)
messages = []
for question in ["Name a planet.", "How far is it from the Sun?", "And from Earth?"]:
    messages.append({"role": "user", "content": question})
    reply, last = "", None
    for last in mlx_gemma4u.stream_generate(model, processor, messages, max_tokens=60, prompt_cache=cache):
        reply += last.text
    messages.append({"role": "assistant", "content": reply})
    print(f"> {question}\n{reply}\n  [{last.prefilled_tokens} of {last.prompt_tokens} prompt tokens prefilled]")
