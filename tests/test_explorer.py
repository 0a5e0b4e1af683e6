"""The explorer web app, driven end to end in headless Chromium: a small SAE trained and
labelled on real Wikipedia text, served on 127.0.0.1, clicked through as a person would.
What the page shows is checked against the same figures computed with the public API.
Screenshots go to tests/artifacts/explorer/."""

from __future__ import annotations

import os
import re
import shutil
import socket
from pathlib import Path

import pytest
import torch

from sbert_sae import InputError, SparseAutoencoder
from sbert_sae.cli import main

CHROMIUM = Path("/usr/bin/chromium")
ARTIFACTS = Path(__file__).parent / "artifacts" / "explorer"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--headless",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
TIMEOUT_MS = 60_000
OUTSIDE: list[str] = []
"""Requests the page made to anywhere but the app (refused)."""


def _browser_or_skip():
    """Playwright's sync API, with Debian's Chromium. In CI a missing browser fails the test."""
    missing = []
    if not CHROMIUM.exists():
        missing.append(f"{CHROMIUM} (apt-get install chromium)")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        missing.append("the playwright package (pip install -e '.[test]')")
    if missing:
        message = "the explorer's browser test needs " + " and ".join(missing)
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return sync_playwright


@pytest.fixture(scope="module")
def run(labelled_run, tmp_path_factory):
    """The labelled test SAE (n=64, k=4, 240 Wikipedia texts) with its families."""
    folder = tmp_path_factory.mktemp("explore") / "sae"
    shutil.copytree(labelled_run, folder)
    assert main(["families", str(folder), "--permutations", "2", "--min-children", "2", "--min-out-degree", "2", "-q"]) == 0
    return folder


@pytest.fixture(scope="module")
def corpus(run, wiki_small):
    """Every corpus text with its code, from the public API (independent of the app)."""
    from datasets import load_from_disk

    texts = load_from_disk(str(wiki_small))["text"]
    sae = SparseAutoencoder.from_pretrained(run)
    codes = sae.encode_texts(texts)
    return sae, texts, codes


@pytest.fixture(scope="module")
def app(run):
    pytest.importorskip("gradio")
    from sbert_sae.explorer import build_app, launch
    from sbert_sae.explorer_data import Explorer

    explorer = Explorer.open(run)
    demo = build_app(explorer)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    _, url, _ = launch(demo, host="127.0.0.1", port=port, block=False, quiet=True)
    yield explorer, url
    demo.close()


@pytest.fixture(scope="module")
def page(app, tmp_path_factory):
    sync_playwright = _browser_or_skip()
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as p:
        context = p.chromium.launch_persistent_context(
            str(tmp_path_factory.mktemp("chromium-profile")),
            executable_path=str(CHROMIUM),
            args=CHROMIUM_ARGS,
            headless=True,
            viewport={"width": 1440, "height": 1000},
        )
        context.set_default_timeout(TIMEOUT_MS)
        # The app must work offline: any request for another host is refused and recorded.
        context.route(re.compile(r"^(?!(http://127\.0\.0\.1[:/]|data:|blob:)).*"), lambda route: (OUTSIDE.append(route.request.url), route.abort()))
        page = context.new_page()
        page.goto(app[1])
        page.wait_for_selector("#sae-tabs")
        yield page
        context.close()


def _best_labelled(sae: SparseAutoencoder, codes: torch.Tensor) -> int:
    """The labelled feature with the best held-out label score among those firing on 3+ texts."""
    firing = (codes > 0).sum(0)
    entries = sae.label_data["features"]
    candidates = [f for f, e in entries.items() if e.get("label") and firing[f] >= 3 and (e.get("score") or {}).get("auroc") is not None]
    return max(candidates, key=lambda f: (entries[f]["score"]["auroc"], -f))


def test_the_app_opens_without_encoding_the_corpus(run):
    """Opening reads the SAE and its files only; the corpus opens when asked for."""
    from sbert_sae.explorer_data import Explorer

    explorer = Explorer.open(run)
    assert explorer._corpus is None and explorer.corpus_status().state == "loading"
    assert explorer.feature(0)["feature"] == 0
    with pytest.raises(InputError, match="unknown feature 64"):
        explorer.feature(64)
    corpus = explorer.corpus()
    assert len(corpus) == 240 and corpus.activations(timeout=60) is not None


def _counting_embeddings(sae, monkeypatch) -> list[list[str]]:
    """The lists of texts `sae` is asked to embed from now on, in the order asked (embedded for real)."""
    asked: list[list[str]] = []
    embed = sae.embed_texts

    def counting(texts, **kwargs):
        asked.append(list(texts))
        return embed(texts, **kwargs)

    monkeypatch.setattr(sae, "embed_texts", counting)
    return asked


def test_finds_racing_the_label_search_made_ready_with_the_app_embed_the_labels_once(run, tmp_path, monkeypatch):
    """The first Find (Features or Search tab) embedded every label and the model's 1024
    reference words while its user waited: 3-17 s for 6144 labels on 2 CPU cores. The app now
    makes them ready in the background as it is built; Finds made meanwhile wait for that
    work instead of each doing it again, and find what a Find after it finds."""
    pytest.importorskip("gradio")
    from concurrent.futures import ThreadPoolExecutor

    from sbert_sae.explorer import build_app
    from sbert_sae.explorer_data import Explorer

    monkeypatch.setenv("SBERT_SAE_CACHE", str(tmp_path / "cache"))  # no vectors kept by other tests: all are embedded
    explorer = Explorer.open(run)
    finder = explorer.label_finder
    labels = [explorer.labels[f] for f in finder.labelled]
    asked = _counting_embeddings(explorer.sae, monkeypatch)
    demo = build_app(explorer)
    try:
        assert not finder.ready  # a thousand texts to embed: under way, not done
        with ThreadPoolExecutor(4) as pool:
            during = list(pool.map(explorer.search_features, ["music"] * 4))
        assert finder.wait_warm_up(timeout=300)
        after = explorer.search_features("music")
    finally:
        demo.close()
    assert during == [after] * 4 and after and after[0]["match"] in ("words", "close")
    many = [texts for texts in asked if len(texts) > 1]
    assert sum(texts == labels for texts in many) == 1 and len(many) == 2  # the labels, and the reference words, once each


