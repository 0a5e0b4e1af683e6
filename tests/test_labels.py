"""Labelling on real Wikipedia text with the real MiniLM model."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from sbert_sae import ConfigError, DatasetError, ModelLoadError, SparseAutoencoder, SparseAutoencoderConfig
from sbert_sae.cli import main
from sbert_sae.labels import LabelArguments, _row_matrix, document_terms, label_features, lexical_candidates, ngram_analyzer, prepare_labelling, score_labels

TOPICS = ("Mathematics", "Arts", "Biology and health sciences")


@pytest.fixture(scope="module")
def corpus(wiki_small, minilm):
    from datasets import load_from_disk

    ds = load_from_disk(str(wiki_small))
    texts, topics = ds["text"], ds["topic"]
    emb = minilm.encode(texts, batch_size=64, convert_to_numpy=True)
    return texts, np.asarray(topics), emb


@pytest.fixture(scope="module")
def planted(corpus):
    """An SAE whose features 0-2 point at the three topics' centroids (k=1: each text fires
    the nearest), and whose feature 3 never fires."""
    texts, topics, emb = corpus
    x = torch.nn.functional.normalize(torch.from_numpy(emb), dim=1)
    sae = SparseAutoencoder(SparseAutoencoderConfig(d_in=384, n_latents=4, k=1, base_model="sentence-transformers/all-MiniLM-L6-v2"))
    with torch.no_grad():
        for f, topic in enumerate(TOPICS):
            sae.W_enc[f] = torch.nn.functional.normalize(x[torch.from_numpy(topics == topic)].mean(0), dim=0)
        sae.W_enc[3] = -sae.W_enc[:3].mean(0)
        sae.b_enc[3] = -10.0
        sae.b_pre.zero_()
        sae.W_dec.copy_(sae.W_enc)
    return sae


@pytest.fixture(scope="module")
def planted_labels(planted, corpus, minilm):
    texts, _, emb = corpus
    ctx = prepare_labelling(planted, texts, emb, LabelArguments(top_texts=15, negatives=30, score_texts=40))
    return ctx, label_features(planted, texts, emb, minilm, show_progress=False, context=ctx)


def test_a_topic_feature_gets_a_label_from_that_topic(planted_labels, corpus, minilm):
    _, result = planted_labels
    texts, topics, emb = corpus
    centroids = {t: emb[topics == t].mean(0) for t in TOPICS}
    for f, topic in enumerate(TOPICS):
        entry = result.features[f]
        assert entry["status"] == "labelled", entry
        label_vec = minilm.encode([entry["label"]])[0]
        sims = {t: float(label_vec @ c / np.linalg.norm(c)) for t, c in centroids.items()}
        assert max(sims, key=sims.get) == topic, (entry["label"], sims)
        # the keywords are real n-grams of the feature's own texts
        own = " ".join(t.lower() for t, top in zip(texts, topics) if top == topic)
        for kw in entry["label"].split(", "):
            assert kw in own
        assert entry["score"]["auroc"] > 0.8, entry


def test_features_sharing_a_label_get_labels_of_their_own(corpus, minilm):
    """Two features that fire on the same texts, given one label: the one it separates less
    well is renamed with another keyword of its own shortlist, and keeps the rest."""
    from sbert_sae.labels import _separate_duplicates

    texts, topics, emb = corpus
    x = torch.nn.functional.normalize(torch.from_numpy(emb), dim=1)
    direction = torch.nn.functional.normalize(x[torch.from_numpy(topics == "Mathematics")].mean(0), dim=0)
    sae = SparseAutoencoder(SparseAutoencoderConfig(d_in=384, n_latents=2, k=2, base_model="sentence-transformers/all-MiniLM-L6-v2"))
    with torch.no_grad():
        sae.W_enc.copy_(torch.stack([direction, direction]))
        sae.b_enc.fill_(-0.3)
        sae.b_pre.zero_()
        sae.W_dec.copy_(sae.W_enc)
    ctx = prepare_labelling(sae, texts, emb, LabelArguments(top_texts=15, negatives=30, score_texts=40))
    features = label_features(sae, texts, emb, minilm, show_progress=False, context=ctx).features
    features[1]["label"] = features[0]["label"]
    features[1]["train_auroc"] = features[0]["train_auroc"] - 0.01
    phrases = sorted({k["keyword"] for e in features.values() for k in e["keywords"]})
    vectors = minilm.encode(phrases, normalize_embeddings=True)
    renamed = _separate_duplicates(ctx, features, dict(zip(phrases, vectors)), minilm)
    assert renamed == [1]
    before, after = features[0]["label"].split(", "), features[1]["label"].split(", ")
    assert after != before and after[: len(before) - 1] == before[:-1]
    assert after[-1] in {k["keyword"] for k in features[1]["keywords"]}


def test_a_shuffled_label_scores_near_chance_or_worse(planted_labels, minilm):
    ctx, result = planted_labels
    true = {f: result.features[f]["label"] for f in range(3)}
    shuffled = {0: true[1], 1: true[2], 2: true[0]}
    _, true_summary = score_labels(ctx, true, minilm)
    _, shuffled_summary = score_labels(ctx, shuffled, minilm)
    assert true_summary["label_auroc_mean"] > 0.8
    assert shuffled_summary["label_auroc_mean"] < 0.6
    assert true_summary["label_pearson_mean"] > shuffled_summary["label_pearson_mean"] + 0.3


def test_dead_features_say_so(planted_labels):
    _, result = planted_labels
    assert result.features[3]["status"] == "dead"
    assert result.features[3]["label"] is None
    assert result.summary["n_dead"] == 1 and result.summary["n_labelled"] == 3


def test_a_block_of_dead_features_only_is_labelled_dead(planted, corpus, minilm):
    # A block with no feature that fires (every feature of an SAE trained on identical texts,
    # or a block of dead ones) stopped labelling with numpy's "Cannot cast array data from
    # dtype('float64') to dtype('int64')".
    texts, _, emb = corpus
    result = label_features(planted, texts, emb, minilm, LabelArguments(top_texts=15, negatives=30, score_texts=40, block_size=1), show_progress=False)
    assert result.features[3]["status"] == "dead" and result.features[3]["label"] is None
    assert result.summary["n_dead"] == 1 and result.summary["n_labelled"] == 3


def test_ngrams_are_real_and_never_glued():
    analyze = ngram_analyzer((1, 3))
    grams = analyze("The theory of relativity, by Einstein, changed physics in 1905.")
    assert "theory of relativity" in grams
    assert "theory relativity" not in grams  # never glued across a removed stop word
    assert "of relativity" not in grams and "the theory" not in grams
    assert "1905" not in grams


def test_scripts_without_spaces_give_short_character_ngrams_as_labels(minilm):
    """Chinese and Japanese have no spaces: the word pattern made a whole clause one "word",
    so a feature was named by a clause ("東京は明日下雪になるでしょう") or a corpus refused.
    Runs of such scripts now give 2-4-character n-grams, joined without spaces, that never
    span punctuation nor start or end with hiragana (particles); spaced words are unchanged."""
    analyze = ngram_analyzer((1, 3))
    grams = analyze("東京は日本の首都です。iPhone是苹果公司的产品，很受欢迎")
    assert {"東京", "日本", "首都", "日本の首"} <= set(grams) and "iphone" in grams
    assert {"苹果公司", "公司", "产品", "受欢迎"} <= set(grams)
    assert all(2 <= len(g) <= 4 for g in grams if g != "iphone")
    assert not any(g.startswith(("は", "の")) or g.endswith(("は", "の", "す")) for g in grams)
    assert "产品很受" not in grams and not any("，" in g or " " in g for g in grams)  # never across punctuation
    assert analyze("The theory of relativity, by 爱因斯坦") == ["theory", "relativity", "theory of relativity", "爱因", "因斯", "斯坦", "爱因斯", "因斯坦", "爱因斯坦"]

    foods, sports = ["饺子", "米饭", "面条", "火锅", "包子"], ["足球", "篮球", "网球", "排球", "游泳"]
    texts = [f"我今天吃了{a}和{b}，味道非常好吃。" for a in foods for b in foods if a != b]
    texts += [f"他每天下午练习{a}和{b}，比赛赢得了冠军。" for a in sports for b in sports if a != b]
    emb = minilm.encode(texts, batch_size=64, convert_to_numpy=True)
    x = torch.nn.functional.normalize(torch.from_numpy(emb), dim=1)
    sae = SparseAutoencoder(SparseAutoencoderConfig(d_in=384, n_latents=2, k=1, base_model="sentence-transformers/all-MiniLM-L6-v2"))
    with torch.no_grad():  # one feature per topic, as in `planted`
        sae.W_enc.copy_(torch.stack([torch.nn.functional.normalize(x[:20].mean(0), dim=0), torch.nn.functional.normalize(x[20:].mean(0), dim=0)]))
        sae.b_enc.zero_()
        sae.b_pre.zero_()
        sae.W_dec.copy_(sae.W_enc)
    result = label_features(sae, texts, emb, minilm, LabelArguments(top_texts=10, negatives=10, score_texts=10), show_progress=False)
    for f, own in ((0, texts[:20]), (1, texts[20:])):
        entry = result.features[f]
        assert entry["status"] == "labelled", entry
        for kw in [entry["label"], *(k["keyword"] for k in entry["keywords"])]:
            for part in kw.split(", "):
                assert 2 <= len(part) <= 4 and " " not in part, entry["label"]  # not a clause
                assert any(part in t for t in own), (part, entry["label"])  # from the feature's own texts


# Short real sentences on three topics each, written for these tests: Thai (football, a
# hospital, food) and Japanese (flowers whose names are written in hiragana, trains, food).
THAI_TEXTS = {
    "football": [
        "นักฟุตบอลทีมชาติไทยลงสนามในคืนนี้",
        "แฟนฟุตบอลหลายพันคนมาเชียร์ที่สนามกีฬา",
        "ผู้รักษาประตูเซฟลูกยิงได้อย่างสวยงาม",
        "ทีมฟุตบอลของโรงเรียนชนะการแข่งขันเมื่อวานนี้",
        "กองหน้ายิงประตูได้สองลูกในครึ่งแรก",
        "ผู้ตัดสินให้ใบเหลืองกับนักฟุตบอลคนนั้น",
        "การแข่งขันฟุตบอลโลกจะเริ่มในเดือนหน้า",
        "โค้ชสั่งให้นักฟุตบอลซ้อมวิ่งทุกเช้า",
        "สนามฟุตบอลแห่งใหม่มีที่นั่งสามหมื่นที่",
        "เขาเตะลูกฟุตบอลข้ามหัวผู้รักษาประตู",
        "ทีมเยือนยิงประตูตีเสมอในนาทีสุดท้าย",
        "เด็กๆ ชอบเล่นฟุตบอลหลังเลิกเรียน",
    ],
    "hospital": [
        "คุณหมอตรวจคนไข้ที่โรงพยาบาลทุกวัน",
        "พยาบาลวัดความดันโลหิตให้ผู้ป่วย",
        "ผู้ป่วยต้องนอนพักที่โรงพยาบาลสามวัน",
        "โรงพยาบาลประจำจังหวัดมีแพทย์ไม่พอ",
        "แพทย์สั่งยาแก้ปวดให้คนไข้",
        "พยาบาลฉีดวัคซีนให้เด็กที่โรงพยาบาล",
        "คนไข้รอพบแพทย์ที่ห้องฉุกเฉินนานสองชั่วโมง",
        "รถพยาบาลพาผู้ป่วยไปส่งโรงพยาบาลอย่างรวดเร็ว",
        "แพทย์ผ่าตัดหัวใจให้ผู้ป่วยสูงอายุ",
        "ผู้ป่วยโรคเบาหวานควรกินยาตามที่แพทย์สั่ง",
        "โรงพยาบาลเปิดแผนกผู้ป่วยนอกตั้งแต่เช้า",
        "พยาบาลดูแลผู้ป่วยตลอดทั้งคืน",
    ],
    "food": [
        "แม่ทำต้มยำกุ้งรสชาติเผ็ดมาก",
        "ร้านอาหารนี้ขายข้าวผัดกะเพราอร่อย",
        "ส้มตำใส่มะละกอ มะนาว และพริก",
        "เขาชอบกินข้าวเหนียวมะม่วงเป็นของหวาน",
        "พ่อครัวผัดผักบุ้งด้วยไฟแรง",
        "อาหารไทยใช้น้ำปลาและพริกเป็นเครื่องปรุง",
        "แกงเขียวหวานไก่ใส่กะทิ มะเขือ และใบโหระพา",
        "ร้านอาหารริมทางขายก๋วยเตี๋ยวตั้งแต่เช้า",
        "เราทำอาหารเย็นกินด้วยกันที่บ้าน",
        "ผัดไทยใส่กุ้ง เต้าหู้ และถั่วงอก",
        "ต้มยำกุ้งเป็นอาหารไทยที่มีชื่อเสียง",
        "ร้านอาหารนี้ใช้พริกสดและมะนาวทุกจาน",
    ],
}
JAPANESE_TEXTS = {
    "flowers": [
        "夏になると、庭のひまわりが大きく咲きます。",
        "ひまわりの種は鳥の好物です。",
        "春の野原にはたんぽぽがたくさん咲いています。",
        "たんぽぽの綿毛が風に飛ばされました。",
        "小学生があさがおを育てて観察日記を書きます。",
        "あさがおは朝に咲いて昼にしぼみます。",
        "公園のさくらが満開になりました。",
        "さくらの花びらが川に散っています。",
        "ひまわり畑は黄色一色でした。",
        "道ばたのたんぽぽは踏まれても元気です。",
        "あさがおのつるが窓まで伸びました。",
        "母は花屋でひまわりとさくらの枝を買いました。",
    ],
    "trains": [
        "新幹線は東京から大阪まで二時間半で着きます。",
        "朝の電車はいつも混雑しています。",
        "駅のホームで次の電車を待ちました。",
        "新幹線の切符を駅の窓口で買いました。",
        "地下鉄の駅は階段が多いです。",
        "電車が遅れたので会社に遅刻しました。",
        "特急電車は小さな駅には止まりません。",
        "駅員さんが乗り換えの方法を教えてくれました。",
        "新幹線の窓から富士山が見えました。",
        "終電に乗り遅れてタクシーで帰りました。",
        "この駅から空港まで電車で三十分です。",
        "新しい駅ビルにはレストランがたくさんあります。",
    ],
    "food": [
        "母はおにぎりに梅干しを入れます。",
        "寿司職人が新鮮な魚を握りました。",
        "味噌汁には豆腐とわかめが入っています。",
        "遠足のお弁当におにぎりを三つ作りました。",
        "天ぷらは熱い油でからりと揚げます。",
        "ラーメン屋の前に長い行列ができていました。",
        "父は毎朝ご飯と味噌汁を食べます。",
        "おにぎりは手で握って作ります。",
        "回転寿司でまぐろとサーモンを食べました。",
        "祖母の作る味噌汁は世界一おいしいです。",
        "カレーライスは子どもに人気の料理です。",
        "料理教室で天ぷらの揚げ方を習いました。",
    ],
}


def test_thai_candidates_are_whole_words_not_pieces_of_them():
    """Thai has no spaces and its words are longer than Chinese ones: 2-4-character n-grams
    named no feature by a whole word (ฟุตบอล, football, and โรงพยาบาล, hospital, were only
    pieces: ฟุตบ, ตบอล, งพยา), and n-grams split a vowel from its consonant (นเ, าบาล).
    Candidates are now 2-8 clusters, a vowel always with its consonant, and a piece of a
    longer candidate that occurs almost only inside it is dropped."""
    texts = [t for topic in THAI_TEXTS.values() for t in topic]
    _, terms = document_terms(texts, (1, 3), 3)
    terms = set(terms.tolist())
    assert {"ฟุตบอล", "นักฟุตบอล", "โรงพยาบาล", "พยาบาล", "ผู้ป่วย", "แพทย์", "คนไข้", "ร้านอาหาร", "อาหาร", "ประตู", "สนาม", "พริก"} <= terms
    assert not {"ฟุตบ", "ตบอล", "ฟุตบอ", "โรงพ", "งพยา", "พยาบ", "าบาล", "ผู้ป่ว", "ร้านอ", "แพท"} & terms
    grams = ngram_analyzer((1, 3))("เขาเตะลูกฟุตบอลข้ามหัวผู้รักษาประตู")
    assert {"ฟุตบอล", "ประตู", "ลูกฟุตบอล"} <= set(grams)
    assert not any(g.endswith(("เ", "แ", "โ", "ใ", "ไ")) or g.startswith(("า", "ะ", "ำ")) for g in grams)  # a vowel stays with its consonant


def test_japanese_words_in_hiragana_and_whole_compounds_name_features(minilm):
    """No candidate could start or end with hiragana (particles), so a word written in
    hiragana alone (ひまわり, たんぽぽ) never was one: the flowers' feature went unlabelled,
    and food's was named by a piece of 味噌汁 (噌汁). Now 3-4 hiragana are a candidate unless
    they hold an inflection (ました, ています) or end with a particle, and pieces are dropped."""
    texts = [t for topic in JAPANESE_TEXTS.values() for t in topic]
    _, terms = document_terms(texts, (1, 3), 3)
    assert {"ひまわり", "たんぽぽ", "あさがお", "さくら", "おにぎり", "味噌汁", "新幹線", "電車"} <= set(terms.tolist())
    assert not any(("まし" in t or "てい" in t or "ます" in t) for t in terms) and not {"噌汁", "味噌", "新幹", "幹線", "ひまわ", "まわり"} & set(terms.tolist())
    grams = ngram_analyzer((1, 3))("庭でひまわりをそだてる")
    assert "ひまわり" in grams and not any("を" in g for g in grams), grams  # を is only ever the particle
    grams = ngram_analyzer((1, 3))("新しいコンピューターでインターネットを見る")
    assert {"コンピューター", "インターネット"} <= set(grams), grams  # loanwords longer than 4 characters, whole
    emb = minilm.encode(texts, batch_size=64, convert_to_numpy=True)
    x = torch.nn.functional.normalize(torch.from_numpy(emb), dim=1)
    sae = SparseAutoencoder(SparseAutoencoderConfig(d_in=384, n_latents=3, k=1, base_model="sentence-transformers/all-MiniLM-L6-v2"))
    with torch.no_grad():  # one feature per topic, as in `planted`
        sae.W_enc.copy_(torch.stack([torch.nn.functional.normalize(x[12 * i : 12 * i + 12].mean(0), dim=0) for i in range(3)]))
        sae.b_enc.zero_()
        sae.b_pre.zero_()
        sae.W_dec.copy_(sae.W_enc)
    result = label_features(sae, texts, emb, minilm, LabelArguments(top_texts=10, negatives=10, score_texts=10), show_progress=False)
    flowers = result.features[0]
    assert flowers["status"] == "labelled", flowers
    assert set(flowers["label"].split(", ")) <= {"ひまわり", "たんぽぽ", "あさがお", "さくら"}, flowers["label"]
    assert result.features[2]["label"] == "味噌汁", result.features[2]["label"]


@pytest.mark.parametrize("contrast", [0.0, 0.5])
def test_lexical_candidates_are_each_features_best_ngrams_whatever_the_chunk(corpus, contrast):
    """The candidates, computed a few features at a time, are each feature's best n-grams by
    contrastive c-TF-IDF, as a dense computation of one feature alone finds them: those in
    2 or more of its labelling texts, scored by its activation weights times the rarity."""
    texts, _, emb = corpus
    torch.manual_seed(0)
    sae = SparseAutoencoder(SparseAutoencoderConfig(d_in=384, n_latents=48, k=4, base_model="sentence-transformers/all-MiniLM-L6-v2"))
    args = LabelArguments(top_texts=15, negatives=30, score_texts=40, candidates=8, lexical_contrast=contrast)
    ctx = prepare_labelling(sae, texts, emb, args)
    doc_terms, _ = document_terms(ctx.texts, (1, 3), 3)
    n_texts = len(texts)
    idf = np.log(n_texts / np.maximum(np.asarray(doc_terms.sum(axis=0)).ravel(), 1)).astype(np.float32)
    neg_weights = _row_matrix(ctx.hard_train, [np.full(len(h), 1.0 / max(1, len(h)), dtype=np.float32) for h in ctx.hard_train], ctx.n_features, n_texts)
    skip = {1, 7}
    chunked = lexical_candidates(ctx, doc_terms, idf, neg_weights, skip=skip, chunk=5)
    whole = lexical_candidates(ctx, doc_terms, idf, neg_weights, skip=skip, chunk=10**6)
    assert len(chunked) == len(whole) == ctx.n_features
    assert all(np.array_equal(a, b) for a, b in zip(chunked, whole))
    dense, neg = doc_terms.toarray().astype(np.float64), neg_weights.toarray()
    weights = ctx.weights.toarray()
    checked = 0
    for f, picked in enumerate(chunked):
        if f in skip:
            assert len(picked) == 0
            continue
        in_texts = dense[ctx.pos_rows[f]].sum(0)
        needed = min(2, max(1, in_texts.max(initial=0)))
        score = (weights[f] @ dense - contrast * (neg[f] @ dense)) * (in_texts >= needed) * idf
        positive = np.flatnonzero(score > 0)
        assert len(picked) == min(args.candidates, len(positive)) and len(set(picked.tolist())) == len(picked)
        assert set(picked.tolist()) <= set(positive.tolist())
        left_out = np.setdiff1d(positive, picked)
        if len(picked) and len(left_out):  # the best: nothing left out scores above a pick
            assert score[left_out].max() <= score[picked].min() + 1e-5
        checked += len(picked) > 0
    assert checked > 20


@pytest.mark.parametrize("processes", [1, 3])
def test_document_terms_equal_sklearns_count_vectorizer(wiki_rows, processes):
    """The corpus' n-gram matrix, analysed in one process or in forked workers, is exactly
    what sklearn's CountVectorizer makes of the same analyzer (same terms, same order)."""
    from sklearn.feature_extraction.text import CountVectorizer

    texts = [r["text"] for r in wiki_rows[:1500]] + ["", "42"]  # texts without any n-gram too
    matrix, terms = document_terms(texts, (1, 3), min_df=3, processes=processes)
    reference = CountVectorizer(analyzer=ngram_analyzer((1, 3)), min_df=3, binary=True, dtype=np.float32)
    expected = reference.fit_transform(texts)
    assert list(terms) == list(reference.get_feature_names_out()) and len(terms) > 4000
    assert matrix.shape == expected.shape and matrix.dtype == np.float32
    assert (matrix != expected).nnz == 0
    with pytest.raises(DatasetError, match="no candidate keyword occurs in 3 or more texts.*label --min-df"):
        document_terms(["alpha beta", "gamma delta", "alpha gamma"], (1, 1), min_df=3, processes=processes)


