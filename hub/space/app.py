"""The sbert-sae explorer as a Hugging Face Space.

Which SAE it shows is a Space variable: `SBERT_SAE_REPO` (a Hub repo id or a registry short
name; default: the released MiniLM Wikipedia SAE), and optionally `SBERT_SAE_DATASET` (the
corpus to show texts from; default: the one it was trained on, else the activations
dataset it was published with) with `SBERT_SAE_TEXT_COLUMN`.
"""

import os

from sbert_sae.explorer import build_app, launch
from sbert_sae.explorer_data import Explorer

SAE = os.environ.get("SBERT_SAE_REPO", "minilm-wiki-6k")

explorer = Explorer.open(
    SAE,
    dataset=os.environ.get("SBERT_SAE_DATASET") or None,
    text_column=os.environ.get("SBERT_SAE_TEXT_COLUMN") or None,
)
explorer.start_corpus()
demo = build_app(explorer)

if __name__ == "__main__":
    # host None: the Space's GRADIO_SERVER_NAME (0.0.0.0) decides, as Gradio's default does.
    launch(demo, host=None)