def test_a_second_opening_of_the_sae_reads_its_label_search_from_the_cache(run, tmp_path, monkeypatch):
    """The labels' and reference words' vectors are kept in the cache: the explorer of the same
    SAE opened again makes its label search ready, as soon as its app is built, without
    embedding them (only the model is loaded and run once), and finds the same."""
    pytest.importorskip("gradio")
    from sbert_sae.explorer import build_app
    from sbert_sae.explorer_data import Explorer

    monkeypatch.setenv("SBERT_SAE_CACHE", str(tmp_path / "cache"))
    first = Explorer.open(run)
    expected = first.search_features("music")
    again = Explorer.open(run)
    asked = _counting_embeddings(again.sae, monkeypatch)
    build_app(again).close()
    assert again.label_finder.wait_warm_up(timeout=300)  # made ready by the app, before any Find
    assert all(len(texts) == 1 for texts in asked) and len(asked) == 1
    assert again.search_features("music") == expected
    assert asked[1:] == [["music"]]


def test_both_tabs_find_features_with_one_label_finder(run):
    """The Search tab's index over a dataset corpus had a label finder of its own, so its
    labels' vectors and cut-offs were made a second time, after the Features tab's."""
    from sbert_sae.explorer_data import Explorer

    explorer = Explorer.open(run)
    assert explorer.search_index().label_finder is explorer.label_finder


def test_strongest_texts_before_the_codes_are_ready_are_exact(run, corpus):
    """Before the corpus' codes are computed (minutes for millions of texts), a feature's
    strongest texts come from ranking the texts by its encoder row and encoding only the
    best candidates: the same texts and activations as from the codes."""
    from sbert_sae.explorer_data import Explorer

    sae, texts, codes = corpus
    explorer = Explorer.open(run)
    corpus_ = explorer.corpus()
    corpus_.activations(timeout=60)
    for f in range(sae.config.n_latents):
        positions, values = explorer._strongest_by_scan(corpus_, f, 5)
        want_positions, want_values = corpus_.firing(f)
        assert positions.tolist() == want_positions[:5].tolist(), f
        assert values.tolist() == pytest.approx(want_values[:5].tolist(), abs=1e-5), f


def test_feature_search_and_feature_page(page, corpus):
    from playwright.sync_api import expect

    sae, texts, codes = corpus
    f = _best_labelled(sae, codes)
    label = sae.feature_labels[f]
    word = max(label.split(", ")[0].split(), key=len)

    page.get_by_role("tab", name="Features").click()
    page.locator("#feature-query textarea").fill(word)
    page.locator("#feature-find").click()
    link = page.locator(f'#feature-results a.feat[data-feature="{f}"]')
    expect(link).to_contain_text(label)
    link.click()

    expect(page.locator("#feature-label")).to_have_text(label)
    # the strongest texts are the corpus' texts with the highest activation, in order
    column = codes[:, f]
    n_firing = int((column > 0).sum())
    expect(page.locator("#feature-histogram")).to_contain_text(f"fires on {n_firing} of {len(texts)} texts")
    shown = page.locator("#feature-top-texts .sae-text")
    expect(shown).to_have_count(min(10, n_firing))
    activation_of = {t: float(a) for t, a in zip(texts, column.tolist())}
    shown_acts = []
    for i in range(min(3, n_firing)):
        body = shown.nth(i).locator(".body").inner_text()
        act = float(shown.nth(i).locator(".meta").inner_text().split()[0])
        assert body in activation_of, body[:80]
        assert activation_of[body] == pytest.approx(act, abs=2e-3)
        shown_acts.append(act)
    assert shown_acts == sorted(shown_acts, reverse=True)
    assert shown_acts[0] == pytest.approx(float(column.max()), abs=2e-3)
    # the label's keywords are marked in the texts that contain them
    keywords = [k["keyword"].lower() for k in sae.describe(f)["keywords"][:12]]
    marks = [m.lower() for m in page.locator("#feature-top-texts mark.kw").all_inner_texts()]
    assert all(any(re.fullmatch(r"\s*".join(map(re.escape, k.split())), m) for k in keywords) for m in marks)

    # nearest by decoder cosine, as computed from W_dec
    directions = torch.nn.functional.normalize(sae.W_dec.detach(), dim=1)
    cos = directions @ directions[f]
    cos[f] = -2
    nearest = int(cos.argmax())
    first = page.locator("#feature-neighbours a.feat").first
    expect(first).to_have_attribute("data-feature", str(nearest))
    expect(page.locator("#feature-cooccurring table")).to_be_visible()
    page.screenshot(path=str(ARTIFACTS / "1-feature-page.png"), full_page=True)

    # a click on a neighbour opens its page
    first.click()
    expect(page.locator("#feature-header [data-current-feature]")).to_have_attribute("data-current-feature", str(nearest))
    nearest_label = sae.feature_labels[nearest] or ""
    if nearest_label:
        expect(page.locator("#feature-label")).to_have_text(nearest_label)


def test_text_inspection_shows_its_active_features(page, corpus):
    from playwright.sync_api import expect

    sae, texts, _ = corpus
    text = "The cell membrane separates the interior of a cell from its environment and controls what enters it."
    expected = sae.explain(text)
    assert expected

    page.get_by_role("tab", name="Texts").click()
    page.locator("#text-input textarea").fill(text)
    page.locator("#text-inspect").click()
    rows = page.locator("#text-features table.active-features tr:has(a.feat)")
    expect(rows).to_have_count(len(expected))
    for i, item in enumerate(expected):
        row = rows.nth(i)
        expect(row.locator("a.feat")).to_have_attribute("data-feature", str(item["feature"]))
        if item["label"]:
            expect(row).to_contain_text(item["label"])
        assert float(row.locator("td.num").inner_text()) == pytest.approx(item["activation"], abs=2e-3)
    with torch.no_grad():
        x = sae.prepare_input(sae.embed_texts([text]))
        x_hat = sae.decode_topk(*sae.encode_topk(x))
        cosine = float(torch.nn.functional.cosine_similarity(x, x_hat)[0])
    expect(page.locator("#text-summary")).to_contain_text(f"cos(x, x̂) {cosine:.3f}")
    page.screenshot(path=str(ARTIFACTS / "2-text-inspection.png"), full_page=True)

    # a feature of the text opens its page
    rows.first.locator("a.feat").click()
    expect(page.locator("#feature-header [data-current-feature]")).to_have_attribute("data-current-feature", str(expected[0]["feature"]))