def test_bad_inputs(planted, corpus, minilm):
    texts, _, emb = corpus
    with pytest.raises(DatasetError, match="240 texts but 239 embeddings"):
        label_features(planted, texts, emb[:-1], minilm, show_progress=False)
    with pytest.raises(ConfigError, match="embeddings are 383-d"):
        label_features(planted, texts, emb[:, :-1], minilm, show_progress=False)
    digits = ["1234 5678", "42 17", "3.14 2.71", "7 8 9", "100 200"] * 4
    with pytest.raises(DatasetError, match="no candidate keywords"):
        label_features(planted, digits, emb[:20], minilm, show_progress=False)


def test_label_command_writes_labels_that_load_back(labelled_run):
    doc = json.loads((labelled_run / "feature_labels.json").read_text())
    assert doc["base_model"] == "sentence-transformers/all-MiniLM-L6-v2"
    assert len(doc["features"]) == 64
    metrics = json.loads((labelled_run / "metrics.json").read_text())
    assert 0 <= metrics["label_auroc_mean"] <= 1 and "heldout_fvu" in metrics
    sae = SparseAutoencoder.from_pretrained(labelled_run)
    labels = sae.feature_labels
    assert labels == [doc["features"][str(f)].get("label") for f in range(64)]
    labelled = [f for f, label in enumerate(labels) if label]
    assert len(labelled) > 32
    info = sae.describe(labelled[0])
    assert info["label"] == labels[labelled[0]] and info["keywords"] and "score" in info and info["top_texts"]
    assert sae.metrics["heldout_fvu"] == metrics["heldout_fvu"]


