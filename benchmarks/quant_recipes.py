"""How far each quantization recipe moves the model: top-1 agreement and KL against the float model.

    python -m benchmarks.quant_recipes [--out benchmarks/results/quant_recipes.json]

A random checkpoint with the real 262,144-token vocabulary and tokenizer (hidden 256, 4 layers,
float32, matrices scaled so logits spread like a trained model's, std ~4 before the soft-cap) is
converted with each recipe (and to bfloat16, for scale); both models then read the same prompts:
text prompts with the real tokenizer's ids, an image prompt and an audio prompt (../shared/fixtures). Per recipe and
modality: the share of positions whose argmax is unchanged, and the mean KL(float || quantized).
Scales stay float32 here because MLX's CPU quantized matmul is ~8x slower in bfloat16; their
rounding to bfloat16 (what a bfloat16 source gives) is small beside 4-bit weight error.

Random weights are a weak proxy for google/gemma-4-12B-it: trained embeddings and activations
have outliers that random ones lack, so these figures rank recipes, they do not predict the real
model's loss. They do show the mechanism users report: with a 262k vocabulary the top logits
are close, and the token embedding (which is also the output head) decides them.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import mlx.core as mx
from mlx.utils import tree_flatten

from mlx_gemma4u.convert.converter import Options, convert
from mlx_gemma4u.models.config import ModelConfig
from mlx_gemma4u.models.layouts import TRANSFORMERS
from mlx_gemma4u.models.model import Model
from mlx_gemma4u.weights.loading import load, load_model
from mlx_gemma4u.weights.tokenizer_files import write_tokenizer_files

from .checkpoints import F, S, variant

FIXTURES = Path(__file__).resolve().parents[2] / "shared" / "fixtures"
TEXTS = [
    "The quick brown fox jumps over the lazy dog while the farmer watches from the porch.",
    "Explain how photosynthesis turns sunlight, water and carbon dioxide into sugar.",
    "def fibonacci(n):\n    return n if n < 2 else fibonacci(n - 1) + fibonacci(n - 2)",
    "Quelle est la capitale de la France, et combien d'habitants y vivent-ils aujourd'hui ?",
    "日本の首都は東京です。富士山は日本で一番高い山です。",
    "In 1969, Apollo 11 landed on the Moon; Neil Armstrong was the first person to walk on it.",
]
RECIPES = {
    "bfloat16": Options(dtype="bfloat16"),
    "uniform 4-bit": Options(quantize=True, quant_recipe="uniform", q_bits=4),
    "default 4-bit": Options(quantize=True, quant_recipe="default", q_bits=4),
    "mixed-6-4": Options(quantize=True, quant_recipe="mixed-6-4"),
    "mixed-8-4": Options(quantize=True, quant_recipe="mixed-8-4"),
    "uniform 8-bit": Options(quantize=True, quant_recipe="uniform", q_bits=8),
    "uniform mxfp4": Options(quantize=True, quant_recipe="uniform", q_mode="mxfp4"),
    "qat": Options(quantize=True, quant_recipe="qat"),
}


def config(hidden: int = 256, layers: int = 4) -> dict:
    """The demo config, widened: real vocabulary, `hidden` wide, `layers` deep."""
    c = variant(
        dict(
            hidden_size=hidden,
            intermediate_size=4 * hidden,
            num_hidden_layers=layers,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=64,
            global_head_dim=128,
            layer_types=[S] * (layers - 1) + [F],
        ),
        vision_dim=hidden,
    )
    c["dtype"] = "float32"
    return c


def write_checkpoint(out: Path, raw: dict, seed: int = 0) -> Path:
    """Random float32 weights under transformers' names: linears N(0, 1/fan_in), embedding and tables
    N(0, 1/16), norms 1 but q/k norms 0.4 (attention not one-hot) and post-norms 4 (the layers outweigh
    the tied embedding, so the argmax is not just the input token); plus the real tokenizer files."""
    model = Model(ModelConfig.from_dict(raw))
    key, weights = mx.random.key(seed), {}
    for name, param in tree_flatten(model.parameters()):
        key, sub = mx.random.split(key)
        if param.ndim == 1:
            base = 0.0 if name.endswith("bias") else 4.0 if "post_" in name else 0.4 if "_norm." in name else 1.0
            value = mx.full(param.shape, base)
        else:
            std = 0.25 if "embed_tokens" in name or "pos_embedding" in name else param.shape[-1] ** -0.5
            value = std * mx.random.normal(param.shape, key=sub)
        weights[TRANSFORMERS.stored(name)] = value
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(raw, indent=2))
    write_tokenizer_files(out)
    mx.save_safetensors(str(out / "model.safetensors"), weights, metadata={"format": "pt"})
    return out


def prompts(processor) -> dict[str, list[dict]]:
    """Modality -> model inputs (mx arrays): the text prompts, one image prompt, one audio prompt."""
    from PIL import Image

    text = [processor(text=t, return_tensors="mlx") for t in TEXTS]
    image = Image.open(FIXTURES / "images" / "landscape_rocket_640x427.jpg")
    image_prompt = processor(
        text="Describe this picture: <|image|> It shows", images=[image], max_soft_tokens=70, return_tensors="mlx"
    )
    import soundfile

    clip, rate = soundfile.read(FIXTURES / "audio" / "speech_16k_mono.wav", dtype="float32")
    audio_prompt = processor(
        text="Transcribe: <|audio|> The speaker says", audio=[clip], sampling_rate=rate, return_tensors="mlx"
    )
    return {"text": text, "image": [image_prompt], "audio": [audio_prompt]}


def compare(reference, candidate, inputs: list[dict]) -> tuple[float, float]:
    """(share of positions with the same argmax, mean KL(reference || candidate)) over all prompts."""
    same, kl, n = 0, 0.0, 0
    for batch in inputs:
        kwargs = {k: v for k, v in batch.items() if k != "attention_mask"}
        p = reference(**kwargs).astype(mx.float32)[0]
        q = candidate(**kwargs).astype(mx.float32)[0]
        same += int((p.argmax(-1) == q.argmax(-1)).sum())
        logp, logq = p - mx.logsumexp(p, -1, keepdims=True), q - mx.logsumexp(q, -1, keepdims=True)
        kl += float((mx.exp(logp) * (logp - logq)).sum())
        n += p.shape[0]
    return same / n, kl / n


def measure(root: Path) -> list[dict]:
    """Convert the checkpoint with each recipe and compare it with the float model."""
    source = write_checkpoint(root / "source", config())
    reference, processor = load(source)
    inputs = prompts(processor)
    rows = []
    for label, options in RECIPES.items():
        out = root / label.replace(" ", "-")
        summary = convert(source, out, options, quiet=True)
        candidate = load_model(out)
        row = {"recipe": label, "bits_per_weight": round(summary.bits_per_weight, 2)}
        for modality, batches in inputs.items():
            agree, kl = compare(reference, candidate, batches)
            row[f"{modality}_top1"], row[f"{modality}_kl"] = round(agree, 4), round(kl, 5)
        rows.append(row)
        print(row, flush=True)
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "quant_recipes.json")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        rows = measure(Path(tmp))
    args.out.write_text(json.dumps(rows, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