def test_a_text_longer_than_the_base_model_reads_says_where_it_was_cut(app, corpus):
    """The base model reads the first 256 tokens of a text and drops the rest without a word:
    the Texts tab showed a pasted article whole, beside the features of its first paragraphs
    only. It now says how many tokens were embedded and greys the part the model did not read."""
    from gradio_client import Client

    explorer = app[0]
    sae, texts, _ = corpus
    long = " ".join(texts[:40])
    result = explorer.inspect(long)
    assert result.max_tokens == 254 < result.tokens and 0 < result.embedded_chars < len(long)
    # the model reads exactly that part: its embedding is the whole text's
    whole, head = sae.embed_texts([long, long[: result.embedded_chars]])
    assert torch.nn.functional.cosine_similarity(whole, head, dim=0) > 0.9999
    assert explorer.inspect(texts[0]).embedded_chars is None
    summary, _ = Client(app[1], verbose=False).predict(long, api_name="/inspect_text")
    assert f"embedded: its first <b>254</b> of {result.tokens:,} tokens" in summary and 'class="sae-unread"' in summary
    short, _ = Client(app[1], verbose=False).predict(texts[0], api_name="/inspect_text")
    assert "sae-unread" not in short and "embedded: its first" not in short


def test_steered_search_changes_the_results(page, run, corpus):
    from playwright.sync_api import expect

    from sbert_sae.search import SteerableIndex

    sae, texts, _ = corpus
    index = SteerableIndex.from_run(run)
    query = "a painting in a museum"
    plain = index.search(query, k=10)
    # steer toward a feature found by its label, as a user would: the first match of a word
    target = next(f for f, label in enumerate(sae.feature_labels) if label and f not in {q for q, _, _ in index.query_features(query)})
    word = max(sae.feature_labels[target].split(", ")[0].split(), key=len)
    chosen = index.features_about(word, top=1)[0]
    steered = index.search(query, up={chosen.feature: 2.0}, k=10)
    assert steered.rows() != plain.rows()

    page.get_by_role("tab", name="Search").click()
    page.locator("#search-query textarea").fill(query)
    page.locator("#search-go").click()
    before = page.locator("#search-before .sae-hit")
    expect(before).to_have_count(10)
    assert [int(r) for r in before.evaluate_all("els => els.map(e => e.dataset.row)")] == plain.rows()
    query_sliders = page.locator(".steer-slider:visible")
    expect(query_sliders).to_have_count(len(index.query_features(query)))

    page.locator("#steer-about textarea").fill(word)
    page.locator("#steer-find").click()
    expect(page.locator("#steer-choice input")).to_have_value(f"#{chosen.feature} {chosen.label} · word match, cos {chosen.score:.2f}")
    page.locator("#steer-add").click()
    slider = page.locator(".steer-slider", has_text=f"#{chosen.feature} ")
    expect(slider).to_be_visible()
    number = slider.locator('input[type="number"]')
    number.fill("2")
    number.press("Enter")
    page.locator("#steer-apply").click()
    expect(page.locator("#steer-outcome")).to_contain_text(f"cos(steered query, query) = {steered.cosine:.3f}")
    after = page.locator("#search-after .sae-hit")
    expect(after).to_have_count(10)
    shown = [int(r) for r in after.evaluate_all("els => els.map(e => e.dataset.row)")]
    assert shown == steered.rows() and shown != plain.rows()
    new = sum(r not in plain.rows() for r in shown)
    expect(page.locator("#steer-outcome")).to_contain_text(f"{new} of 10 results are new")
    expect(page.locator("#search-after .sae-hit .new")).to_have_count(new)
    page.screenshot(path=str(ARTIFACTS / "3-steered-search.png"), full_page=True)


def test_a_label_query_no_label_matches_says_so(page, run):
    """Nonsense typed to find a feature by its label: the app says no label matches and picks
    none; the nearest labels are offered as weak matches, each with its cosine (it listed
    the nearest labels as matches and picked the first)."""
    from playwright.sync_api import expect

    from sbert_sae.search import SteerableIndex

    nearest = SteerableIndex.from_run(run).features_about("qwzxv", top=5)
    page.get_by_role("tab", name="Search").click()
    page.locator("#steer-about textarea").fill("qwzxv")
    page.locator("#steer-find").click()
    choice = page.locator("#steer-choice")
    expect(choice).to_contain_text("No feature label matches “qwzxv”: the nearest")
    expect(choice.locator("input")).to_have_value("")
    choice.locator("input").click()
    options = page.locator("[role=option]")
    expect(options).to_have_count(5)
    assert options.all_inner_texts() == [f"#{m.feature} {m.label} · {m.strength}, cos {m.score:.2f}" for m in nearest]
    assert all(m.strength == "weak" for m in nearest)
    page.screenshot(path=str(ARTIFACTS / "3b-no-label-matches.png"), full_page=True)
    page.keyboard.press("Escape")
    # A word of a label: the dropdown says so again, and picks the best match.
    word = max(next(label for label in SparseAutoencoder.from_pretrained(run).feature_labels if label).split(), key=len).strip(",")
    page.locator("#steer-about textarea").fill(word)
    page.locator("#steer-find").click()
    expect(choice).to_contain_text("Features whose label matches")
    expect(choice.locator("input")).not_to_have_value("")


def test_features_find_matches_by_meaning_and_says_when_none_does(page, run):
    """The Features tab's Find matched text only: a word that no label or keyword holds
    ('paintings' for the feature 'painting') found nothing, and nonsense said 'No feature's
    label or keywords contain' and offered nothing. It now finds as the Search tab does:
    labels holding the words, then labels close or near in meaning, each row with its
    strength and cosine; with no match, it says so and lists the nearest five, weak."""
    from playwright.sync_api import expect

    from sbert_sae.search import LabelFinder

    finder = LabelFinder(SparseAutoencoder.from_pretrained(run))
    word, best = next((w, m) for w in ("paintings", "poems", "movie", "statistics", "mammals") if (m := finder.find(w, top=1)[0]).strength == "close")
    page.get_by_role("tab", name="Features").click()
    page.locator("#feature-query textarea").fill(word)
    page.locator("#feature-find").click()
    links = page.locator("#feature-results a.feat")
    expect(links.first).to_have_attribute("data-feature", str(best.feature))
    matches = [m for m in finder.find(word, top=100) if m.strength != "weak"]
    expect(links).to_have_count(len(matches))
    assert [int(f) for f in links.evaluate_all("els => els.map(e => e.dataset.feature)")] == [m.feature for m in matches]
    strengths = page.locator("#feature-results .sae-match")
    assert strengths.all_inner_texts() == [f"{'word match' if m.strength == 'words' else m.strength}, cos {m.score:.2f}" for m in matches]
    page.screenshot(path=str(ARTIFACTS / "1b-features-find-by-meaning.png"), full_page=True)

    page.locator("#feature-query textarea").fill("qwzxv")
    page.locator("#feature-find").click()
    expect(page.locator("#feature-results .sae-note")).to_contain_text("No feature label matches “qwzxv”: the nearest (all weak)")
    nearest = finder.find("qwzxv", top=5)
    expect(links).to_have_count(5)
    assert [int(f) for f in links.evaluate_all("els => els.map(e => e.dataset.feature)")] == [m.feature for m in nearest]
    assert strengths.all_inner_texts() == [f"weak, cos {m.score:.2f}" for m in nearest]
    page.screenshot(path=str(ARTIFACTS / "1c-features-find-no-match.png"), full_page=True)