def test_explain_lists_active_features_strongest_first(labelled_run):
    sae = SparseAutoencoder.from_pretrained(labelled_run)
    rows = sae.explain("The cell membrane separates the interior of a cell from its environment.")
    assert 0 < len(rows) <= 4
    assert [r["activation"] for r in rows] == sorted((r["activation"] for r in rows), reverse=True)
    assert all(r["label"] == sae.feature_labels[r["feature"]] for r in rows)


def test_malformed_labels_file_is_refused(labelled_run, tmp_path):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(labelled_run, broken)
    (broken / "feature_labels.json").write_text(json.dumps({"features": {"9999": {"label": "x"}}}))
    with pytest.raises(ModelLoadError, match="feature id 9999 is outside 0..63"):
        SparseAutoencoder.from_pretrained(broken)
    (broken / "feature_labels.json").write_text("{not json")
    with pytest.raises(ModelLoadError, match="not valid JSON"):
        SparseAutoencoder.from_pretrained(broken)


def test_labelling_from_python_reads_the_runs_own_corpus_when_no_dataset_is_given(labelled_run, wiki_small, tmp_path):
    # `sbert-sae label RUN` labels on the run's own corpus; run_labelling(RUN) wanted a
    # DataArguments, and DataArguments() (dataset "") failed as "cannot load dataset ''".
    import shutil

    from sbert_sae.pipeline import run_labelling

    run = tmp_path / "sae"
    shutil.copytree(labelled_run, run)
    summary = run_labelling(run, show_progress=False)
    assert summary["n_features"] == 64
    assert json.loads((run / "feature_labels.json").read_text())["dataset"] == str(wiki_small)
    assert SparseAutoencoder.from_pretrained(run).metrics["label_auroc_mean"] == summary["label_auroc_mean"]


