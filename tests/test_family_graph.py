"""family_graph.png, the one family `sbert-sae families` draws and `push` puts in the model
card: it must read at the width a card shows it (~800 px), whatever the family's size."""

from __future__ import annotations

import struct

import numpy as np
import pytest

from sbert_sae import families
from sbert_sae.families import Family, plot_family_graph

CARD_WIDTH_PX = 800
"""About the width a Hub model card shows an image at."""
SMALLEST_TEXT_PX = 12
"""Text smaller than this, at the card's width, is not read without enlarging the image."""

WORDS = "voltage battery magnet circuit current charge field wire power motor resistance capacitor transformer".split()


def _family(n_children: int) -> tuple[Family, np.ndarray, int]:
    """A family of `n_children` (the last one under the first child), labelled as KeyBERT
    labels are: two or three comma-separated words, some long."""
    rng = np.random.default_rng(n_children)
    children = list(range(1, n_children + 1))
    under = [0] * (n_children - 1) + [1]
    depth = [1] * (n_children - 1) + [2]
    labels = [", ".join(rng.choice(WORDS, size=int(rng.integers(2, 4)), replace=False)) for _ in range(n_children + 1)]
    labels[2] = "electric power distribution, customers, high voltage direct current transmission lines"
    family = Family(
        parent=0,
        children=children,
        under=under,
        depth=depth,
        weights=list(np.linspace(0.9, 0.3, n_children)),
        label=f"{labels[0]}: {labels[1]}",
        parent_label=labels[0],
        child_labels=labels[1:],
    )
    counts = np.arange(n_children + 1)[::-1] * 7 + 3
    return family, counts, 10_000


def _png_size(path) -> tuple[int, int]:
    head = path.read_bytes()[:24]
    assert head[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", head[16:24])


@pytest.mark.parametrize("n_children", [5, 15, 39])
def test_family_graph_reads_at_a_model_cards_width(n_children, tmp_path, monkeypatch):
    """The layered tree spread its leaves side by side in 7 pt text: 15 children made a
    2625 px wide PNG whose text was 2-3 px high in a card. Every text must now be at least
    `SMALLEST_TEXT_PX` high at the card's width and lie inside the image, each member named
    by its id and label, with its share of texts and its edge's weight."""
    import matplotlib.text

    family, counts, n_texts = _family(n_children)
    drawn = []
    save = families.save_figure
    monkeypatch.setattr(families, "save_figure", lambda fig, path, **kw: (drawn.append((fig, kw.get("dpi", fig.dpi))), save(fig, path, **kw)))
    path = tmp_path / "family_graph.png"
    plot_family_graph(family, path, counts=counts, n_texts=n_texts)
    fig, dpi = drawn[0]
    width, height = _png_size(path)
    assert (width, height) == (round(fig.get_figwidth() * dpi), round(fig.get_figheight() * dpi))
    shrink = min(1.0, CARD_WIDTH_PX / width)
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    canvas = FigureCanvasAgg(fig)  # the figure is closed once saved: lay it out again to measure
    canvas.draw()
    renderer = canvas.get_renderer()
    texts = [t for t in fig.findobj(matplotlib.text.Text) if t.get_visible() and t.get_text()]
    for t in texts:
        assert t.get_fontsize() * dpi / 72 * shrink >= SMALLEST_TEXT_PX, (t.get_text(), t.get_fontsize(), width)
        box = t.get_window_extent(renderer)
        assert box.x0 >= 0 and box.x1 <= fig.get_figwidth() * fig.dpi + 0.5, t.get_text()
    shown = " ".join(t.get_text() for t in texts)
    for f, label, w in zip(family.children, family.child_labels, family.weights):
        assert f"#{f} {label[:20]}" in shown
        assert f"{counts[f] / n_texts:.2%} · {w:.2f}" in shown
    assert f"#0 {family.parent_label}" in shown


def test_a_larger_family_grows_down_not_across(tmp_path):
    small, counts, n = _family(5)
    large, counts_large, _ = _family(30)
    plot_family_graph(small, tmp_path / "small.png", counts=counts, n_texts=n)
    plot_family_graph(large, tmp_path / "large.png", counts=counts_large, n_texts=n)
    (w_small, h_small), (w_large, h_large) = _png_size(tmp_path / "small.png"), _png_size(tmp_path / "large.png")
    assert w_small == w_large and h_large > 3 * h_small