def test_overview_shows_metrics_and_families(page, run, corpus):
    from playwright.sync_api import expect

    sae, _, _ = corpus
    page.get_by_role("tab", name="Overview").click()
    metrics = page.locator("#overview-metrics table.metrics")
    expect(metrics).to_contain_text("heldout_fvu")
    expect(metrics).to_contain_text(f"{sae.metrics['heldout_fvu']:,.4f}")
    families = sae.feature_families()
    table = page.locator("#overview-families")
    if families:
        expect(table.locator("table.families tr:has(a.feat)")).to_have_count(len(families))
        expect(table).to_contain_text(families[0].label or "")
    else:
        expect(table).to_contain_text("no families")
    expect(page.locator("#overview-density img")).to_be_visible()
    # nothing is drawn over the plot (Gradio's floating label hid the density plot's title)
    for plot in ("#overview-density",):
        image = page.locator(f"{plot} img").bounding_box()
        for label in page.locator(f"{plot} label").all():
            box = label.bounding_box()
            if box:
                assert box["y"] + box["height"] <= image["y"] or box["y"] >= image["y"] + image["height"], f"{plot}: {label.inner_text()!r} covers the plot"
    page.screenshot(path=str(ARTIFACTS / "4-overview.png"), full_page=True)


def test_the_family_tree_reads_at_the_pages_text_size(page, run):
    """The overview's family tree is drawn in the page, its text as large as the page's, each
    member a link (it was family_graph.png scaled down to the column: 2625 px wide in 480,
    its labels 2-3 px high until enlarged)."""
    from playwright.sync_api import expect

    from sbert_sae.families import family_tree, pick_family

    sae = SparseAutoencoder.from_pretrained(run)
    family = pick_family(sae.feature_families())
    assert family is not None, "the test SAE has no families: the tree cannot be checked"
    _, weight = family_tree(family)
    shown = [family.parent, *weight]
    page.get_by_role("tab", name="Overview").click()
    tree = page.locator("#overview-family-tree")
    expect(tree.locator("svg")).to_be_visible()
    members = tree.locator("svg [data-feature]")
    expect(members).to_have_count(len(shown))
    assert sorted(int(f) for f in members.evaluate_all("els => els.map(e => e.dataset.feature)")) == sorted(shown)
    for f in shown:
        expect(tree.locator(f'svg [data-feature="{f}"] text')).to_contain_text(f"#{f} {sae.feature_labels[f] or ''}".strip())
    # As read on the page: every label's glyphs at least 12 px high, the tree no wider than its column.
    heights = tree.locator("svg text").evaluate_all("els => els.map(e => e.getBoundingClientRect().height)")
    assert min(heights) >= 12, heights
    assert tree.locator("svg").bounding_box()["width"] <= tree.bounding_box()["width"]
    tree.screenshot(path=str(ARTIFACTS / "4b-family-tree.png"))
    # a member is a link to its page
    child = shown[-1]
    tree.locator(f'svg [data-feature="{child}"]').click()
    expect(page.locator("#feature-header [data-current-feature]")).to_have_attribute("data-current-feature", str(child))


def test_a_link_opens_a_feature_page_directly(page, app, corpus):
    from playwright.sync_api import expect

    sae, _, codes = corpus
    f = _best_labelled(sae, codes)
    page.goto(f"{app[1]}?feature={f}")
    expect(page.locator("#feature-header [data-current-feature]")).to_have_attribute("data-current-feature", str(f))
    expect(page.locator("#feature-label")).to_have_text(sae.feature_labels[f])
    # a link to a feature that is not there says so (it showed the blank start page)
    page.goto(f"{app[1]}?feature=64")
    expect(page.locator("#feature-header")).to_contain_text("?feature=64: unknown feature 64: features are numbered 0..63")
    # and one of thousands of digits (a paste gone wrong) in a line, not the whole number twice over
    page.goto(f"{app[1]}?feature={'9' * 5000}")
    nines = "9" * 24
    expect(page.locator("#feature-header")).to_have_text(f"No such feature?feature={nines}…: unknown feature {nines}…: features are numbered 0..63")


def test_a_script_calls_the_apps_named_endpoints(app, corpus):
    """A script drives the explorer with gradio_client: Gradio named its 31 endpoints after
    their functions (/on_link_3, /feature_corpus_figures_7, /start_1, ...), link clicks among
    them that a script cannot make, and none opened a feature by its id. Now it has the named
    endpoints of API_ENDPOINTS, each in the README, and /feature opens a feature's page."""
    from gradio_client import Client
    from gradio_client.exceptions import AppError

    from sbert_sae.explorer import API_ENDPOINTS

    sae, texts, codes = corpus
    client = Client(app[1], verbose=False)
    api = client.view_api(print_info=False, return_format="dict")
    assert sorted(api["named_endpoints"]) == sorted(f"/{name}" for name in API_ENDPOINTS) and not api["unnamed_endpoints"]
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = readme.split("## Exploring an SAE")[1].split("\n## ")[0]
    assert [name for name in API_ENDPOINTS if f"`/{name}`" not in section] == []

    f = _best_labelled(sae, codes)
    page = client.predict(f, api_name="/feature")
    assert page["feature"] == f and page["label"] == sae.feature_labels[f]
    assert f'data-current-feature="{f}"' in page["header"]
    assert [f"· row {i}</div>" in page["top_texts"] for i in codes[:, f].topk(3).indices.tolist()] == [True] * 3
    assert f"fires on {int((codes[:, f] > 0).sum())} of {len(texts)} texts" in page["histogram"]
    for bad in (-1, 64, 10**9):
        with pytest.raises(AppError, match=rf"unknown feature {bad}: features are numbered 0\.\.63"):
            client.predict(bad, api_name="/feature")
    word = max(sae.feature_labels[f].split(", ")[0].split(), key=len)
    assert f'data-feature="{f}"' in client.predict(word, api_name="/find_features")
    summary, active = client.predict(texts[0], api_name="/inspect_text")
    assert f'data-feature="{int(codes[0].argmax())}"' in active