def test_a_label_result_shows_its_summary_not_every_feature():
    # A notebook cell ending in label_features(...) showed the dataclass' repr: every feature's
    # entry with its keywords and examples (6144 of them for runs/wiki, megabytes of text).
    from sbert_sae.labels import LabelResult

    features = {f: {"label": f"label {f}", "keywords": [{"keyword": "k", "similarity": 0.5}]} for f in range(64)}
    result = LabelResult(features=features, summary={"n_features": 64, "n_labelled": 60, "label_auroc_mean": 0.75})
    shown = repr(result)
    assert "keywords" not in shown and "label 3" not in shown
    assert shown == "LabelResult(60 of 64 features labelled, label_auroc_mean=0.75; .features, .summary hold the rest)"


def test_a_killed_labelling_resumes_without_redoing_finished_features(labelled_run, wiki_small, monkeypatch, keybert_documents):
    from sbert_sae import labels as labels_module
    from sbert_sae.pipeline import DataArguments, run_labelling

    data = DataArguments(dataset=str(wiki_small))
    args = LabelArguments(top_texts=10, block_size=16)
    real_score = labels_module.score_labels
    calls = {"n": 0}

    def dies_in_third_block(*a, **k):
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("killed")
        return real_score(*a, **k)

    monkeypatch.setattr(labels_module, "score_labels", dies_in_third_block)
    with pytest.raises(RuntimeError, match="killed"):
        run_labelling(labelled_run, data, args, show_progress=False)
    partial = json.loads((labelled_run / "feature_labels.partial.json").read_text())
    assert sorted(int(f) for f in partial["features"]) == list(range(32))

    monkeypatch.setattr(labels_module, "score_labels", real_score)
    seen = keybert_documents()
    summary = run_labelling(labelled_run, data, args, show_progress=False)
    assert seen and all(int(doc) >= 32 for doc in seen)  # finished features were not labelled again
    assert not (labelled_run / "feature_labels.partial.json").exists()
    final = json.loads((labelled_run / "feature_labels.json").read_text())["features"]
    assert len(final) == 64 and summary["n_features"] == 64
    labels = {f: e.get("label") for f, e in final.items()}
    for f in range(32):
        before, after = partial["features"][str(f)], final[str(f)]
        if after["label"] == before["label"]:
            assert after == before
        else:  # renamed at the end because a feature labelled later shares its label and owns it
            owners = [g for g, label in labels.items() if label == before["label"] and g != str(f)]
            assert owners and {k: v for k, v in after.items() if k not in ("label", "train_auroc", "score")} == {k: v for k, v in before.items() if k not in ("label", "train_auroc", "score")}


