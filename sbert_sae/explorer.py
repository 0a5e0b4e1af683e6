"""The explorer: a Gradio app to browse an SAE's features, inspect texts and steer search.

`sbert-sae explore runs/wiki` (or a Hub repo id) serves it on 127.0.0.1; `hub/space/app.py`
serves the same app as a Hugging Face Space. Four tabs:

- **Features**: find features by id, or by words as the Search tab does (a label's or
  keywords' words, else a label's meaning, each with its strength); a feature's page (label, keywords and
  their scores, held-out label score, density, activation histogram, strongest texts with the
  keywords marked, nearest features by decoder cosine, features firing with it, its family).
- **Texts**: a text's active features as a bar chart, and how well the SAE rebuilds it.
- **Search**: semantic search over the corpus, steered by a slider per feature of the query,
  plus any feature found by its label.
- **Overview**: the SAE's metrics, density histogram and families.

Every feature shown anywhere is a link to its page (in-app; `?feature=ID` opens one directly).
What is computed lives in `explorer_data.py`; this module only lays it out. It imports
gradio (the `explore` extra), so only the `explore` command and the Space import it.
"""

from __future__ import annotations

import html
import inspect
import logging
import math
from pathlib import Path

import gradio as gr
import numpy as np

from .errors import SbertSaeError
from .explorer_data import Explorer, keyword_spans, read_feature_id
from .families import family_tree, pick_family
from .utils import clip

logger = logging.getLogger(__name__)

FEATURES_TAB, TEXTS_TAB, SEARCH_TAB, OVERVIEW_TAB = "features", "texts", "search", "overview"
QUERY_SLIDERS = 10
"""Sliders the Search tab gives a query: its strongest features."""
WAITING = "waiting-for-corpus"
"""Class of the note of a part shown before the corpus was open: filled in once it is."""
MAX_STEERED = 16
"""Most sliders the Search tab shows (the query's strongest features plus those added)."""
API_ENDPOINTS = ("find_features", "feature", "feature_data", "inspect_text", "inspect_text_data", "search", "search_data", "find_steering_feature", "add_steering_slider", "search_steered")
"""The app's named endpoints, those `gradio_client.Client(url).predict(..., api_name="/NAME")` calls
(README, "Exploring an SAE"); every other event is the page's own and not listed."""
NEAREST_SHOWN = 5
"""Labels offered, as weak or near matches, for a label query that no label matches."""

# A click on anything carrying data-feature opens that feature's page; links keep an href
# (?feature=ID) so that they can still be opened in a new tab.
FEATURE_LINKS_JS = """
element.addEventListener('click', (event) => {
  const link = event.target.closest('[data-feature]');
  if (!link || event.ctrlKey || event.metaKey || event.shiftKey || event.button !== 0) return;
  event.preventDefault();
  trigger('click', {feature: parseInt(link.dataset.feature, 10)});
});
"""

# After a click opens a feature, its page starts at its header, wherever the click was.
SCROLL_TO_FEATURE_JS = "() => { const h = document.getElementById('feature-header'); if (h) h.scrollIntoView({block: 'start'}); }"

CSS = """
.gradio-container {max-width: 1480px !important; margin: 0 auto;}
.sae-header {display: flex; align-items: baseline; gap: 1rem; flex-wrap: wrap; padding: 0.25rem 0 0.5rem;}
.sae-header h1 {font-size: 1.45rem; margin: 0; font-weight: 650;}
.sae-header .source {color: var(--body-text-color-subdued); font-family: var(--font-mono); font-size: 0.85rem;}
.sae-status {font-size: 0.85rem; color: var(--body-text-color-subdued);}
.sae-status .dot {display: inline-block; width: 0.6rem; height: 0.6rem; border-radius: 50%; margin-right: 0.35rem; vertical-align: middle;}
.sae-status .ready {background: #2e9d5b;} .sae-status .loading {background: #e0a526;} .sae-status .none, .sae-status .failed {background: #b9413c;}
.sae-card {border: 1px solid var(--border-color-primary); border-radius: 10px; padding: 0.8rem 1rem; margin-bottom: 0.75rem; background: var(--block-background-fill);}
.sae-card h3 {margin: 0 0 0.5rem; font-size: 0.95rem; font-weight: 650; text-transform: uppercase; letter-spacing: 0.03em; color: var(--body-text-color-subdued);}
.sae-title {display: flex; align-items: baseline; gap: 0.6rem; flex-wrap: wrap;}
.sae-title .fid {font-family: var(--font-mono); font-size: 1.05rem; color: var(--body-text-color-subdued);}
.sae-title h2 {margin: 0; font-size: 1.5rem; font-weight: 650;}
.sae-chips {display: flex; flex-wrap: wrap; gap: 0.4rem; margin-top: 0.6rem;}
.sae-chip {border: 1px solid var(--border-color-primary); border-radius: 999px; padding: 0.15rem 0.65rem; font-size: 0.82rem; background: var(--background-fill-secondary);}
.sae-chip b {font-weight: 650;}
.sae-chip.good {border-color: #2e9d5b;} .sae-chip.bad {border-color: #b9413c;}
.sae-note {color: var(--body-text-color-subdued); font-size: 0.85rem; margin: 0.3rem 0;}
table.sae-table {width: 100%; border-collapse: collapse; font-size: 0.87rem; border: none !important; margin: 0 !important;}
table.sae-table tr, table.sae-table th, table.sae-table td {border-left: none !important; border-right: none !important; border-top: none !important;}
table.sae-table th {text-align: left; font-weight: 600; color: var(--body-text-color-subdued); border-bottom: 1px solid var(--border-color-primary); padding: 0.3rem 0.4rem;}
table.sae-table td {border-bottom: 1px solid var(--border-color-primary); padding: 0.3rem 0.4rem; vertical-align: top;}
table.sae-table td.num {text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap;}
.sae-match {display: block; font-size: 0.78rem; color: var(--body-text-color-subdued);}
.sae-match.words, .sae-match.close {color: var(--body-text-color);}
table.sae-table tr:hover td {background: var(--background-fill-secondary);}
a.feat {color: var(--link-text-color, #3b5bdb); text-decoration: none; cursor: pointer;}
a.feat:hover {text-decoration: underline;}
a.feat .fid, span.fid {font-family: var(--font-mono); color: var(--body-text-color-subdued); margin-right: 0.35rem;}
.sae-bar {display: inline-block; height: 0.55rem; border-radius: 3px; background: #4c6ef5; vertical-align: middle; opacity: 0.8;}
.sae-bar.neg {background: #e8590c;}
.sae-texts {display: flex; flex-direction: column; gap: 0.55rem;}
.sae-text {border-left: 3px solid #4c6ef5; padding: 0.2rem 0.7rem; line-height: 1.5; font-size: 0.9rem;}
.sae-text .meta {font-size: 0.78rem; color: var(--body-text-color-subdued); font-family: var(--font-mono); margin-bottom: 0.1rem;}
.sae-text .body {max-height: 9.5em; overflow: auto;}
mark.kw {background: rgba(250, 204, 21, 0.45); color: inherit; border-radius: 3px; padding: 0 0.1rem;}
.sae-results {max-height: 70vh; overflow: auto;}
.sae-bars td.label {width: 55%;}
.sae-bars td.bar {width: 30%;}
.sae-hist svg {width: 100%; height: auto; display: block;}
.sae-hist rect.b {fill: #4c6ef5; opacity: 0.85;}
.sae-hist text {fill: var(--body-text-color-subdued); font-size: 10px; font-family: var(--font-mono);}
.sae-hist line {stroke: var(--border-color-primary);}
.sae-tree {overflow-x: auto;}
.sae-tree svg {display: block; font-size: 13px;}
.sae-tree .edges path {stroke: #8a94a6; fill: none; stroke-width: 1.5;}
.sae-tree circle.root {fill: #e03131;} .sae-tree circle.member {fill: #4c6ef5;}
.sae-tree text {fill: var(--body-text-color);}
.sae-tree a {cursor: pointer; text-decoration: none !important;} .sae-tree a:hover text {text-decoration: underline;}
.sae-tree .fid {font-family: var(--font-mono); fill: var(--body-text-color-subdued);}
.sae-tree .meta {fill: var(--body-text-color-subdued); font-size: 11px;}
.sae-family-members {columns: 2; column-gap: 1.5rem; font-size: 0.86rem;}
.sae-family-members div {break-inside: avoid; padding: 0.08rem 0;}
.sae-hit {border: 1px solid var(--border-color-primary); border-radius: 8px; padding: 0.45rem 0.7rem; margin-bottom: 0.45rem;}
.sae-hit .meta {font-size: 0.78rem; color: var(--body-text-color-subdued); font-family: var(--font-mono);}
.sae-hit .new {color: #2e9d5b; font-weight: 650;}
.sae-hit .body {max-height: 7.5em; overflow: auto; font-size: 0.88rem; line-height: 1.45;}
.steer-slider {padding-top: 0.3rem !important; padding-bottom: 0.3rem !important;}
.sae-empty {color: var(--body-text-color-subdued); font-style: italic; padding: 0.4rem 0;}
.sae-unread {color: var(--body-text-color-subdued); opacity: 0.6;}
"""


