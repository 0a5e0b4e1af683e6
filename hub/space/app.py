"""The sbert-sae explorer as a Hugging Face Space.

Which SAE it shows is a Space variable: `SBERT_SAE_REPO` (a Hub repo id or a registry short
name; default: the released MiniLM Wikipedia SAE), and optionally `SBERT_SAE_DATASET` (the
corpus to show texts from; default: the activations dataset it was published with, else the
one it was trained on) with `SBERT_SAE_TEXT_COLUMN`.
"""

import logging
import os

import gradio as gr

from sbert_sae import SbertSaeError
from sbert_sae.explorer import build_app, launch
from sbert_sae.explorer_data import Explorer

SAE = os.environ.get("SBERT_SAE_REPO", "minilm-wiki-6k")


def unavailable_app(error: Exception) -> gr.Blocks:
    """A page that says why there is no SAE to show and which variable names it: else the Space
    stops at start-up (a default not released yet, a mistyped repo id) and shows only
    'Runtime error' to its visitors."""
    with gr.Blocks(title="sbert-sae explorer") as page:
        gr.Markdown(
            f"## No SAE to show\n\nThe explorer cannot open `{SAE}`: {error}\n\n"
            "Set the Space variable `SBERT_SAE_REPO` (Settings, Variables and secrets) to the Hub model repo "
            "of an sbert-sae SAE (`sbert-sae push RUN ORG/NAME`), then restart the Space."
        )
    return page


try:
    explorer = Explorer.open(
        SAE,
        dataset=os.environ.get("SBERT_SAE_DATASET") or None,
        text_column=os.environ.get("SBERT_SAE_TEXT_COLUMN") or None,
    )
except SbertSaeError as err:
    logging.getLogger("sbert_sae.space").error("cannot open %s: %s", SAE, err)
    explorer = None
    demo = unavailable_app(err)
else:
    # Shown where the SAE names no corpus that opens here (no published activations, its
    # training dataset a local folder): a Space has no --dataset to pass.
    explorer.corpus_hint = "set the Space variable SBERT_SAE_DATASET to a Hub dataset of its texts"
    explorer.start_corpus()
    demo = build_app(explorer)

if __name__ == "__main__":
    # host None: the Space's GRADIO_SERVER_NAME (0.0.0.0) decides, as Gradio's default does.
    launch(demo, host=None)