def test_batched_auroc_counts_wins_over_real_entries_and_ties_as_half():
    from sbert_sae.labels import auroc, batched_auroc

    rng = np.random.default_rng(0)
    pos = np.round(rng.normal(size=(6, 4, 9)), 1)  # rounded: many ties
    neg = np.round(rng.normal(size=(6, 4, 7)), 1)
    pos_mask = rng.random((6, 1, 9)) < 0.7
    neg_mask = rng.random((6, 1, 7)) < 0.7
    pos_mask[0], neg_mask[1] = False, False  # one feature without positives, one without negatives
    got = batched_auroc(torch.from_numpy(pos), torch.from_numpy(neg), torch.from_numpy(pos_mask), torch.from_numpy(neg_mask)).numpy()
    for b in range(6):
        for r in range(4):
            p, n = pos[b, r][pos_mask[b, 0]], neg[b, r][neg_mask[b, 0]]
            if len(p) == 0 or len(n) == 0:
                assert np.isnan(got[b, r])
                continue
            diff = p[:, None] - n[None, :]
            expected = (diff > 0).mean() + 0.5 * (diff == 0).mean()
            assert got[b, r] == pytest.approx(expected)
            assert auroc(p, n) == pytest.approx(expected)
    assert auroc([1.0, 2.0], [0.0]) == 1.0 and auroc([0.0], [1.0, 2.0]) == 0.0 and auroc([1.0], [1.0]) == 0.5


