"""Label quality and speed: sbert-sae's labelling against the seed project's method and BERTopic's KeyBERTInspired.

All three label the same SAE's features from the same labelling texts, and are scored by
the same test (`sbert_sae.labels.score_labels`) on the same held-out texts: the cosine
between a label's embedding and a text's embedding predicts the feature's activation.

    python benchmarks/bench_labels.py runs/wiki --dataset data/wiki --sample 300

- sbert-sae: `label_features` over every feature (its time is the whole labelling).
- seed method (CONTEXT.md §3): per feature, KeyBERT on each of its top-10 texts (5 single
  words each), near-duplicates merged (cosine >= 0.9), word pairs glued into "bigrams"
  kept at cosine >= 0.4 to the texts, terms scored mean similarity x ln(1 + doc count),
  clustered at cosine >= 0.75, the best members of the top 3 clusters as the label.
  Timed on the sampled features; its time for all features is extrapolated from that.
- KeyBERTInspired (BERTopic): c-TF-IDF over the features' top texts (each feature a
  class) gives 10 candidate words; they are ranked by cosine to the mean embedding of the
  feature's 5 most representative texts; the top 3 words are the label.

Quality is compared on a seeded random sample of live features (the same for all).
"""

from __future__ import annotations

import argparse
import json
import math
import time
from collections import defaultdict
from pathlib import Path

import numpy as np

from sbert_sae import SparseAutoencoder
from sbert_sae.base_model import load_sentence_transformer
from sbert_sae.labels import LabelArguments, label_features, prepare_labelling, score_labels, unique_label_share
from sbert_sae.pipeline import DataArguments, load_and_embed


def seed_method_label(kw_model, model, texts: list[str]) -> str | None:
    """The seed project's labelling of one feature from its top texts."""
    sims: dict[str, list[float]] = defaultdict(list)
    for text in texts:
        for word, score in kw_model.extract_keywords(text, keyphrase_ngram_range=(1, 1), stop_words="english", top_n=5):
            sims[word].append(score)
    if not sims:
        return None
    words = list(sims)
    emb = model.encode(words, normalize_embeddings=True)
    # merge near-duplicates
    order = sorted(range(len(words)), key=lambda i: -np.mean(sims[words[i]]))
    kept: list[int] = []
    for i in order:
        twin = next((j for j in kept if float(emb[i] @ emb[j]) >= 0.9), None)
        if twin is None:
            kept.append(i)
        else:
            sims[words[twin]].extend(sims[words[i]])
    terms = {words[i]: sims[words[i]] for i in kept}
    # glue word pairs into "bigrams", kept when close enough to the texts
    top = sorted(terms, key=lambda w: -np.mean(terms[w]))[:5]
    pairs = [f"{a} {b}" for a in top for b in top if a != b]
    if pairs:
        doc = model.encode([" ".join(texts)], normalize_embeddings=True)[0]
        pair_emb = model.encode(pairs, normalize_embeddings=True)
        for pair, vec in zip(pairs, pair_emb):
            if float(vec @ doc) >= 0.4:
                a, b = pair.split(" ")
                terms[pair] = terms[a] + terms[b]
    scored = {t: float(np.mean(s)) * math.log(1 + len(s)) for t, s in terms.items()}
    names = sorted(scored, key=lambda t: -scored[t])
    vecs = dict(zip(names, model.encode(names, normalize_embeddings=True)))
    clusters: list[list[str]] = []
    for t in names:
        home = next((c for c in clusters if float(vecs[t] @ vecs[c[0]]) >= 0.75), None)
        (home.append(t) if home is not None else clusters.append([t]))
    clusters.sort(key=lambda c: -sum(scored[t] for t in c))
    return ", ".join(c[0] for c in clusters[:3])


