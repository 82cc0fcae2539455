"""Transcribe speech: python examples/transcribe_audio.py speech.wav [--model google/gemma-4-12B-it]"""

from _common import load_model

import mlx_gemma4u

model, processor, args = load_model(__doc__, media="audio")
messages = [
    {
        "role": "user",
        "content": [{"type": "audio", "path": args.audio}, {"type": "text", "text": "Transcribe this audio."}],
    }
]
mlx_gemma4u.generate(model, processor, messages, max_tokens=200, verbose=True)
print()