def test_contrast_sets_are_distinct_non_firing_texts_hard_ones_first():
    from sbert_sae.activations import SparseActivations
    from sbert_sae.labels import contrast_sets

    rng = np.random.default_rng(0)
    n_texts, k, n_feat = 2000, 8, 300
    indices = np.stack([rng.choice(n_feat, k, replace=False) for _ in range(n_texts)]).astype(np.int32)
    values = rng.random((n_texts, k)).astype(np.float32)
    values[:, -2:] = 0  # selected but not firing
    acts = SparseActivations(values, indices, n_feat)
    pool = np.sort(rng.choice(n_texts, 500, replace=False))
    fires = lambda rows, f: ((indices[rows] == f) & (values[rows] > 0)).any(axis=1)  # noqa: E731
    hard = np.full((n_feat, 10), -1)
    for f in range(n_feat):
        quiet = pool[~fires(pool, f)]
        m = rng.integers(0, 11)
        hard[f, :m] = quiet[:m]
    sets = contrast_sets(hard, acts, pool, 30, np.random.default_rng(1))
    assert len(sets) == n_feat
    for f, rows in enumerate(sets):
        h = hard[f][hard[f] >= 0]
        assert len(rows) == 30 and len(np.unique(rows)) == 30
        assert np.isin(rows, pool).all() and not fires(rows, f).any()
        assert (rows[: len(h)] == h).all()


