"""Describe a video: python examples/describe_video.py clip.mp4 [--model google/gemma-4-12B-it]

Frames are sampled as transformers does (32 by default; 8 here, to stay quick) and each is shown
with its mm:ss time.
"""

from _common import load_model

import mlx_gemma4u

model, processor, args = load_model(__doc__, media="video")
messages = [
    {
        "role": "user",
        "content": [{"type": "video", "path": args.video}, {"type": "text", "text": "What happens in this video?"}],
    }
]
mlx_gemma4u.generate(model, processor, messages, max_tokens=200, verbose=True, num_frames=8)
print()
