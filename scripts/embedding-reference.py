#!/usr/bin/env python3
"""Reference vectors for the embedding model, from the Python sentence-transformers library.

Writes libs/colony-inference/tests/data/minilm_reference.json: a few fixed sentences and the
all-MiniLM-L6-v2 vectors sentence-transformers computes for them from the very model files that
`make models` puts in the models directory (no model hub is contacted). The Rust test
libs/colony-inference/tests/embed.rs checks candle's vectors against them.

The recipe is the one sentence-transformers publishes for this model: BERT, mean pooling over
the attention mask, L2 normalisation, inputs truncated at 256 tokens. The models directory only
holds the weights, tokenizer and BERT config (not sentence-transformers' module files), so the
pipeline is assembled here from the library's own modules with those settings.

Run it from the repository root, in a throwaway virtual environment (torch from PyPI is a CUDA
build of several GB; the CPU is all it uses here):

    python3 -m venv "$VENV"        # any directory outside the repository
    "$VENV"/bin/pip install torch sentence-transformers
    make models
    "$VENV"/bin/python scripts/embedding-reference.py [MODELS_DIR]

MODELS_DIR defaults to $COLONY_MODELS_DIR, else .cache/models.

The committed file was produced with Python 3.11, sentence-transformers 6.3.0, transformers
5.24.0, torch 2.15.0+cu132 (run on the CPU), tokenizers 0.23.3.
"""

import json
import os
import sys
from pathlib import Path

# Everything comes from local files: never reach for a model hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import sentence_transformers  # noqa: E402
import tokenizers  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from sentence_transformers import SentenceTransformer  # noqa: E402
from sentence_transformers.sentence_transformer.modules import Normalize, Pooling, Transformer  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
MODEL = "all-minilm-l6-v2"
OUTPUT = ROOT / "libs/colony-inference/tests/data/minilm_reference.json"

SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "Les élèves ont réussi l'examen 🎉",
    "Colony",
    "How many agent workers are waiting for a task right now?",
    # Long-ish: several clauses, punctuation, numbers and a hyphenated word.
    "When the orchestrator restarts, every agent worker reconnects to the bus, re-reads its "
    "pending leases from Postgres, and resumes the 3 tasks it was running before the "
    "interruption, so that no long-running job has to start again from the very beginning.",
    # Longer than the 256-token limit: checks that both sides truncate in the same place.
    " ".join(f"sentence number {n} talks about queues, batches and model threads." for n in range(40)),
    "東京は日本の首都です。",
]


def main() -> None:
    models_dir = Path(
        sys.argv[1] if len(sys.argv) > 1 else os.environ.get("COLONY_MODELS_DIR") or ROOT / ".cache/models"
    )
    model_dir = models_dir / MODEL
    for name in ("model.safetensors", "tokenizer.json", "config.json"):
        if not (model_dir / name).is_file():
            sys.exit(f"{model_dir / name} is missing: run `make models` first")

    torch.set_num_threads(max(1, os.cpu_count() or 1))
    transformer = Transformer(str(model_dir), max_seq_length=256)
    pooling = Pooling(transformer.get_embedding_dimension(), pooling_mode="mean")
    model = SentenceTransformer(modules=[transformer, pooling, Normalize()], device="cpu")
    # The over-long sentence must be cut at 256 tokens, as the Rust side does.
    longest = max(int(mask.sum()) for mask in model.preprocess(SENTENCES)["attention_mask"])
    if longest != 256:
        sys.exit(f"expected the longest input to be truncated at 256 tokens, got {longest}")
    vectors = model.encode(SENTENCES, batch_size=32, convert_to_numpy=True, normalize_embeddings=False)

    OUTPUT.parent.mkdir(parents=True, exist_ok=True)
    document = {
        "model": MODEL,
        "produced_by": (
            f"scripts/embedding-reference.py: sentence-transformers {sentence_transformers.__version__}, "
            f"transformers {transformers.__version__}, torch {torch.__version__}, "
            f"tokenizers {tokenizers.__version__}; mean pooling, L2-normalised, max 256 tokens"
        ),
        "sentences": SENTENCES,
        "vectors": [[round(float(x), 8) for x in vector] for vector in vectors],
    }
    # One sentence and one vector per line: readable, and diffs stay small.
    lines = ["{"] + [f" {json.dumps(key)}: {json.dumps(document[key], ensure_ascii=False)}," for key in ("model", "produced_by")]
    lines.append(' "sentences": [')
    lines += [f"  {json.dumps(s, ensure_ascii=False)}," for s in SENTENCES]
    lines[-1] = lines[-1].rstrip(",")
    lines.append(" ],")
    lines.append(' "vectors": [')
    lines += [f"  {json.dumps(v)}," for v in document["vectors"]]
    lines[-1] = lines[-1].rstrip(",")
    lines += [" ]", "}"]
    OUTPUT.write_text("\n".join(lines) + "\n", encoding="utf-8")
    print(f"wrote {len(SENTENCES)} vectors of {len(vectors[0])} dimensions to {OUTPUT.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