def test_a_script_reads_a_features_page_as_data(app, corpus):
    """/feature returned the page's HTML: a script wanting a feature's label, scores, strongest
    texts or neighbours had to parse it. /feature_data gives them as JSON, the same figures as
    the Explorer's methods and the corpus' own codes; a bad id is refused as /feature does."""
    from gradio_client import Client
    from gradio_client.exceptions import AppError

    explorer, url = app
    sae, texts, codes = corpus
    client = Client(url, verbose=False)
    f = _best_labelled(sae, codes)
    data = client.predict(f, 3, api_name="/feature_data")
    card = explorer.feature(f)
    assert (data["feature"], data["label"], data["status"]) == (f, sae.feature_labels[f], "labelled")
    assert data["keywords"] == card["keywords"] and data["keywords"][0]["keyword"]
    assert data["score"]["auroc"] == sae.label_data["features"][f]["score"]["auroc"]
    assert data["density"] == explorer.density(f) and data["density_of"]["texts"] in ("labelling", "training")
    firing = codes[:, f]
    strongest = firing.topk(3)
    assert [t["row"] for t in data["top_texts"]] == strongest.indices.tolist()
    assert [t["text"] for t in data["top_texts"]] == [texts[i] for i in strongest.indices.tolist()]
    assert [t["activation"] for t in data["top_texts"]] == pytest.approx(strongest.values.tolist(), rel=1e-4)
    hist = data["activations"]
    assert (hist["n_firing"], hist["n_texts"], sum(hist["counts"])) == (int((firing > 0).sum()), len(texts), int((firing > 0).sum()))
    assert len(hist["edges"]) == len(hist["counts"]) + 1
    assert data["neighbours"] == explorer.neighbours(f, 3) and len(data["neighbours"]) == 3
    together = ((codes > 0) & (firing > 0)[:, None]).sum(0)
    together[f] = 0
    assert [r["together"] for r in data["cooccurring"]] == sorted(together.tolist(), reverse=True)[: len(data["cooccurring"])]
    assert data["cooccurring"][0]["feature"] == int(together.argmax())
    assert [fam["parent"] for fam in data["families"]] == [fam.parent for fam in explorer.families_of(f)]
    assert data["corpus"]["state"] == "ready" and data["corpus"]["n_texts"] == len(texts)
    assert len(client.predict(f, api_name="/feature_data")["top_texts"]) == min(10, int((firing > 0).sum()))
    for bad in (-1, 64, 10**9):
        with pytest.raises(AppError, match=rf"unknown feature {bad}: features are numbered 0\.\.63"):
            client.predict(bad, api_name="/feature_data")
    with pytest.raises(AppError, match=r"top must be a positive whole number, got 0"):
        client.predict(f, 0, api_name="/feature_data")


def test_a_script_reads_a_search_as_data(app, corpus):
    """/search and /search_steered returned HTML, and steering needed the page's session.
    /search_data gives the query's features and each hit's row, cosine, text and firing
    features as JSON, the same as the index's search and the corpus' codes, steered by ids."""
    from gradio_client import Client
    from gradio_client.exceptions import AppError

    explorer, url = app
    sae, texts, codes = corpus
    client = Client(url, verbose=False)
    query = "the derivative of a function"
    data = client.predict(query, 5, api_name="/search_data")
    index = explorer.search_index()
    plain = index.search(query, k=5)
    assert [h["row"] for h in data["hits"]] == plain.rows() and [h["text"] for h in data["hits"]] == [texts[r] for r in plain.rows()]
    assert [h["score"] for h in data["hits"]] == pytest.approx([h.score for h in plain.hits], abs=1e-5)
    for hit in data["hits"]:
        code = codes[hit["row"]]
        assert [r["feature"] for r in hit["features"]] == code.nonzero()[:, 0][code[code > 0].argsort(descending=True)].tolist()
        assert [r["activation"] for r in hit["features"]] == pytest.approx(sorted(code[code > 0].tolist(), reverse=True), rel=1e-4)
    own = sae.encode_texts([query])[0]
    assert [r["feature"] for r in data["query_features"]] == own.nonzero()[:, 0][own[own > 0].argsort(descending=True)].tolist()
    second = data["query_features"][1]["feature"]
    steered = client.predict(query, 5, {str(second): 1.0}, api_name="/search_data")
    assert [h["row"] for h in steered["hits"]] == index.search(query, up={second: 1.0}, k=5).rows()
    assert steered["steer"] == {str(second): 1.0} and steered["cosine"] < 1
    for reason, args in {
        "the query is empty": (" ", 5),
        r"unknown feature 64: features are numbered 0\.\.63": (query, 5, {"64": 1.0}),
        "k must be a positive whole number, got 0": (query, 0),
        "method must be one of": (query, 5, {str(second): 1.0}, "push"),
    }.items():
        with pytest.raises(AppError, match=reason):
            client.predict(*args, api_name="/search_data")


def test_a_script_reads_a_texts_inspection_as_data(app, corpus):
    """/inspect_text returned the Texts tab's HTML: a script wanting a text's features, its
    reconstruction figures or how much of it the base model read had to parse it.
    /inspect_text_data gives them as JSON, the same as the SAE's own codes and Explorer.inspect;
    an empty text is refused as /inspect_text refuses it."""
    from gradio_client import Client
    from gradio_client.exceptions import AppError

    explorer, url = app
    sae, texts, codes = corpus
    client = Client(url, verbose=False)
    data = client.predict(texts[0], api_name="/inspect_text_data")
    code = codes[0]
    assert [r["feature"] for r in data["features"]] == code.nonzero()[:, 0][code[code > 0].argsort(descending=True)].tolist()
    assert [r["activation"] for r in data["features"]] == pytest.approx(sorted(code[code > 0].tolist(), reverse=True), rel=1e-4, abs=1e-6)
    assert [r["label"] for r in data["features"]] == [explorer.display_label(r["feature"]) for r in data["features"]]
    result = explorer.inspect(texts[0])
    assert data["cosine"] == pytest.approx(result.cosine) and data["relative_error"] == pytest.approx(result.relative_error)
    assert (data["l0"], data["k"], data["text"]) == (len(data["features"]), 4, texts[0])
    assert data["heldout_cosine"] == sae.metrics["heldout_cosine"]
    assert (data["tokens_read"], data["tokens"], data["truncated"], data["embedded_chars"]) == (result.tokens, result.tokens, False, None)
    long = " ".join(texts[:40])
    cut = client.predict(long, api_name="/inspect_text_data")
    result = explorer.inspect(long)
    assert (cut["tokens_read"], cut["max_tokens"], cut["tokens"], cut["truncated"]) == (254, 254, result.tokens, True) and result.tokens > 254
    assert cut["embedded_chars"] == result.embedded_chars < len(long)
    for empty in ("", "   "):
        with pytest.raises(AppError, match=r"the text is empty: type or paste a text to inspect"):
            client.predict(empty, api_name="/inspect_text_data")