@pytest.mark.parametrize(
    ("config", "fragment"),
    [
        ({"d_in": 128, "base_model": "sentence-transformers/all-MiniLM-L6-v2"}, "makes 384-d embeddings but the SAE in"),
        ({"d_in": 384, "base_model": None}, "has no base_model in its config"),
    ],
)
def test_label_refuses_an_sae_its_dataset_cannot_be_embedded_for(config, fragment, wiki_small, tmp_path, capsys):
    folder = tmp_path / "sae"
    SparseAutoencoder(SparseAutoencoderConfig(n_latents=16, k=2, **config)).save_pretrained(folder)
    assert main(["label", str(folder), "--dataset", str(wiki_small), "-q"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and fragment in err[0], err
    assert not (folder / "feature_labels.json").exists()


def test_label_reads_the_text_column_the_run_was_trained_on(wiki_small, tmp_path, capsys):
    # `label RUN --dataset D` used --text-column's default "text" whatever column the run was
    # trained on: on a dataset that also has a "text" column it labelled the SAE from other texts.
    from datasets import load_from_disk

    ds = load_from_disk(str(wiki_small)).select(range(0, 240, 3))
    ds = ds.rename_column("text", "body").add_column("text", [f"note {i}" for i in range(len(ds))])
    ds.save_to_disk(str(tmp_path / "data"))
    run = tmp_path / "run"
    small = ["--n-latents", "16", "-k", "2", "--epochs", "2", "--batch-size", "32", "-q", "--report-to", "none"]
    assert main(["train", "--dataset", str(tmp_path / "data"), "--text-column", "body", "--out", str(run), *small]) == 0
    assert main(["label", str(run), "--dataset", str(tmp_path / "data"), "-q", "--top-texts", "5", "--min-df", "2"]) == 0
    doc = json.loads((run / "feature_labels.json").read_text())
    top = [t for entry in doc["features"].values() for t in entry.get("top_texts") or []]
    assert top and not any(t.startswith("note ") for t in top), top[:3]
    bodies = [" ".join(b.split()) for b in ds["body"]]  # top texts are whitespace-normalised snippets
    assert all(any(b.startswith(t.rstrip("…")) for b in bodies) for t in top)


def test_a_run_on_squad_paragraphs_reads_them_again_by_its_dotted_json_field(wiki_small, tmp_path, capsys):
    # SQuAD holds its texts at data[].paragraphs[].context, which no --json-field could reach.
    # A run on `--json-field data.paragraphs` records the path; label and search, given the
    # same file, read the same paragraphs and find their embeddings in the cache (no new entry).
    import re

    from datasets import load_from_disk

    rows = load_from_disk(str(wiki_small)).select(range(0, 240, 2))
    articles, contexts = [], []
    for row in rows:  # an article per Wikipedia lead, a paragraph per half of its sentences
        sentences = re.split(r"(?<=\.) ", row["text"])
        halves = [" ".join(sentences[: len(sentences) // 2 or 1]), " ".join(sentences[len(sentences) // 2 or 1 :])]
        paragraphs = [{"context": c, "qas": [{"question": f"What is {row['id']}?", "id": f"{row['id']}-{n}", "answers": [{"text": c.split()[0], "answer_start": 0}]}]} for n, c in enumerate(halves) if c]
        articles.append({"title": row["id"], "paragraphs": paragraphs})
        contexts += [p["context"] for p in paragraphs]
    path = tmp_path / "squad.json"
    path.write_text(json.dumps({"version": "1.1", "data": articles}))
    run, cache = tmp_path / "run", tmp_path / "cache"
    small = ["--n-latents", "16", "-k", "2", "--epochs", "2", "--batch-size", "32", "-q", "--report-to", "none"]
    assert main(["train", "--dataset", str(path), "--json-field", "data.paragraphs", "--text-column", "context", "--cache-dir", str(cache), "--out", str(run), *small]) == 0
    recorded = json.loads((run / "training_args.json").read_text())["data"]
    assert (recorded["json_field"], recorded["text_column"]) == ("data.paragraphs", "context")
    entries = sorted(p.name for p in cache.iterdir())
    assert main(["label", str(run), "--dataset", str(path), "--cache-dir", str(cache), "-q", "--top-texts", "5", "--min-df", "2"]) == 0
    assert sorted(p.name for p in cache.iterdir()) == entries
    top = [t for entry in json.loads((run / "feature_labels.json").read_text())["features"].values() for t in entry.get("top_texts") or []]
    normalised = [" ".join(c.split()) for c in contexts]
    assert top and all(any(c.startswith(t.rstrip("…")) for c in normalised) for t in top)
    capsys.readouterr()
    assert main(["search", str(run), "cells and proteins", "--top", "3", "--json", "-q", "--cache-dir", str(cache)]) == 0
    hits = json.loads(capsys.readouterr().out)["hits"]
    assert len(hits) == 3 and all(" ".join(h["text"].split()) in normalised for h in hits)
    assert sorted(p.name for p in cache.iterdir()) == entries


def test_a_run_on_a_json_object_file_reads_it_again_by_its_json_field(wiki_small, hub, tmp_path, capsys):
    # A JSON file holding its records under "data" ({"version": ..., "data": [...]}) could not be
    # trained on; with --json-field the run records the key, and label, push --activations and
    # the explorer (given the same file), search and families (the run's corpus) read the file
    # as the run did.
    from datasets import load_from_disk

    from sbert_sae.explorer_data import Explorer

    rows = load_from_disk(str(wiki_small)).select(range(0, 240, 3))
    path = tmp_path / "corpus.json"
    path.write_text(json.dumps({"version": "1.1", "data": [{"body": r["text"], "topic": r["topic"]} for r in rows]}))
    run = tmp_path / "run"
    small = ["--n-latents", "16", "-k", "2", "--epochs", "2", "--batch-size", "32", "-q", "--report-to", "none"]
    assert main(["train", "--dataset", str(path), "--text-column", "body", "--out", str(run), *small]) == 2
    assert "pass --json-field data" in capsys.readouterr().err
    assert main(["train", "--dataset", str(path), "--json-field", "data", "--text-column", "body", "--out", str(run), *small]) == 0
    assert json.loads((run / "training_args.json").read_text())["data"]["json_field"] == "data"
    assert main(["label", str(run), "--dataset", str(path), "-q", "--top-texts", "5", "--min-df", "2"]) == 0
    top = [t for entry in json.loads((run / "feature_labels.json").read_text())["features"].values() for t in entry.get("top_texts") or []]
    bodies = [" ".join(b.split()) for b in rows["text"]]
    assert top and all(any(b.startswith(t.rstrip("…")) for b in bodies) for t in top)
    capsys.readouterr()
    assert main(["search", str(run), "cells and proteins", "--top", "3", "--json", "-q"]) == 0
    hits = json.loads(capsys.readouterr().out)["hits"]
    assert len(hits) == 3 and all(" ".join(h["text"].split()) in bodies for h in hits)
    assert main(["families", str(run), "--permutations", "2", "-q"]) == 0
    assert main(["push", str(run), "org/json-sae", "--activations", "--dataset", str(path), "--text-column", "body", "-q"]) == 0
    assert len(Explorer.open(run, dataset=str(path)).corpus()) == len(rows)
    # another file is not assumed to be shaped alike: it is read as it is
    other = tmp_path / "other.jsonl"
    other.write_text("\n".join(json.dumps({"body": b}) for b in bodies[:20]) + "\n")
    assert main(["label", str(run), "--dataset", str(other), "-q", "--top-texts", "5", "--min-df", "2"]) == 0


def test_each_stage_has_its_wall_time_and_its_threads_cpu_time_named_apart(labelled_run, tmp_path):
    """The labelling stages overlap across two threads, so their wall-clock laps (the only
    figures, as "seconds") read on a loaded machine as if a stage grew faster than its work.
    feature_labels.json now holds both, named apart: "wall_seconds" and "thread_cpu_seconds"
    (`time.thread_time` of the thread that ran the stage, which can never pass its wall
    time); a file written before, with "seconds" alone, still loads and reads as wall time."""
    import shutil

    summary = json.loads((labelled_run / "feature_labels.json").read_text())["summary"]
    assert "seconds" not in summary, summary
    wall, cpu = summary["wall_seconds"], summary["thread_cpu_seconds"]
    stages = {"examples", "candidates", "embed_candidates", "keybert", "choose", "embed_labels", "score", "separate_duplicates"}
    assert set(wall) == stages | {"wait"} and set(cpu) == stages  # waiting is no work of its own
    assert all(0 <= cpu[s] <= wall[s] + 0.005 for s in stages), (wall, cpu)  # a thread's CPU time fits in its wall time

    from sbert_sae.labels import label_stage_seconds

    assert label_stage_seconds(summary) == {"wall_seconds": wall, "thread_cpu_seconds": cpu}

    old = tmp_path / "old"
    shutil.copytree(labelled_run, old)
    data = json.loads((old / "feature_labels.json").read_text())
    data["summary"]["seconds"] = data["summary"].pop("wall_seconds")
    del data["summary"]["thread_cpu_seconds"]
    (old / "feature_labels.json").write_text(json.dumps(data))
    sae = SparseAutoencoder.from_pretrained(old)
    assert sae.label_data["features"] and label_stage_seconds(sae.label_data["summary"]) == {"wall_seconds": wall, "thread_cpu_seconds": None}
