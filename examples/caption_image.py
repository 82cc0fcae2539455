"""Caption an image: python examples/caption_image.py photo.jpg [--model google/gemma-4-12B-it]"""

from _common import load_model

import mlx_gemma4u

model, processor, args = load_model(__doc__, media="image")
messages = [
    {
        "role": "user",
        "content": [
            {"type": "image", "path": args.image},
            {"type": "text", "text": "Describe this image in one sentence."},
        ],
    }
]
mlx_gemma4u.generate(model, processor, messages, max_tokens=100, verbose=True)
print()