def test_the_search_tabs_endpoints_refuse_what_they_cannot_do_with_a_reason(app):
    """An empty query, an empty Find, no feature picked, a steered search before any search or
    with every slider at 0: the Search tab warned and changed nothing, which a script calling
    its endpoints received as a silent, empty answer. Each now raises an error saying why."""
    from gradio_client import Client
    from gradio_client.exceptions import AppError

    from sbert_sae.explorer import MAX_STEERED

    client = Client(app[1], verbose=False)
    zeros = [0] * MAX_STEERED
    refused = {
        "The query is empty": ("/search", " ", 10),
        "Type a word of the feature's label, or its id": ("/find_steering_feature", ""),
        "Find a feature by its label first": ("/add_steering_slider", None, *zeros),
        "No sliders yet: search first": ("/search_steered", "mathematics", 10, "add", 1.0, *zeros[1:]),
    }
    for reason, (endpoint, *args) in refused.items():
        with pytest.raises(AppError, match=reason):
            client.predict(*args, api_name=endpoint)
    sliders = client.predict("mathematics", 10, api_name="/search")[:MAX_STEERED]
    assert sliders[0]["visible"]
    with pytest.raises(AppError, match="Every slider is at 0"):
        client.predict("mathematics", 10, "add", *zeros, api_name="/search_steered")
    with pytest.raises(AppError, match="The query is empty"):
        client.predict("", 10, "add", 1.0, *zeros[1:], api_name="/search_steered")
    summary, _, steered = client.predict("mathematics", 10, "add", 1.0, *zeros[1:], api_name="/search_steered")
    assert "steer-outcome" in summary and "Steered" in steered


def test_a_negative_feature_id_is_no_feature_not_words(app):
    """'-1' in the Features tab's Find was read as words of a label: 'No feature label matches
    “-1”', the labels nearest in meaning (zero, negative) offered; the Search tab's Find did the
    same. Both now say that there is no feature -1, as they do for 64."""
    from gradio_client import Client
    from gradio_client.exceptions import AppError

    client = Client(app[1], verbose=False)
    for query in ("-1", "#-1", "64"):
        found = client.predict(query, api_name="/find_features")
        assert f"There is no feature {query.lstrip('#')}: features are numbered 0 to 63." in found and "data-feature" not in found
        with pytest.raises(AppError, match=rf"unknown feature {query.lstrip('#')}: features are numbered 0\.\.63"):
            client.predict(f" {query} ", api_name="/find_steering_feature")
    assert 'data-feature="5"' in client.predict("+5", api_name="/find_features")


def test_a_feature_id_of_thousands_of_digits_is_no_feature(app):
    """An id of 5000 digits (a paste gone wrong): int() refuses more than 4300 digits, so both
    Finds (and ?feature=) failed with an unexplained error. They now say that there is no such
    feature, the number cut short; a long query no label matches is echoed cut short too."""
    from gradio_client import Client
    from gradio_client.exceptions import AppError

    explorer, url = app
    client = Client(url, verbose=False)
    huge = "9" * 5000
    assert f"There is no feature {'9' * 24}…: features are numbered 0 to 63." in client.predict(huge, api_name="/find_features")
    with pytest.raises(AppError, match=r"unknown feature 9{24}…: features are numbered 0\.\.63"):
        client.predict(huge, api_name="/find_steering_feature")
    with pytest.raises(InputError, match=r"unknown feature 9{24}…"):
        explorer.check_feature(f" #{huge} ")
    nonsense = "zq" * 2000
    found = client.predict(nonsense, api_name="/find_features")
    assert f"No feature label matches “{nonsense[:60]}…”" in found and nonsense[:61] not in found


def test_a_script_sets_a_steering_slider_by_its_name(app):
    """/search_steered and /add_steering_slider listed the sliders as param_4 .. param_19 (their
    function's *values): a script could not tell which slider it set. They are slider_1 ..
    slider_16, in the order /search gives the query's features."""
    from gradio_client import Client

    from sbert_sae.explorer import MAX_STEERED

    client = Client(app[1], verbose=False)
    api = client.view_api(print_info=False, return_format="dict")["named_endpoints"]
    sliders = [f"slider_{i}" for i in range(1, MAX_STEERED + 1)]
    assert [p["parameter_name"] for p in api["/search_steered"]["parameters"]] == ["query", "k", "method", *sliders]
    assert [p["parameter_name"] for p in api["/add_steering_slider"]["parameters"]] == ["choice", *sliders]
    shown = client.predict("the derivative of a function", 10, api_name="/search")
    second = shown[1]["label"].split()[0].lstrip("#")
    summary, _, _ = client.predict("the derivative of a function", 10, "add", slider_2=1.0, api_name="/search_steered")
    assert re.findall(r'data-feature="(\d+)"', summary) == [second]