def keybert_inspired_labels(ctx, model, features: list[int], top_texts: int = 20, repr_docs: int = 5) -> dict[int, str]:
    """BERTopic's KeyBERTInspired: c-TF-IDF candidate words, ranked against representative texts."""
    from sklearn.feature_extraction.text import CountVectorizer

    docs = [" ".join(ctx.texts[r] for r in ctx.pos_rows[f][:top_texts]) for f in features]
    counts = CountVectorizer(stop_words="english").fit(docs)
    tf = counts.transform(docs).astype(np.float64)
    words = counts.get_feature_names_out()
    avg = tf.sum() / tf.shape[0]
    idf = np.log(1 + avg / np.maximum(np.asarray(tf.sum(axis=0)).ravel(), 1))
    ctfidf = tf.multiply(idf).tocsr()
    candidates = {}
    for i, f in enumerate(features):
        row = ctfidf.getrow(i)
        top = row.indices[np.argsort(-row.data)[:10]]
        candidates[f] = [str(words[t]) for t in top]
    vocab = sorted({w for ws in candidates.values() for w in ws})
    vec = dict(zip(vocab, model.encode(vocab, normalize_embeddings=True)))
    labels = {}
    for f in features:
        if not candidates[f]:
            continue
        rep = ctx.emb[ctx.pos_rows[f][:repr_docs]].mean(0)
        ranked = sorted(candidates[f], key=lambda w: -float(vec[w] @ rep))
        labels[f] = ", ".join(ranked[:3])
    return labels


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("sae", help="a trained SAE folder")
    parser.add_argument("--dataset", default="data/wiki")
    parser.add_argument("--text-column", default="text")
    parser.add_argument("--sample", type=int, default=300, help="live features compared (and timed for the seed method)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--set", action="append", default=[], metavar="NAME=VALUE", help="a LabelArguments setting for sbert-sae, e.g. --set candidates=24 (repeatable)")
    parser.add_argument("--timing-runs", type=int, default=1, help="label every feature this many times and print each wall time")
    parser.add_argument("--skip-seed-method", action="store_true", help="leave out the (slow) seed method")
    parser.add_argument("--out", default=None, help="write the results as JSON here")
    args = parser.parse_args()

    sae = SparseAutoencoder.from_pretrained(args.sae)
    ds, cache = load_and_embed(DataArguments(dataset=args.dataset, text_column=args.text_column, model=sae.config.base_model), show_progress=False)
    texts = ds.select_columns([args.text_column]).select(cache.row_ids)[args.text_column]
    model = load_sentence_transformer(sae.config.base_model)
    import torch

    print(f"{len(texts)} texts, SAE n={sae.config.n_latents} k={sae.config.k}, {torch.get_num_threads()} CPU threads", flush=True)

    settings = {}
    for item in args.set:
        name, _, value = item.partition("=")
        if name not in LabelArguments.__dataclass_fields__:
            parser.error(f"--set {item}: no LabelArguments setting {name!r}")
        settings[name] = type(getattr(LabelArguments, name))(value)
    runs = []
    for _ in range(max(1, args.timing_runs)):
        t0 = time.perf_counter()
        ctx = prepare_labelling(sae, texts, cache.embeddings, LabelArguments(seed=args.seed, **settings))
        ours = label_features(sae, texts, cache.embeddings, model, show_progress=False, context=ctx)
        runs.append(time.perf_counter() - t0)
        parts = {name: ours.summary.get(name) for name in ("wall_seconds", "thread_cpu_seconds")}
        print(f"sbert-sae: labelled all {sae.config.n_latents} features in {runs[-1]:.1f}s (per stage, {parts})", flush=True)
    ours_seconds = float(np.median(runs))
    if len(runs) > 1:
        print(f"sbert-sae wall time over {len(runs)} runs: min {min(runs):.1f}s, median {ours_seconds:.1f}s, max {max(runs):.1f}s", flush=True)

    rng = np.random.default_rng(args.seed)
    live = [f for f in range(ctx.n_features) if len(ctx.pos_rows[f]) and len(ctx.held_fi.rows_of(f))]
    sample = sorted(rng.choice(live, size=min(args.sample, len(live)), replace=False).tolist())

    from keybert import KeyBERT

    kw_model = KeyBERT(model=model)
    t0 = time.perf_counter()
    seed_labels = {}
    for f in [] if args.skip_seed_method else sample:
        top = [ctx.texts[r] for r in ctx.pos_rows[f][:10]]
        seed_labels[f] = seed_method_label(kw_model, model, top)
    seed_per_feature = (time.perf_counter() - t0) / len(sample)
    t0 = time.perf_counter()
    inspired = keybert_inspired_labels(ctx, model, sample)
    inspired_seconds = time.perf_counter() - t0

    methods = {
        "sbert-sae": {f: ours.features[f].get("label") for f in sample},
        "seed method": seed_labels,
        "KeyBERTInspired": inspired,
    }
    rows, filled = {}, {}
    if args.skip_seed_method:
        del methods["seed method"]
    for name, labels in methods.items():
        scores, summary = score_labels(ctx, labels, model)
        rows[name] = summary
        # A feature a method leaves unlabelled counts as chance (0.5) in the paired comparison.
        filled[name] = np.array([(scores.get(f) or {}).get("auroc") or 0.5 for f in sample])
    print(f"\nquality on {len(sample)} sampled live features (same held-out texts for all):")
    print("| method | mean AUROC | median AUROC | share AUROC >= 0.8 | mean Pearson r | distinct labels | labelled | mean AUROC, unlabelled = 0.5 |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for name, s in rows.items():
        n_lab = sum(1 for v in methods[name].values() if v)
        print(f"| {name} | {s['label_auroc_mean']:.4f} | {s['label_auroc_median']:.4f} | {s['label_auroc_share_above_0.8']:.3f} | {s['label_pearson_mean']:.4f} | {s['distinct_label_share']:.3f} | {n_lab}/{len(sample)} | {filled[name].mean():.4f} |")
    print(f"| (centroid vector, no words: the ceiling) | {rows['sbert-sae']['centroid_auroc_mean']:.4f} | | | | | | |")
    print("\npaired difference in held-out AUROC, sbert-sae minus each method, same features (unlabelled = 0.5):")
    for name in filled:
        if name == "sbert-sae":
            continue
        diff = filled["sbert-sae"] - filled[name]
        half = 1.96 * diff.std(ddof=1) / np.sqrt(len(diff))
        print(f"  vs {name}: {diff.mean():+.4f} (95% CI {diff.mean() - half:+.4f} to {diff.mean() + half:+.4f}); sbert-sae better on {np.mean(diff > 0):.0%} of features, worse on {np.mean(diff < 0):.0%}")
    all_live = [f for f in range(ctx.n_features) if len(ctx.pos_rows[f])]
    ours_all = [ours.features[f].get("label") for f in all_live if ours.features[f].get("label")]
    inspired_all = [v for v in keybert_inspired_labels(ctx, model, all_live).values() if v]
    print(f"\ndistinct labels over all {len(all_live)} live features: sbert-sae {unique_label_share(ours_all):.3f} ({len(ours_all)} labelled), "
          f"KeyBERTInspired {unique_label_share(inspired_all):.3f} ({len(inspired_all)} labelled); the seed method is too slow to label them all")
    rows["distinct_all"] = {"sbert-sae": unique_label_share(ours_all), "KeyBERTInspired": unique_label_share(inspired_all)}
    if args.skip_seed_method:
        return
    print(f"\nspeed: sbert-sae {ours_seconds:.1f}s (median of {len(runs)}) for all {sae.config.n_latents} features; seed method {seed_per_feature:.3f}s a feature "
          f"(measured on {len(sample)}) = {seed_per_feature * sae.config.n_latents / 60:.1f} min for all (extrapolated); "
          f"KeyBERTInspired {inspired_seconds:.1f}s for {len(sample)} features")
    for f in sample[:12]:
        print(f"  feature {f}: sbert-sae {methods['sbert-sae'][f]!r} | seed {methods['seed method'][f]!r} | inspired {methods['KeyBERTInspired'].get(f)!r}")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({"summaries": rows, "sample": sample, "ours_seconds": ours_seconds, "ours_seconds_runs": runs, "seed_seconds_per_feature": seed_per_feature, "labels": {k: {str(f): v for f, v in m.items()} for k, m in methods.items()}}, indent=1))


if __name__ == "__main__":
    main()
