"""Write hub/cards/minilm-wiki-6k.README.md: the card a push publishes for the default SAE.

`runs/wiki` (the README's quick start run, labelled) is published as
`sbert-sae release hub/recipes/minilm-wiki.yaml` publishes it (with its activations, under
the recipe's repo id) to a local test Hub (tests/hub_server.py, in memory), and the
README.md it published is copied into hub/cards/. Run from the repository root:

    python hub/render_default_card.py [RUN_FOLDER]
"""

from __future__ import annotations

import os
import socket
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def main(run: str = "runs/wiki") -> None:
    port = _free_port()
    # Before huggingface_hub is imported: it reads these once. Nothing reaches huggingface.co.
    os.environ.update(
        HF_ENDPOINT=f"http://127.0.0.1:{port}",
        HF_HUB_DISABLE_XET="1",
        HF_HOME=tempfile.mkdtemp(prefix="sbert-sae-card-"),
        HF_TOKEN="hf_local_test_token",
        HF_HUB_OFFLINE="0",
        HF_DATASETS_OFFLINE="0",
    )
    sys.path.insert(0, str(ROOT / "tests"))
    from hub_server import HubServer

    from sbert_sae.hub import publish
    from sbert_sae.pipeline import DataArguments
    from sbert_sae.registry import load_recipe

    recipe = load_recipe(ROOT / "hub" / "recipes" / "minilm-wiki.yaml")
    ds = recipe.dataset
    # The data release() hands to publish() for the activations.
    data = DataArguments(
        dataset=ds["path"],
        text_column=ds.get("text_column", "text"),
        domain_column=ds.get("domain_column"),
        domain=ds.get("domain"),
        model=recipe.base_model,
        heldout_fraction=recipe.training.get("heldout_fraction", 0.05),
    )
    server = HubServer(port=port).start()
    try:
        publish(run, recipe.repo_id, activations=recipe.activations, data=data, base_model_id=recipe.base_model_id, base_model_option="base_model_id:")
        card = server.files(recipe.repo_id)["README.md"]
    finally:
        server.stop()
    out = ROOT / "hub" / "cards" / f"{recipe.name}.README.md"
    out.write_bytes(card)
    print(f"wrote {out}")


if __name__ == "__main__":
    main(*sys.argv[1:])