def test_a_feature_page_shows_while_the_corpus_is_still_being_embedded(page, run, corpus, wiki_small, tmp_path):
    """The first start on a corpus embeds it (minutes for a large one): a feature's page, clicked
    or linked, waited for that with nothing shown, because its strongest texts were found
    before anything was sent. Now its page shows at once (the texts stored with its labels),
    and the corpus' strongest texts follow once it is open. Here another process holds the
    embedding cache's lock, as a second run embedding the same corpus would."""
    import subprocess
    import sys

    from datasets import load_from_disk
    from playwright.sync_api import expect

    from sbert_sae.embeddings import cache_path
    from sbert_sae.explorer import build_app, launch
    from sbert_sae.explorer_data import Explorer

    sae, texts, codes = corpus
    f = _best_labelled(sae, codes)
    cache = tmp_path / "cache"
    folder = cache_path(load_from_disk(str(wiki_small)), cache_dir=cache)
    lock = folder.parent.parent / "locks" / f"{folder.name}.lock"
    lock.parent.mkdir(parents=True)
    holder = subprocess.Popen(
        [sys.executable, "-c", f"import sys, filelock; lock = filelock.FileLock({str(lock)!r}); lock.acquire(); print('held', flush=True); sys.stdin.read()"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    demo = None
    try:
        assert holder.stdout.readline().strip() == "held"
        explorer = Explorer.open(run, cache_dir=str(cache))
        explorer.start_corpus()
        demo = build_app(explorer)
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        _, url, _ = launch(demo, host="127.0.0.1", port=port, block=False, quiet=True)
        page.goto(f"{url}?feature={f}")
        expect(page.locator("#feature-label")).to_have_text(sae.feature_labels[f])
        assert explorer.corpus_opening
        expect(page.locator("#feature-top-texts")).to_contain_text("opening the corpus")
        holder.stdin.close()  # the other process is done: the corpus is embedded and opens
        holder.wait(timeout=60)
        column = codes[:, f]
        strongest = texts[int(column.argmax())]
        expect(page.locator("#feature-top-texts .sae-text .meta").first).to_contain_text(f"{float(column.max()):.3f}", timeout=TIMEOUT_MS)
        expect(page.locator("#feature-top-texts .sae-text .body").first).to_have_text(strongest)
        expect(page.locator("#feature-histogram")).to_contain_text(f"fires on {int((column > 0).sum())} of {len(texts)} texts")
    finally:
        if holder.poll() is None:
            holder.kill()
        if demo is not None:
            demo.close()


def test_the_page_requests_nothing_from_outside(page):
    """Every page above loaded fonts, scripts and data from the app alone."""
    assert OUTSIDE == []


# ------------------------------------------------------------ without a browser
def test_an_unlabelled_sae_opens_and_says_so(run, tmp_path):
    gr = pytest.importorskip("gradio")
    from sbert_sae.explorer import Pages, Steering, build_app
    from sbert_sae.explorer_data import NOT_LABELLED, Explorer

    folder = tmp_path / "unlabelled"
    shutil.copytree(run, folder)
    (folder / "feature_labels.json").unlink()
    (folder / "families.json").unlink()
    explorer = Explorer.open(folder)
    assert not explorer.labelled and explorer.feature(3)["status"] == NOT_LABELLED
    pages = Pages(explorer)
    assert "not labelled" in pages.search_results("") and "not labelled" in pages.feature_header(3)
    assert [r["feature"] for r in explorer.search_features("#3")] == [3]
    # an id out of range is named as such, not taken for a label word ("not labelled")
    assert "There is no feature 64: features are numbered 0 to 63." in pages.search_results("64")
    assert "There is no feature -1" in pages.search_results("-1")
    assert "sbert-sae families" in pages.family(3)
    # the Search tab steers by a feature given by its id (without labels, the only way)
    steering = Steering(explorer)
    assert steering.find_features("#3").choices == [("#3 (not labelled)", 3)]
    with pytest.raises(gr.Error, match="unknown feature 64"):
        steering.find_features("64")
    # its share is over the training texts, and says so (the histogram's is over the corpus)
    import json

    density = json.loads((folder / "feature_density.json").read_text())
    assert f"({density['fire_counts'][3]:,} of {density['n_texts']:,} training texts)" in pages.feature_header(3)
    build_app(explorer).close()
    with pytest.raises(Exception, match="missing"):
        Explorer.open(tmp_path / "missing")


def test_an_sae_whose_recorded_dataset_is_no_path_or_id_opens_without_a_corpus(labelled_run, tmp_path):
    # A training_args.json naming its dataset as null (hand-made, another tool's) opened with
    # no corpus, saying so; since DataArguments refuses such a dataset, Explorer.open failed
    # with "dataset must be a Hub dataset id, ... got NoneType".
    import json

    from sbert_sae.explorer_data import Explorer

    folder = tmp_path / "sae"
    shutil.copytree(labelled_run, folder)
    args = json.loads((folder / "training_args.json").read_text())
    args["data"]["dataset"] = None
    (folder / "training_args.json").write_text(json.dumps(args))
    status = Explorer.open(folder).corpus_status()
    assert status.state == "none" and "names no dataset that can be opened here" in status.message


def test_the_activation_histogram_spans_the_activations(run, wiki_small, tmp_path):
    """A feature firing on one text (or always with one value) had its histogram drawn from
    value - 0.5 to value + 0.5 (numpy's default for a single value): an axis starting at a
    negative activation. The axis now runs from 0 to the value. Over a corpus of one text,
    every feature that fires has one value."""
    from datasets import load_from_disk

    from sbert_sae.explorer_data import Explorer

    one = tmp_path / "one"
    load_from_disk(str(wiki_small)).select([0]).save_to_disk(str(one))
    explorer = Explorer.open(run, dataset=str(one), cache_dir=str(tmp_path / "cache"))
    firing = [f for f in range(explorer.n) if explorer.activation_histogram(f)["n_firing"]]
    assert firing
    for f in firing:
        hist = explorer.activation_histogram(f)
        assert hist["edges"][0] == 0 and hist["edges"][-1] == pytest.approx(float(hist["values"][0])), f
        assert hist["counts"].sum() == 1


def test_a_rare_features_share_reads_as_a_percentage():
    """A feature firing on 1 text of 10,033 was shown as 'fires on 1.0e-04', a fraction among
    percentages; it reads '0.01%' now."""
    pytest.importorskip("gradio")
    from sbert_sae.explorer import _pct

    assert [_pct(v) for v in (1 / 10033, 3e-5, 1e-7, 0.0042, 0.0)] == ["0.01%", "0.003%", "0.00001%", "0.42%", "0%"]


def test_explorer_of_a_hub_repo_reads_its_published_activations(hub, run, wiki_small, corpus, tmp_path):
    """An SAE trained on another machine (its training dataset is not here), published with
    its activations: the explorer shows texts and codes from the activations dataset, and
    searches it once embedded."""
    import json

    from sbert_sae.explorer_data import Explorer

    sae, texts, codes = corpus
    folder = tmp_path / "elsewhere"
    shutil.copytree(run, folder)
    args = json.loads((folder / "training_args.json").read_text())
    args["data"]["dataset"] = "/home/someone/data/wiki"
    (folder / "training_args.json").write_text(json.dumps(args))
    assert main(["push", str(folder), "org/explore-sae", "--activations", "--dataset", str(wiki_small), "-q"]) == 0

    explorer = Explorer.open("org/explore-sae")
    assert explorer.labels == sae.feature_labels
    corpus = explorer.corpus()
    assert corpus.name == "org/explore-sae-activations" and corpus.embeddings is None and len(corpus) == len(texts)
    f = _best_labelled(sae, codes)
    top = explorer.top_texts(f, 3)
    expected = codes[:, f].topk(3)
    assert [t.text for t in top] == [texts[i] for i in expected.indices.tolist()]
    assert [t.activation for t in top] == pytest.approx(expected.values.tolist(), abs=1e-4)
    assert explorer.activation_histogram(f)["n_firing"] == int((codes[:, f] > 0).sum())
    hits = explorer.search_index().search(texts[0], k=3).hits
    assert hits[0].text == texts[0]


def test_the_space_app_serves_the_sae_named_by_its_variable(run, monkeypatch):
    gr = pytest.importorskip("gradio")
    import runpy

    space = Path(__file__).resolve().parents[1] / "hub" / "space"
    monkeypatch.setenv("SBERT_SAE_REPO", str(run))
    app = runpy.run_path(str(space / "app.py"), run_name="space")  # not __main__: built, not served
    assert isinstance(app["demo"], gr.Blocks) and app["explorer"].source == str(run)
    assert app["explorer"].label_finder.wait_warm_up(timeout=300)  # its label search made ready before a visitor's first Find
    app["demo"].close()
    metadata = (space / "README.md").read_text().split("---")[1]
    sdk_version = re.search(r"^sdk_version: (\S+)$", metadata, re.M).group(1)
    assert f"gradio=={sdk_version}" in (space / "requirements.txt").read_text().splitlines()
    assert re.search(r"^app_file: app\.py$", metadata, re.M) and re.search(r"^sdk: gradio$", metadata, re.M)


def test_the_space_app_of_a_pushed_sae_whose_corpus_is_not_there_names_its_variable(hub, run, tmp_path, monkeypatch):
    """The Space serves an SAE from the Hub with only the files a push publishes. Pushed without
    its activations, trained on a folder of another machine, it has no corpus: the page's
    corpus line and the Search tab said '(pass --dataset)', an option a Space has not. They now
    name the Space variable SBERT_SAE_DATASET."""
    import json
    import runpy

    from sbert_sae import DatasetError

    pytest.importorskip("gradio")  # the Space's app builds its page with gradio
    folder = tmp_path / "elsewhere"
    shutil.copytree(run, folder)
    args = json.loads((folder / "training_args.json").read_text())
    args["data"]["dataset"] = "/home/someone/data/wiki"
    (folder / "training_args.json").write_text(json.dumps(args))
    assert main(["push", str(folder), "org/space-sae", "-q"]) == 0
    monkeypatch.setenv("SBERT_SAE_REPO", "org/space-sae")
    monkeypatch.delenv("SBERT_SAE_DATASET", raising=False)

    app = runpy.run_path(str(Path(__file__).resolve().parents[1] / "hub" / "space" / "app.py"), run_name="space")
    explorer = app["explorer"]
    assert explorer.corpus() is None
    status = explorer.corpus_status()
    assert status.state == "none" and "SBERT_SAE_DATASET" in status.message and "--dataset" not in status.message
    with pytest.raises(DatasetError, match="SBERT_SAE_DATASET"):
        explorer.search_index()
    app["demo"].close()


def test_the_space_app_says_which_variable_to_set_when_its_sae_cannot_be_opened(hub, tmp_path, monkeypatch):
    """The Space's default SAE (the short name minilm-wiki-6k) is not released yet: app.py
    stopped at import with a ModelLoadError traceback, so the published Space could not start.
    It now serves a page that names the SAE, the error and the variable to set."""
    gr = pytest.importorskip("gradio")
    import runpy

    space = Path(__file__).resolve().parents[1] / "hub" / "space"
    monkeypatch.delenv("SBERT_SAE_REPO", raising=False)
    registry = tmp_path / "registry.yaml"
    registry.write_text("saes: {}\n")  # nothing released
    monkeypatch.setenv("SBERT_SAE_REGISTRY", str(registry))
    app = runpy.run_path(str(space / "app.py"), run_name="space")
    assert app["explorer"] is None and isinstance(app["demo"], gr.Blocks)
    text = " ".join(block.value for block in app["demo"].blocks.values() if isinstance(block, gr.Markdown))
    assert "`minilm-wiki-6k`" in text and "SBERT_SAE_REPO" in text and "no released SAE's short name" in text
    app["demo"].close()


def test_search_hits_of_a_hub_repo_name_the_texts_dataset_rows(hub, run, wiki_small, tmp_path):
    """Published activations hold one row per embedded text with its dataset row as `id`: where
    the corpus had rows without text, the Search tab named hits by their position in the
    activations dataset (row 7 for the text of dataset row 9) while feature pages named them by `id`."""
    from datasets import Dataset, load_from_disk

    from sbert_sae.explorer_data import Explorer

    rows = load_from_disk(str(wiki_small)).select(range(60)).to_list()
    for at in (0, 5, 5):
        rows.insert(at, {**rows[at], "text": ""})  # skipped when embedded
    gappy = tmp_path / "gappy"
    Dataset.from_list(rows).save_to_disk(str(gappy))
    assert main(["push", str(run), "org/explore-gappy", "--activations", "--dataset", str(gappy), "-q"]) == 0

    explorer = Explorer.open("org/explore-gappy")
    corpus = explorer.corpus()
    assert len(corpus) == 60 and list(corpus.row_ids[:6]) == [1, 2, 3, 4, 7, 8]
    for row in (1, 7, 40):
        hit = explorer.search_index().search(rows[row]["text"], k=1).hits[0]
        assert hit.text == rows[row]["text"] and hit.row == row
    f = next(f for f in range(explorer.n) if len(explorer.top_texts(f, 1)))
    top = explorer.top_texts(f, 1)[0]
    assert rows[top.row]["text"] == top.text


def test_an_older_revision_or_a_released_short_name_shows_that_revisions_files(hub, run, tmp_path, monkeypatch):
    """`explore REPO --revision OLD` showed the newest density.png, and a registry short name
    (its released revision) the newest feature_density.json and families.json too: figures of
    another SAE than the one whose weights were loaded."""
    import json

    import yaml

    from sbert_sae.explorer_data import Explorer
    from sbert_sae.hub import push_sae

    folder = tmp_path / "sae"
    shutil.copytree(run, folder)
    first_plot = (folder / "density.png").read_bytes()
    first_counts = json.loads((folder / "feature_density.json").read_text())["fire_counts"]
    released = push_sae(folder, "org/revised-sae")
    # A later push of the same repo: other figures.
    (folder / "density.png").write_bytes(first_plot + b"later")
    density = json.loads((folder / "feature_density.json").read_text())
    density["fire_counts"] = [c + 1 for c in density["fire_counts"]]
    (folder / "feature_density.json").write_text(json.dumps(density))
    push_sae(folder, "org/revised-sae")

    registry = tmp_path / "registry.yaml"
    registry.write_text(yaml.safe_dump({"saes": {"revised": {"repo_id": "org/revised-sae", "revision": released}}}))
    monkeypatch.setenv("SBERT_SAE_REGISTRY", str(registry))
    for explorer in (Explorer.open("org/revised-sae", revision=released), Explorer.open("revised")):
        assert explorer.train_counts.tolist() == first_counts
        assert Path(explorer.plot("density.png")).read_bytes() == first_plot
    latest = Explorer.open("org/revised-sae")
    assert latest.train_counts.tolist() == density["fire_counts"]
    assert Path(latest.plot("density.png")).read_bytes() == first_plot + b"later"