# ------------------------------------------------------------------ rendering helpers
def _e(value) -> str:
    return html.escape(str(value), quote=True)


def feature_link(f: int, label: str | None = None, title: str | None = None) -> str:
    """A link to feature f's page: its id, then its label (or only the id, with the label
    as `title`, shown on hover)."""
    text = f'<span class="fid">#{f}</span>' + (_e(label) if label else "")
    hover = f' title="{_e(title)}"' if title else ""
    return f'<a class="feat" href="?feature={f}" data-feature="{f}"{hover}>{text}</a>'


def _fmt(value, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "–"
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        if value != 0 and abs(value) < 10 ** -digits:
            return f"{value:.2e}"
        return f"{value:,.{digits}f}" if abs(value) < 1e5 else f"{value:,.0f}"
    return str(value)


def _pct(value: float | None) -> str:
    if value is None:
        return "–"
    if value == 0:
        return "0%"
    # one text in 10,000 or fewer: two significant digits, still a percentage
    if value >= 0.0001:
        return f"{value:.2%}"
    return np.format_float_positional(value * 100, precision=2, fractional=False, trim="-") + "%"


def _bar(value: float, top: float, width_em: float = 8.0, negative: bool = False) -> str:
    share = 0.0 if top <= 0 else max(0.0, min(1.0, abs(value) / top))
    return f'<span class="sae-bar{" neg" if negative else ""}" style="width:{max(0.15, share * width_em):.2f}em"></span>'


def _strength(strength: str, cos: float) -> str:
    """How well a label matches a label query, in words, with the cosine of the two."""
    word = {"words": "word match", "close": "close", "near": "near", "weak": "weak"}[strength]
    return f"{word}, cos {cos:.2f}"


STRENGTH_NOTE = "word match: the label or its keywords hold the words; close, near, weak: how similar the label's meaning is (cos)"


def _offered(matches: list, strength_of) -> tuple[list, str | None]:
    """What a label query lists of its matches (best first), in both the Features and the
    Search tab: with a word or close match, every match but the weak ones, and None; else
    (a typo, nonsense) the nearest `NEAREST_SHOWN`, and the words saying that none matches."""
    if any(strength_of(m) in ("words", "close") for m in matches):
        return [m for m in matches if strength_of(m) != "weak"], None
    nearest = matches[:NEAREST_SHOWN]
    return nearest, "near or weak" if any(strength_of(m) == "near" for m in nearest) else "all weak"


def _card(title: str, body: str) -> str:
    return f'<div class="sae-card"><h3>{_e(title)}</h3>{body}</div>'


def _empty(message: str) -> str:
    return f'<div class="sae-empty">{_e(message)}</div>'


def highlight(text: str, keywords: list[str]) -> str:
    """`text`, escaped, with every whole-word occurrence of a keyword marked."""
    out, at = [], 0
    for start, end, kw in keyword_spans(text, keywords):
        out.append(_e(text[at:start]))
        out.append(f'<mark class="kw" title="keyword: {_e(kw)}">{_e(text[start:end])}</mark>')
        at = end
    out.append(_e(text[at:]))
    return "".join(out)


def histogram_svg(counts, edges, width: int = 420, height: int = 150) -> str:
    """A histogram as inline SVG (a tooltip per bar), sized by its container."""
    pad_l, pad_b, pad_t = 34, 20, 8
    top = max(1, int(max(counts)))
    n = len(counts)
    w = (width - pad_l - 4) / max(1, n)
    bars = []
    for i, c in enumerate(counts):
        h = (height - pad_b - pad_t) * (c / top)
        x, y = pad_l + i * w, height - pad_b - h
        tip = f"{edges[i]:.3f}–{edges[i + 1]:.3f}: {int(c)} text{'s' if c != 1 else ''}"
        bars.append(f'<rect class="b" x="{x:.1f}" y="{y:.1f}" width="{max(0.5, w - 1):.1f}" height="{h:.1f}"><title>{tip}</title></rect>')
    axis = (
        f'<line x1="{pad_l}" y1="{height - pad_b}" x2="{width - 4}" y2="{height - pad_b}"/>'
        f'<text x="{pad_l}" y="{height - 5}">{edges[0]:.3f}</text>'
        f'<text x="{width - 4}" y="{height - 5}" text-anchor="end">{edges[-1]:.3f}</text>'
        f'<text x="{(pad_l + width) / 2:.0f}" y="{height - 5}" text-anchor="middle">activation</text>'
        f'<text x="{pad_l - 4}" y="{pad_t + 8}" text-anchor="end">{top}</text>'
        f'<text x="{pad_l - 4}" y="{height - pad_b}" text-anchor="end">0</text>'
    )
    return f'<div class="sae-hist"><svg viewBox="0 0 {width} {height}" role="img" aria-label="activation histogram">{"".join(bars)}{axis}</svg></div>'


def family_tree_svg(rows: list[tuple[int, int, int | None, float | None]], name, note, row_height: int = 26, indent: int = 24) -> str:
    """A family's tree as inline SVG at the page's own text size, one member a row (the parent
    on top, each child indented under its tree parent): `rows` are (feature, depth, tree
    parent, weight) in tree order, `name(f)` a member's label, `note(f)` what follows it.
    An edge is as thick as its weight; every member links to its page."""
    y = {f: 14 + i * row_height for i, (f, *_) in enumerate(rows)}
    x = {f: 12 + depth * indent for f, depth, _, _ in rows}
    last_child: dict[int, int] = {}
    for f, _, up, _ in rows:
        if up is not None:
            last_child[up] = f
    lines = [f'<path d="M{x[u]},{y[u]} V{y[c]}"/>' for u, c in last_child.items()]
    nodes = []
    for f, _, up, w in rows:
        if up is not None:
            lines.append(f'<path d="M{x[up]},{y[f]} H{x[f]}" style="stroke-width:{1 + 5 * (w or 0):.1f}"><title>P(#{up} fires | #{f} fires) = {_fmt(w, 2)}</title></path>')
        label = name(f)
        shown = label if len(label) <= 60 else label[:59] + "…"
        nodes.append(
            f'<a href="?feature={f}" data-feature="{f}"><title>#{f} {_e(label)}</title>'
            f'<circle class="{"root" if up is None else "member"}" cx="{x[f]}" cy="{y[f]}" r="{7 if up is None else 5}"/>'
            f'<text x="{x[f] + 12}" y="{y[f]}" dy="0.35em"><tspan class="fid">#{f}</tspan> {_e(shown)} <tspan class="meta">{_e(note(f, w))}</tspan></text></a>'
        )
    # No text is measured on the server: ~0.55 em a character is enough room for its row.
    width = max(x[f] + 12 + 7.2 * (len(str(f)) + 2 + len(name(f)[:60])) + 6 * (len(note(f, w)) + 1) for f, _, _, w in rows) + 8
    height = y[rows[-1][0]] + row_height // 2 + 4
    return (
        f'<div class="sae-tree"><svg width="{width:.0f}" height="{height}" role="img" aria-label="feature family tree">'
        f'<g class="edges">{"".join(lines)}</g>{"".join(nodes)}</svg></div>'
    )


# ------------------------------------------------------------------ the pages
class Pages:
    """The HTML of each part of the app, from an `Explorer`."""

    def __init__(self, explorer: Explorer):
        self.x = explorer

    # -------------------------------------------------------------- header
    def header(self) -> str:
        return f'<div class="sae-header"><h1>{_e(self.x.title())}</h1><span class="source">{_e(self.x.source)}</span></div>'

    def status(self) -> str:
        s = self.x.corpus_status()
        labels = "labelled" if self.x.labelled else "not labelled (run `sbert-sae label`)"
        fams = f"{len(self.x.families)} families" if self.x.families else "no families.json"
        return f'<div class="sae-status"><span class="dot {s.state}"></span>corpus: {_e(s.message)} · {labels} · {fams}</div>'

    # -------------------------------------------------------------- features
    def search_results(self, query: str) -> str:
        q = (query or "").strip()
        try:
            rows = self.x.search_features(query, limit=100)
        except SbertSaeError as err:
            return _empty(str(err))
        if not rows:
            typed = read_feature_id(q, self.x.n)
            if typed is not None:
                return _empty(f"There is no feature {clip(typed.typed, 24)}: features are numbered 0 to {self.x.n - 1}.")
            if not self.x.labelled:
                return _empty("This SAE is not labelled: search by feature id (e.g. 12), or run `sbert-sae label`.")
            return _empty("No feature has a held-out label score to rank by: type words of a label, or a feature id.")
        by_label = "cos" in rows[0]
        if by_label:
            # As the Search tab finds a feature: by the label's words, else by its meaning.
            rows, none = _offered(rows, lambda r: r["match"])
            head = f"No feature label matches “{clip(q, 60)}”: the nearest ({none})" if none else f"{len(rows)} feature{'s' if len(rows) != 1 else ''}"
        else:
            head = "Best-scored features" if not q else "The feature with this id"
        # How well each label matches goes under it: the column is too narrow for a fourth.
        body = "".join(
            f'<tr><td>{feature_link(r["feature"], r["label"])}'
            + (f'<span class="sae-match {r["match"]}" title="{_e(STRENGTH_NOTE)}">{_e(_strength(r["match"], r["cos"]))}</span>' if by_label else "")
            + f'</td><td class="num">{_pct(r["density"])}</td><td class="num">{_fmt(r["auroc"], 2)}</td></tr>'
            for r in rows
        )
        return (
            f'<div class="sae-note">{_e(head)}; click one to open it</div><div class="sae-results"><table class="sae-table">'
            f'<tr><th>feature</th><th title="share of texts it fires on">fires on</th><th title="held-out label AUROC">AUROC</th></tr>{body}</table></div>'
        )

    def feature_header(self, f: int) -> str:
        d = self.x.feature(f)
        chips = []
        if d["density"] is not None:
            # Counted over the labelling or the training texts, not the corpus the histogram
            # counts over: the chip says which, so that the two figures do not seem to disagree.
            basis, n_texts = self.x.density_basis(f) or ("", None)
            of = f" of {n_texts:,} {basis} texts" if n_texts else f" {basis} text{'s' if d['n_firing'] != 1 else ''}"
            n_firing = f" ({d['n_firing']:,}{of})" if d.get("n_firing") is not None else ""
            chips.append(f'<span class="sae-chip" title="share of the {basis} texts this feature fires on">fires on <b>{_pct(d["density"])}</b>{n_firing}</span>')
        score = d["score"]
        if score.get("auroc") is not None:
            cls = "good" if score["auroc"] >= 0.8 else ("bad" if score["auroc"] < 0.6 else "")
            chips.append(
                f'<span class="sae-chip {cls}" title="held-out texts: AUROC of the label\'s cosine with a text, firing against non-firing texts">'
                f'label AUROC <b>{score["auroc"]:.3f}</b> (held-out, {score.get("n_firing", "?")} firing / {score.get("n_not_firing", "?")} not)</span>'
            )
        if score.get("pearson") is not None:
            chips.append(f'<span class="sae-chip" title="held-out: Pearson r of the label\'s cosine with a text and the activation">Pearson r <b>{score["pearson"]:.3f}</b></span>')
        if score.get("centroid_auroc") is not None:
            chips.append(f'<span class="sae-chip" title="AUROC of the feature\'s own centroid direction on the same texts: the most one direction reaches">centroid AUROC <b>{score["centroid_auroc"]:.3f}</b></span>')
        if d.get("train_auroc") is not None:
            chips.append(f'<span class="sae-chip" title="separation of the label on the labelling texts">labelling AUROC <b>{d["train_auroc"]:.3f}</b></span>')
        fams = self.x.families_of(f)
        if fams:
            roles = ["parent" if fam.parent == f else "member" for fam in fams]
            chips.append(f'<span class="sae-chip">{_e(roles[0])} of {len(fams)} famil{"y" if len(fams) == 1 else "ies"}</span>')
        status = ""
        if d["status"] != "labelled":
            why = f": {d['reason']}" if d.get("reason") else ""
            status = f'<div class="sae-note">{_e(d["status"])}{_e(why)}</div>'
        return (
            f'<div class="sae-card feature-page" data-current-feature="{f}"><div class="sae-title"><span class="fid">#{f}</span>'
            f'<h2 id="feature-label">{_e(d["display_label"])}</h2></div>{status}<div class="sae-chips">{"".join(chips)}</div></div>'
        )

    def keywords(self, f: int) -> str:
        d = self.x.feature(f)
        if not d["keywords"]:
            return _card("Keywords", _empty(d["status"] if d["status"] != "labelled" else "no keywords"))
        in_label = {p.strip() for p in (d["label"] or "").split(",")}
        top = max((k.get("train_auroc") or 0) for k in d["keywords"]) or 1
        rows = "".join(
            f'<tr><td>{"<b>" if k["keyword"] in in_label else ""}{_e(k["keyword"])}{"</b>" if k["keyword"] in in_label else ""}</td>'
            f'<td class="num">{_fmt(k.get("similarity"))}</td><td class="num">{_fmt(k.get("train_auroc"))} {_bar(k.get("train_auroc") or 0, top, 3.5)}</td></tr>'
            for k in d["keywords"]
        )
        table = (
            '<table class="sae-table"><tr><th>keyword (bold: in the label)</th><th title="KeyBERT: cosine with the activation-weighted centroid of the firing texts">similarity</th>'
            f'<th title="AUROC of the keyword\'s cosine, firing against non-firing labelling texts">separation</th></tr>{rows}</table>'
        )
        return _card("Keywords", table)

    def top_texts(self, f: int, n: int = 10, wait: bool = True) -> str:
        """The feature's strongest corpus texts; with `wait` False and the corpus still opening,
        the texts stored with its labels (or a note) instead of waiting for it."""
        keywords = self.x.keywords_of(f)
        if not wait and self.x.corpus_opening:
            stored = self.x.feature(f)["stored_top_texts"]
            note = _e(self.x.corpus_status().message) + " (the corpus' strongest texts show here once it is open)"
            if not stored:
                return _card("Strongest texts", f'<div class="sae-empty {WAITING}">{note}</div>')
            items = "".join(f'<div class="sae-text"><div class="body">{highlight(t, keywords)}</div></div>' for t in stored)
            return _card("Strongest texts (stored with the labels)", f'<div class="sae-note {WAITING}">{note}</div><div class="sae-texts">{items}</div>')
        try:
            texts = self.x.top_texts(f, n)
        except SbertSaeError as err:
            return _card("Strongest texts", _empty(str(err)))
        if not texts:
            d = self.x.feature(f)
            stored = d["stored_top_texts"]
            status = self.x.corpus_status()
            if self.x.corpus() is None and stored:
                items = "".join(f'<div class="sae-text"><div class="body">{highlight(t, keywords)}</div></div>' for t in stored)
                return _card("Strongest texts (stored with the labels)", f'<div class="sae-note">{_e(status.message)}</div><div class="sae-texts">{items}</div>')
            if self.x.corpus() is None:
                return _card("Strongest texts", _empty(status.message))
            return _card("Strongest texts", _empty("this feature fires on no text of the corpus"))
        top = texts[0].activation or 1.0
        items = "".join(
            f'<div class="sae-text"><div class="meta">{t.activation:.4f} {_bar(t.activation, top, 6)} · row {t.row}</div>'
            f'<div class="body">{highlight(t.text, keywords)}</div></div>'
            for t in texts
        )
        note = '<div class="sae-note">marked: the feature\'s keywords</div>' if keywords else ""
        return _card(f"Strongest texts (top {len(texts)})", f'{note}<div class="sae-texts top-texts">{items}</div>')

    def histogram(self, f: int, progress=None) -> str:
        try:
            hist = self.x.activation_histogram(f, progress=progress)
        except SbertSaeError as err:
            return _card("Activations", _empty(str(err)))
        if hist is None:
            return _card("Activations", _empty(self.x.corpus_status().message))
        if not hist["n_firing"]:
            return _card("Activations", _empty(f"fires on none of the {hist['n_texts']:,} texts"))
        values = hist["values"]
        note = (
            f'<div class="sae-note">fires on {hist["n_firing"]:,} of {hist["n_texts"]:,} texts ({hist["n_firing"] / hist["n_texts"]:.2%}); '
            f"activation median {float(sorted(values)[len(values) // 2]):.3f}, max {float(values.max()):.3f}</div>"
        )
        return _card("Activations over the corpus", note + histogram_svg(hist["counts"], hist["edges"]))

    def neighbours(self, f: int, top: int = 10) -> str:
        rows = self.x.neighbours(f, top)
        best = max((r["cosine"] for r in rows), default=1.0) or 1.0
        body = "".join(f'<tr><td>{feature_link(r["feature"], r["label"])}</td><td class="num">{r["cosine"]:.3f} {_bar(r["cosine"], best, 4)}</td></tr>' for r in rows)
        return _card("Nearest features (decoder cosine)", f'<table class="sae-table neighbours"><tr><th>feature</th><th>cosine</th></tr>{body}</table>')

    def cooccurring(self, f: int, top: int = 10, progress=None) -> str:
        try:
            rows = self.x.cooccurring(f, top, progress=progress)
        except SbertSaeError as err:
            return _card("Fires most often with", _empty(str(err)))
        if rows is None:
            return _card("Fires most often with", _empty(self.x.corpus_status().message))
        if not rows:
            return _card("Fires most often with", _empty("fires on no text, or alone"))
        body = "".join(
            f'<tr><td>{feature_link(r["feature"], r["label"])}</td><td class="num">{r["together"]:,}</td>'
            f'<td class="num">{r["p_other_given_this"]:.0%}</td><td class="num">{r["p_this_given_other"]:.0%}</td></tr>'
            for r in rows
        )
        return _card(
            "Fires most often with",
            '<table class="sae-table cooccurring"><tr><th>feature</th><th title="texts both fire on">texts</th>'
            f'<th title="share of this feature\'s texts the other fires on">P(it | this)</th><th title="share of the other\'s texts this one fires on">P(this | it)</th></tr>{body}</table>',
        )

    def family(self, f: int, most: int = 40) -> str:
        if not self.x.families:
            return _card("Family", _empty("no families.json: run `sbert-sae families` on this SAE"))
        fams = self.x.families_of(f)
        if not fams:
            return _card("Family", _empty("in no family"))
        parts = []
        for fam in fams[:3]:
            role = "heads this family" if fam.parent == f else f"depth {fam.depth[fam.children.index(f)]} in this family"
            members = "".join(
                f'<div>{"&nbsp;" * 3 * (d - 1)}{"<b>" if c == f else ""}{feature_link(c, self.x.display_label(c))}{"</b>" if c == f else ""}</div>'
                for c, d in list(zip(fam.children, fam.depth))[:most]
            )
            more = f'<div class="sae-note">and {len(fam.children) - most} more</div>' if len(fam.children) > most else ""
            parts.append(
                f'<div class="sae-note">{_e(role)} · {len(fam.children)} children · family label: <b>{_e(fam.label or "–")}</b></div>'
                f"<div>parent: {feature_link(fam.parent, self.x.display_label(fam.parent))}</div>"
                f'<div class="sae-family-members">{members}</div>{more}'
            )
        return _card("Family" if len(fams) == 1 else f"Families ({len(fams)})", "<hr>".join(parts))

    # -------------------------------------------------------------- texts
    def inspection(self, text: str) -> tuple[str, str]:
        result = self.x.inspect(text)
        metrics = self.x.sae.metrics or {}
        ref_cos, ref_err = metrics.get("heldout_cosine"), metrics.get("heldout_normalized_mse")
        chips = [
            f'<span class="sae-chip" title="cosine of the embedding x and its reconstruction x̂">cos(x, x̂) <b>{result.cosine:.3f}</b>'
            + (f" (held-out mean {ref_cos:.3f})" if ref_cos is not None else "")
            + "</span>",
            f'<span class="sae-chip" title="||x − x̂||² / ||x||²: the share of the text\'s embedding the SAE does not rebuild">relative error <b>{result.relative_error:.3f}</b>'
            + (f" (held-out {ref_err:.3f})" if ref_err is not None else "")
            + "</span>",
            f'<span class="sae-chip">active features <b>{result.l0}</b> of k={self.x.sae.config.k}</span>',
        ]
        keywords = [kw for r in result.features[:5] for kw in self.x.keywords_of(r["feature"], 6)]
        shown = highlight(text, keywords)
        if result.embedded_chars is not None:
            # The base model read only the text's beginning: its features are those of that part.
            chips.append(
                f'<span class="sae-chip bad" id="text-truncated" title="the base model reads at most {result.max_tokens} tokens of a text: the rest, greyed, is not embedded">'
                f"embedded: its first <b>{result.max_tokens:,}</b> of {result.tokens:,} tokens</span>"
            )
            cut = result.embedded_chars
            shown = f'{highlight(text[:cut], keywords)}<span class="sae-unread" title="past the base model\'s {result.max_tokens} tokens: not embedded">{_e(text[cut:])}</span>'
        top = result.features[0]["activation"] if result.features else 1.0
        rows = "".join(
            f'<tr><td class="label">{feature_link(r["feature"], r["label"])}</td><td class="bar">{_bar(r["activation"], top, 14)}</td><td class="num">{r["activation"]:.4f}</td></tr>'
            for r in result.features
        )
        summary = f'<div class="sae-card"><div class="sae-chips">{"".join(chips)}</div><div class="sae-text" style="margin-top:0.6rem"><div class="body">{shown}</div></div><div class="sae-note">marked: keywords of its 5 strongest features</div></div>'
        chart = _card(
            f"Active features ({result.l0})",
            f'<table class="sae-table sae-bars active-features"><tr><th>feature</th><th>activation</th><th></th></tr>{rows}</table>' if rows else _empty("no feature fires on this text"),
        )
        return summary, chart

    # -------------------------------------------------------------- overview
    def overview(self) -> str:
        s = self.x.summary()
        facts = [
            ("base model", s["base_model"]),
            ("features (n_latents)", f'{s["n_latents"]:,}'),
            ("active per text (k)", s["k"]),
            ("input size (d_in)", s["d_in"]),
            ("input normalisation", s["normalize"]),
            ("labelled features", f'{s["n_labelled"]:,}' if s["labelled"] else "not labelled: run `sbert-sae label`"),
            ("labelled on", s["label_dataset"] or "–"),
            ("families", s["n_families"] or "none found (or `sbert-sae families` not run)"),
        ]
        facts_html = "".join(f"<tr><td>{_e(k)}</td><td>{_e(v)}</td></tr>" for k, v in facts)
        metrics = self.x.metrics()
        metric_rows = "".join(f'<tr><td><code>{_e(k)}</code></td><td class="num">{_fmt(v, 4)}</td><td>{_e(desc)}</td></tr>' for k, v, desc in metrics)
        metrics_html = (
            f'<table class="sae-table metrics"><tr><th>metric</th><th>value</th><th>what it is</th></tr>{metric_rows}</table>' if metrics else _empty("no metrics.json")
        )
        return _card("The SAE", f'<table class="sae-table">{facts_html}</table>') + _card("Metrics (metrics.json)", metrics_html)

    def families_list(self) -> str:
        if not self.x.families:
            return _card("Families", _empty("no families.json: run `sbert-sae families` on this SAE"))
        rows = "".join(
            f'<tr><td>{feature_link(fam.parent, self.x.display_label(fam.parent))}</td><td>{_e(fam.label or "–")}</td><td class="num">{len(fam.children)}</td>'
            f'<td>{" ".join(feature_link(c, None, self.x.display_label(c)) for c in fam.children[:8])}{" …" if len(fam.children) > 8 else ""}</td></tr>'
            for fam in self.x.families
        )
        return _card(
            f"Families ({len(self.x.families)}, largest first)",
            f'<div class="sae-results"><table class="sae-table families"><tr><th>parent</th><th>family label</th><th>children</th><th>first children</th></tr>{rows}</table></div>',
        )

    def family_tree(self, max_nodes: int = 40) -> str | None:
        """The family `sbert-sae families` draws in family_graph.png (a mid-sized, tight one)
        as a tree in the page, its text as large as the page's: the picture, scaled down to
        the column, was unreadable until enlarged. None without families."""
        family = pick_family(self.x.families)
        if family is None:
            return None
        kids, weight = family_tree(family, max_nodes)
        rows: list[tuple[int, int, int | None, float | None]] = []

        def walk(f: int, depth: int, up: int | None) -> None:
            rows.append((f, depth, up, weight.get(f)))
            for c in kids.get(f, []):
                walk(c, depth + 1, f)

        walk(family.parent, 0, None)

        def note(f: int, w: float | None) -> str:
            share = self.x.density(f)
            return " · ".join(part for part in (_pct(share) if share is not None else "", f"{w:.2f}" if w is not None else "") if part)

        hidden = len(family.features) - len(rows)
        more = f"; {hidden} deeper members not shown" if hidden else ""
        head = (
            f'<div class="sae-note">{feature_link(family.parent, self.x.display_label(family.parent))} and its {len(family.children)} children'
            f"{_e(more)} · family label: <b>{_e(family.label or '–')}</b></div>"
            '<div class="sae-note">after each member: the share of texts it fires on, then how often its tree parent fires with it (the line\'s width); click one to open it</div>'
        )
        return _card("One family as a tree", head + family_tree_svg(rows, self.x.display_label, note))

    def density_plot(self) -> str | None:
        """density.png beside the SAE, else one drawn from the features' firing counts."""
        path = self.x.plot("density.png")
        if path:
            return path
        counts = self.x.fire_counts()
        if counts is None:
            return None
        import tempfile

        from .evaluation import plot_density

        out = Path(tempfile.mkdtemp(prefix="sbert-sae-explore-")) / "density.png"
        plot_density(counts[0], counts[1], out, title=self.x.title())
        return str(out)


# ------------------------------------------------------------------ the app
def build_app(explorer: Explorer):
    """The Gradio Blocks of the explorer of `explorer` (not launched; see `launch`)."""
    pages = Pages(explorer)
    steering = Steering(explorer)

    def open_feature(f):
        try:
            f = explorer.check_feature(f)
        except SbertSaeError as err:
            raise gr.Error(str(err)) from None
        loading = _empty("counting over the corpus…")
        return (
            gr.Tabs(selected=FEATURES_TAB),
            f,
            pages.feature_header(f),
            pages.keywords(f),
            # Not waiting for a corpus still opening (embedded the first time: minutes): the
            # page shows now, and its texts follow (feature_corpus_figures).
            pages.top_texts(f, wait=False),
            pages.neighbours(f),
            pages.family(f),
            loading,
            loading,
        )

    def feature_corpus_figures(f, shown_top: str, progress=gr.Progress()):  # noqa: B008 - Gradio's way of asking for a progress bar
        if f is None:
            return gr.skip(), "", ""
        top = pages.top_texts(f) if WAITING in (shown_top or "") else gr.skip()

        def report(seconds):
            progress(None, desc=f"encoding the corpus' codes (once; they are kept on disk): {seconds:.0f}s")

        return top, pages.histogram(f, progress=report), pages.cooccurring(f, progress=report)

    def feature_page(feature: int) -> dict:
        """A feature's page by its id, each part as the Features tab shows it (HTML), waiting
        for the corpus where a part needs it: the one way for a script to open a feature, whose
        links in the page pass their id from JavaScript."""
        try:
            f = explorer.check_feature(feature)
        except SbertSaeError as err:
            raise gr.Error(str(err)) from None
        return {
            "feature": f,
            "label": explorer.display_label(f),
            "header": pages.feature_header(f),
            "keywords": pages.keywords(f),
            "top_texts": pages.top_texts(f),
            "histogram": pages.histogram(f),
            "neighbours": pages.neighbours(f),
            "cooccurring": pages.cooccurring(f),
            "family": pages.family(f),
        }

    def feature_data(feature: int, top: int = 10) -> dict:
        """A feature's page as plain data, for a script: label, status, keywords with their
        scores, held-out label score, density, its `top` strongest texts (row id, activation,
        text), activation histogram, nearest features by decoder cosine, the features firing
        with it and its families (see `Explorer.feature_data`)."""
        try:
            return explorer.feature_data(feature, top)
        except SbertSaeError as err:
            raise gr.Error(str(err)) from None

    def search_data(query: str, k: int = 10, steer: dict | None = None, method: str = "add") -> dict:
        """The Search tab's search as plain data, for a script: the query's features, and its `k`
        nearest texts (row id, cosine, text, the features firing on it), steered by `steer`
        (feature id -> strength, as the sliders: above 0 raises, below 0 lowers) by `method`
        (add or clamp); no session needed (see `Explorer.search_data`)."""
        try:
            return explorer.search_data(query, k, steer, method)
        except SbertSaeError as err:
            raise gr.Error(str(err)) from None

    def inspect_text_data(text: str) -> dict:
        """The Texts tab's inspection as plain data, for a script: the text's active features
        (feature id, activation, label), its reconstruction's cosine and relative error, and
        how many of its tokens the base model read (see `Explorer.inspect_data`)."""
        try:
            return explorer.inspect_data(text)
        except SbertSaeError as err:
            raise gr.Error(str(err)) from None

    def on_link(evt: gr.EventData):
        return open_feature(evt.feature)

    def inspect(text):
        try:
            return pages.inspection(text)
        except SbertSaeError as err:
            raise gr.Error(str(err)) from None

    def tick():
        status = explorer.corpus_status()
        return pages.status(), gr.Timer(active=status.state == "loading")

    def on_load(request: gr.Request):
        explorer.start_corpus()
        explorer.start_label_finder()  # again, should the one started with the app have failed
        params = dict(request.query_params) if request is not None else {}
        if "feature" in params:
            try:
                return open_feature(params["feature"])
            except gr.Error as err:
                # A link to a feature that is not there says so, not the blank start page.
                return (gr.Tabs(selected=FEATURES_TAB), gr.skip(), _card("No such feature", _empty(f"?feature={clip(params['feature'], 24)}: {err.message}"))) + (gr.skip(),) * 6
        return (gr.Tabs(),) + (gr.skip(),) * 8

    examples = _example_texts(explorer)
    with gr.Blocks(title=f"sbert-sae explorer: {explorer.source}", analytics_enabled=False) as demo:
        gr.HTML(pages.header(), elem_id="sae-header", js_on_load=None)
        status = gr.HTML(pages.status(), elem_id="sae-status", js_on_load=None)
        timer = gr.Timer(1.5)
        current = gr.State(None)
        with gr.Tabs(selected=FEATURES_TAB, elem_id="sae-tabs") as tabs:
            with gr.Tab("Features", id=FEATURES_TAB, elem_id="tab-features"):
                with gr.Row(equal_height=False):
                    with gr.Column(scale=2, min_width=330):
                        with gr.Row():
                            query = gr.Textbox(
                                placeholder="words of a label or keyword, what it is about, or a feature id (812)",
                                show_label=False,
                                scale=4,
                                elem_id="feature-query",
                            )
                            find = gr.Button("Find", variant="primary", scale=1, min_width=70, elem_id="feature-find")
                        results = gr.HTML(pages.search_results(""), elem_id="feature-results", js_on_load=FEATURE_LINKS_JS)
                    with gr.Column(scale=5):
                        header = gr.HTML(
                            _empty("Find a feature on the left, or click any feature anywhere in the app, to open its page here."),
                            elem_id="feature-header",
                            js_on_load=None,
                        )
                        with gr.Row(equal_height=False):
                            with gr.Column(scale=3):
                                top_texts = gr.HTML("", elem_id="feature-top-texts", js_on_load=None)
                            with gr.Column(scale=2, min_width=300):
                                histogram = gr.HTML("", elem_id="feature-histogram", js_on_load=None)
                                keywords = gr.HTML("", elem_id="feature-keywords", js_on_load=None)
                        with gr.Row(equal_height=False):
                            neighbours = gr.HTML("", elem_id="feature-neighbours", js_on_load=FEATURE_LINKS_JS)
                            cooccurring = gr.HTML("", elem_id="feature-cooccurring", js_on_load=FEATURE_LINKS_JS)
                        family = gr.HTML("", elem_id="feature-family", js_on_load=FEATURE_LINKS_JS)
            with gr.Tab("Texts", id=TEXTS_TAB, elem_id="tab-texts"):
                with gr.Row(equal_height=False):
                    with gr.Column(scale=2):
                        text = gr.Textbox(label="A text", lines=6, placeholder="Paste or type a text: its active features appear on the right.", elem_id="text-input")
                        inspect_button = gr.Button("Inspect", variant="primary", elem_id="text-inspect")
                        if examples:
                            gr.Examples(examples, inputs=text, label="Texts from the corpus")
                    with gr.Column(scale=3):
                        text_summary = gr.HTML("", elem_id="text-summary", js_on_load=None)
                        text_features = gr.HTML(_empty("The text's active features will show here."), elem_id="text-features", js_on_load=FEATURE_LINKS_JS)
            with gr.Tab("Search", id=SEARCH_TAB, elem_id="tab-search"):
                steering.build()
            with gr.Tab("Overview", id=OVERVIEW_TAB, elem_id="tab-overview"):
                with gr.Row(equal_height=False):
                    with gr.Column(scale=3):
                        gr.HTML(pages.overview(), elem_id="overview-metrics", js_on_load=None)
                    with gr.Column(scale=2):
                        # Gradio's label floats over the image, hiding the plot's own title: the
                        # plots carry their titles, and the tree a caption above it.
                        density = pages.density_plot()
                        if density:
                            gr.Image(density, label="Feature density", show_label=False, interactive=False, elem_id="overview-density", buttons=["fullscreen"])
                        tree = pages.family_tree()
                        tree_html = gr.HTML(tree, elem_id="overview-family-tree", js_on_load=FEATURE_LINKS_JS) if tree else None
                families_html = gr.HTML(pages.families_list(), elem_id="overview-families", js_on_load=FEATURE_LINKS_JS)

        feature_outputs = [tabs, current, header, keywords, top_texts, neighbours, family, histogram, cooccurring]
        figure_outputs = [top_texts, histogram, cooccurring]

        # The events a script calls are named (API_ENDPOINTS); the rest, a click on a link (its
        # feature comes from the page's JavaScript), the timer and the page's load, are the
        # page's own: unnamed, Gradio listed them as /on_link_3, /feature_corpus_figures_7, ...
        def wire(event):
            opened = event(on_link, None, feature_outputs, api_name=False)
            opened.then(None, js=SCROLL_TO_FEATURE_JS)
            opened.then(feature_corpus_figures, [current, top_texts], figure_outputs, api_name=False)

        for linked in (results, neighbours, cooccurring, family, text_features, families_html, *([tree_html] if tree_html else []), *steering.linked):
            wire(linked.click)
        steering.wire()
        find.click(pages.search_results, query, results, api_name="find_features")
        query.submit(pages.search_results, query, results, api_name=False)  # the same as /find_features
        inspect_button.click(inspect, text, [text_summary, text_features], api_name="inspect_text")
        text.submit(inspect, text, [text_summary, text_features], api_name=False)  # the same as /inspect_text
        timer.tick(tick, None, [status, timer], api_name=False)
        demo.load(on_load, None, feature_outputs, api_name=False).then(
            feature_corpus_figures, [current, top_texts], figure_outputs, api_name=False
        )
        gr.api(feature_page, api_name="feature")
        gr.api(feature_data, api_name="feature_data")
        gr.api(search_data, api_name="search_data")
        gr.api(inspect_text_data, api_name="inspect_text_data")
    # Before anyone clicks Find: the page renders meanwhile, and a Find made before it is done waits for it.
    explorer.start_label_finder()
    return demo


def _example_texts(explorer: Explorer, n: int = 3) -> list[list[str]]:
    """A few texts of the corpus for the Texts tab: the stored strongest texts of the
    best-scored features (whole ones, not cut)."""
    rows = explorer.search_features("", limit=50)
    out = []
    for r in rows:
        for t in explorer.feature(r["feature"])["stored_top_texts"]:
            if not t.endswith("…") and 40 <= len(t) <= 400 and [t] not in out:
                out.append([t])
                break
        if len(out) >= n:
            break
    return out


def _named_sliders(fn, *names: str):
    """`fn(*names, *sliders)` with the sliders as parameters slider_1 .. slider_16: Gradio names an
    endpoint's parameters after its function's, and lists a `*values` as param_4, param_5, ...,
    so a script could not say which slider it sets (`predict(..., slider_2=1.0)`)."""

    def with_sliders(*args):
        return fn(*args)

    sliders = [f"slider_{i + 1}" for i in range(MAX_STEERED)]
    with_sliders.__signature__ = inspect.Signature([inspect.Parameter(n, inspect.Parameter.POSITIONAL_OR_KEYWORD) for n in (*names, *sliders)])
    with_sliders.__name__ = fn.__name__
    return with_sliders


class Steering:
    """The Search tab: a query's nearest corpus texts, then the same search steered by a
    slider per feature (the query's own strongest features, plus any added by label)."""

    def __init__(self, explorer: Explorer):
        self.x = explorer

    # -------------------------------------------------------------- layout
    def build(self) -> None:
        with gr.Row(equal_height=True):
            self.query = gr.Textbox(label="Query", placeholder="What to search the corpus for", scale=6, elem_id="search-query")
            self.k = gr.Slider(5, 50, value=10, step=1, label="results", scale=1, min_width=140, elem_id="search-k")
            self.method = gr.Radio(
                ["add", "clamp"],
                value="add",
                label="steering",
                info="add: move the query along the feature's direction; clamp: set its activation",
                scale=2,
                elem_id="search-method",
            )
        self.go = gr.Button("Search", variant="primary", elem_id="search-go")
        self.slots = gr.State([])
        with gr.Row(equal_height=False):
            with gr.Column(scale=2, min_width=340):
                gr.HTML(
                    '<div class="sae-note">One slider per feature: 0 leaves it as it is, above 0 raises it, below 0 lowers it '
                    "(strength in units of the query's length; −1 removes it under clamp). Then press <b>Search with steering</b>.</div>",
                    js_on_load=None,
                )
                # Hidden until a search gives each its feature (and its label): the label here names
                # the slider's parameter of /search_steered and /add_steering_slider (else param_4, ...).
                self.sliders = [
                    gr.Slider(-1, 2, value=0, step=0.05, label=f"slider {i + 1}", visible=False, elem_id=f"steer-{i}", elem_classes=["steer-slider"])
                    for i in range(MAX_STEERED)
                ]
                self.apply = gr.Button("Search with steering", variant="primary", elem_id="steer-apply")
                with gr.Accordion("Add a feature by its label or id", open=True):
                    with gr.Row(equal_height=True):
                        self.about = gr.Textbox(placeholder="e.g. galaxy, or 812", show_label=False, scale=3, elem_id="steer-about")
                        self.find = gr.Button("Find", scale=1, min_width=70, elem_id="steer-find")
                    self.choice = gr.Dropdown(choices=[], label="Features whose label matches", info=STRENGTH_NOTE, interactive=True, elem_id="steer-choice")
                    self.add = gr.Button("Add a slider for it", elem_id="steer-add")
            with gr.Column(scale=5):
                self.summary = gr.HTML(_empty("Type a query and press Search."), elem_id="search-summary", js_on_load=FEATURE_LINKS_JS)
                with gr.Row(equal_height=False):
                    self.before = gr.HTML("", elem_id="search-before", js_on_load=FEATURE_LINKS_JS)
                    self.after = gr.HTML("", elem_id="search-after", js_on_load=FEATURE_LINKS_JS)

    @property
    def linked(self) -> list:
        """The parts that show feature links."""
        return [self.summary, self.before, self.after]

    def wire(self) -> None:
        outputs = [self.slots, *self.sliders, self.summary, self.before, self.after]
        self.go.click(self.start, [self.query, self.k], outputs, api_name="search")
        self.query.submit(self.start, [self.query, self.k], outputs, api_name=False)  # the same as /search
        self.find.click(self.find_features, self.about, self.choice, api_name="find_steering_feature")
        self.about.submit(self.find_features, self.about, self.choice, api_name=False)  # the same as /find_steering_feature
        add = _named_sliders(self.add_feature, "choice", "slots")
        self.add.click(add, [self.choice, self.slots, *self.sliders], [self.slots, *self.sliders], api_name="add_steering_slider")
        steered = _named_sliders(self.steered, "query", "k", "method", "slots")
        self.apply.click(steered, [self.query, self.k, self.method, self.slots, *self.sliders], [self.summary, self.before, self.after], api_name="search_steered")

    # -------------------------------------------------------------- events
    def _index(self):
        try:
            return self.x.search_index()
        except SbertSaeError as err:
            raise gr.Error(str(err)) from None

    def _slider(self, f: int, note: str, value: float = 0.0):
        return gr.Slider(visible=True, value=value, label=f"#{f} {self.x.display_label(f)}", info=note)

    def start(self, query: str, k: int):
        """The query's own strongest features as sliders (all at 0), and its plain results."""
        if not (query or "").strip():
            # An error, not a warning and nothing changed: a script calling /search sees no warning.
            raise gr.Error("The query is empty: type what to search for.")
        index = self._index()
        try:
            feats = index.query_features(query, top=QUERY_SLIDERS)
            result = index.search(query, k=int(k))
        except SbertSaeError as err:
            raise gr.Error(str(err)) from None
        slots = [f for f, _, _ in feats]
        sliders = [self._slider(f, f"{v:.3f} in the query") for f, v, _ in feats]
        sliders += [gr.Slider(visible=False, value=0) for _ in range(MAX_STEERED - len(sliders))]
        summary = _card(
            "The query's features",
            '<div class="sae-chips">'
            + "".join(f'<span class="sae-chip">{feature_link(f, self.x.display_label(f))} <b>{v:.3f}</b></span>' for f, v, _ in feats)
            + "</div>"
            + _query_prompt_note(index.query_encoding),
        )
        before = self.hits("Results", result.hits, set(), [])
        return [slots, *sliders, summary, before, _empty("Move a slider and press “Search with steering”.")]

    def find_features(self, about: str):
        if not (about or "").strip():
            raise gr.Error("Type a word of the feature's label, or its id.")
        typed = read_feature_id(about, self.x.n)
        if typed is not None:
            # An id: the one way to steer by a feature of an SAE without labels.
            if typed.problem:
                raise gr.Error(typed.problem)
            f = typed.feature
            choices = [(f"#{f} {self.x.display_label(f)}", f)]
            return gr.Dropdown(choices=choices, value=f, label="The feature with this id")
        try:
            matches = self._index().features_about(about, top=12)
        except SbertSaeError as err:
            raise gr.Error(f"{err} (or type a feature's id, e.g. 12)") from None
        shown, none = _offered(matches, lambda m: m.strength)
        if none:
            # Nothing close (a typo, nonsense): the nearest few, said to be weak, none picked.
            # A query is echoed in part: a pasted page would fill the dropdown's label.
            title = f"No feature label matches “{clip(about.strip(), 60)}”: the nearest ({none})"
            gr.Warning(f"No feature label matches “{clip(about.strip(), 60)}”; the list holds the nearest labels, {none} matches.")
        else:
            title = "Features whose label matches"
        choices = [(f"#{m.feature} {m.label} · {_strength(m.strength, m.score)}", m.feature) for m in shown]
        return gr.Dropdown(choices=choices, value=None if none else choices[0][1], label=title)

    def add_feature(self, choice, slots: list[int], *values):
        if choice is None:
            raise gr.Error("Find a feature by its label first, then pick it.")
        f = self.x.check_feature(int(choice))
        slots = list(slots)
        updates = [gr.skip() for _ in range(MAX_STEERED)]
        if f in slots:
            updates[slots.index(f)] = gr.Slider(value=max(float(values[slots.index(f)]), 1.0))
            return [slots, *updates]
        if len(slots) >= MAX_STEERED:
            raise gr.Error(f"At most {MAX_STEERED} sliders: search again to start over.")
        updates[len(slots)] = self._slider(f, "added", value=1.0)
        return [[*slots, f], *updates]

    def steered(self, query: str, k: int, method: str, slots: list[int], *values):
        """The query's results without and with the sliders' steering, side by side."""
        if not (query or "").strip():
            raise gr.Error("The query is empty: type what to search for.")
        if not slots:
            # A script's session that has not searched yet: its slider values stand for no feature.
            raise gr.Error("No sliders yet: search first (Search, or /search), which gives the query's features their sliders.")
        up = {f: float(v) for f, v in zip(slots, values) if v and v > 0}
        down = {f: -float(v) for f, v in zip(slots, values) if v and v < 0}
        if not up and not down:
            raise gr.Error("Every slider is at 0: move one to steer the search.")
        index = self._index()
        steered_ids = [*up, *down]
        try:
            plain = index.search(query, up={f: 0.0 for f in steered_ids}, k=int(k))
            result = index.search(query, up=up, down=down, k=int(k), method=method)
        except SbertSaeError as err:
            raise gr.Error(str(err)) from None
        before_rows = {h.row for h in plain.hits}
        new = sum(h.row not in before_rows for h in result.hits)
        moves = "".join(
            f'<span class="sae-chip">{"▲" if f in up else "▼"} {feature_link(f, self.x.display_label(f))} <b>{up.get(f, -down.get(f, 0)):+.2f}</b></span>'
            for f in steered_ids
        )
        summary = _card(
            "Steering",
            f'<div class="sae-chips">{moves}</div><div class="sae-note" id="steer-outcome">{method}: cos(steered query, query) = {result.cosine:.3f}; '
            f"{new} of {len(result.hits)} results are new</div>",
        )
        keywords = [kw for f in up for kw in self.x.keywords_of(f, 6)]
        return summary, self.hits("Without steering", plain.hits, set(), steered_ids), self.hits("Steered", result.hits, before_rows, steered_ids, keywords)

    def hits(self, title: str, hits, before: set[int], features: list[int], keywords: list[str] | None = None) -> str:
        if not hits:
            return _card(title, _empty("no results"))
        items = []
        similarity = self._index().similarity  # the base model's: "dot" for a dot-product model
        score_name = "cos" if similarity == "cosine" else similarity
        for rank, h in enumerate(hits, 1):
            tag = ' <span class="new">new</span>' if before and h.row not in before else ""
            acts = " ".join(f'<span title="activation of #{f} in this text">#{f}: {h.steered.get(f, 0.0):.3f}</span>' for f in features)
            body = highlight(h.text or "", keywords or [])
            items.append(
                f'<div class="sae-hit" data-row="{h.row}"><div class="meta">{rank}. {score_name} {h.score:.3f} · row {h.row}{tag}{" · " + acts if acts else ""}</div>'
                f'<div class="body">{body}</div></div>'
            )
        return _card(title, "".join(items))


def _query_prompt_note(encoding) -> str:
    """The Search tab's line naming the prompt a query was embedded with, for a base model
    with prompts (an asymmetric one embeds queries and documents apart); "" for one without."""
    from .base_model import AS_CORPUS

    if encoding.prompt is None and encoding.reason == AS_CORPUS:
        return ""
    shown = f"the prompt <code>{html.escape(encoding.prompt)}</code>" if encoding.prompt is not None else "no prompt"
    return f'<div class="sae-note" id="query-prompt">Query embedded with {shown}: {html.escape(encoding.reason)}</div>'


# ------------------------------------------------------------------ serving
def launch(demo, host: str | None = "127.0.0.1", port: int | None = None, share: bool = False, open_browser: bool = False, block: bool = True, quiet: bool = False):
    """Serve the app (`host` None: Gradio's default, which a Space sets by environment);
    returns (app, local_url, share_url) when `block` is False."""
    theme = gr.themes.Soft(primary_hue="indigo", neutral_hue="slate")  # its fonts are served by the app itself
    return demo.launch(
        server_name=host,
        server_port=port,
        share=share,
        inbrowser=open_browser,
        prevent_thread_lock=not block,
        quiet=quiet,
        css=CSS,
        theme=theme,
        footer_links=["gradio"],
    )


def serve(
    source: str,
    *,
    dataset: str | None = None,
    text_column: str | None = None,
    revision: str | None = None,
    host: str | None = "127.0.0.1",
    port: int | None = None,
    share: bool = False,
    open_browser: bool = True,
    device: str | None = None,
    cache_dir: str | None = None,
    query_prompt_name: str | None = None,
    query_prompt: str | None = None,
    query_like_corpus: bool = False,
):
    """Open the explorer of an SAE folder, Hub repo or registry short name and serve it
    until interrupted; `query_*`: how the Search tab embeds a query (`Explorer.open`)."""
    explorer = Explorer.open(
        source, dataset=dataset, text_column=text_column, device=device, cache_dir=cache_dir, revision=revision,
        query_prompt_name=query_prompt_name, query_prompt=query_prompt, query_like_corpus=query_like_corpus,
    )
    explorer.start_corpus()
    demo = build_app(explorer)
    return launch(demo, host=host, port=port, share=share, open_browser=open_browser)
