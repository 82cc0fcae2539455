"""`mlx-gemma4u serve`: an OpenAI- and Anthropic-compatible HTTP server, the HTTP layer only.

    requests (app.py: routes, auth, errors, SSE)
      -> chat messages with media (messages.py: OpenAI and Anthropic content parts, tool turns)
      -> the model worker (worker.py: one generation at a time, a bounded queue, prompt-prefix reuse)
      -> reply parts (generation.reply: answer, thought channel, tool calls) -> OpenAI / Anthropic JSON

Nothing here computes with MLX: the worker calls `generate.stream_generate` like any client.
"""
