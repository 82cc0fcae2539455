"""A multi-turn chat that reuses its KV cache: each turn prefills only its new tokens.

python examples/multi_turn_chat.py [--model google/gemma-4-12B-it]
"""

import mlx_gemma4u
from _common import load_model
from mlx_gemma4u.generate import PromptCache

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
