"""`mlx-gemma4u lora`: fine-tuning adapters with the model's own forward pass.

JSONL lines (data.py: chat, tools, completions, text; media by path)
  -> examples and right-padded batches (batches.py: the prompt masked out of the loss)
  -> Adam steps on the adapters (trainer.py; the adapters themselves: models/lora.py)
  -> adapter folders (weights/adapters.py), which load() takes as adapter_path
"""
