import logging

import pytest

from core.errors import LoragError
from retrieval.reranker import CrossEncoderReranker, load_reranker
from retrieval.keyword import KeywordIndex
from retrieval.retriever import (
    HybridRetriever, reciprocal_rank_fusion, relative_score_fusion, resolve_mode, zscore_fusion,
)
from core.settings import RetrievalSettings
from tests.retrieval.conftest import CORPUS

PART_NUMBER_CHUNK = CORPUS["handbook/calibration.md"][1][1]
TRAIN_CHUNK = CORPUS["travel/norway.txt"][1][1]
# Shares no word with the train paragraph, so only the dense retriever can find it.
PARAPHRASE = "How long is the rail journey over the mountains to the west coast?"


def test_rrf_matches_hand_computed_scores():
    rankings = {"dense": ["a", "b", "c"], "keyword": ["c", "a", "d"]}
    fused = reciprocal_rank_fusion(rankings, k=60)
    assert [item for item, _ in fused] == ["a", "c", "b", "d"]
    assert dict(fused) == pytest.approx({"a": 1 / 61 + 1 / 62, "c": 1 / 63 + 1 / 61, "b": 1 / 62, "d": 1 / 63})
    weighted = reciprocal_rank_fusion(rankings, k=60, weights={"dense": 1.0, "keyword": 2.0})
    assert [item for item, _ in weighted] == ["c", "a", "d", "b"]  # c: 0.048660 > a: 0.048651
    assert dict(weighted)["c"] == pytest.approx(1 / 63 + 2 / 61)
    assert reciprocal_rank_fusion({"dense": ["x", "y"]}, k=1) == [("x", 0.5), ("y", pytest.approx(1 / 3))]
    assert reciprocal_rank_fusion({"dense": [], "keyword": []}) == []


def test_relative_score_fusion_matches_hand_computed_scores():
    scored = {"dense": [("a", 0.9), ("b", 0.7), ("c", 0.5)], "keyword": [("c", 12.0), ("d", 4.0)]}
    # min-max per list: dense a=1, b=0.5, c=0; keyword c=1, d=0
    assert relative_score_fusion(scored) == [("a", 1.0), ("c", 1.0), ("b", pytest.approx(0.5)), ("d", 0.0)]
    weighted = relative_score_fusion(scored, weights={"keyword": 2.0})
    assert weighted == [("c", 2.0), ("a", 1.0), ("b", pytest.approx(0.5)), ("d", 0.0)]
    assert relative_score_fusion({"dense": [("x", 0.3)], "keyword": []}) == [("x", 1.0)]


def test_zscore_fusion_matches_hand_computed_scores():
    scored = {"dense": [("a", 0.9), ("b", 0.7), ("c", 0.5)], "keyword": [("c", 12.0), ("d", 4.0)]}
    # dense: mean 0.7, std sqrt(0.08/3) -> a=+1.2247, b=0, c=-1.2247; keyword: mean 8, std 4 -> c=+1, d=-1.
    # Missing items take the list's lowest z: a, b get keyword -1; d gets dense -1.2247.
    z = 0.2 / (0.08 / 3) ** 0.5
    fused = zscore_fusion(scored)
    assert [item for item, _ in fused] == ["a", "c", "b", "d"]
    assert dict(fused) == pytest.approx({"a": z - 1, "b": -1.0, "c": -z + 1, "d": -z - 1})
    weighted = dict(zscore_fusion(scored, weights={"dense": 0.25, "keyword": 0.75}))
    assert weighted == pytest.approx({"a": 0.25 * z - 0.75, "b": -0.75, "c": -0.25 * z + 0.75, "d": -0.25 * z - 0.75})
    assert zscore_fusion({"dense": [("x", 0.3), ("y", 0.3)], "keyword": []}) == [("x", 0.0), ("y", 0.0)]


def test_confidence_power_moves_weight_to_the_list_whose_top_hit_stands_out():
    # dense: four near-equal cosines, z = +-1.342, +-0.447 (top 1.342); keyword: b far ahead of e, f, g
    # (z: b = +1.732, the rest -0.577; top 1.732).
    scored = {"dense": [("a", 0.60), ("b", 0.59), ("c", 0.58), ("d", 0.57)],
              "keyword": [("b", 10.0), ("e", 1.0), ("f", 1.0), ("g", 1.0)]}
    weights = {"dense": 0.8, "keyword": 0.2}
    za, zb, top_d, top_k, low_k = 3 / 5 ** 0.5, 1 / 5 ** 0.5, 3 / 5 ** 0.5, 3 ** 0.5, -1 / 3 ** 0.5
    fixed = zscore_fusion(scored, weights=weights)
    assert zscore_fusion(scored, weights=weights, confidence_power=0.0) == fixed
    assert [item for item, _ in fixed[:2]] == ["a", "b"]  # 0.8 of the vote goes to dense's mild favourite
    # power 2: weights 0.8 * 1.342**2 : 0.2 * 1.732**2, rescaled to sum 0.8 + 0.2 = 1 -> b overtakes a.
    dense_w = 0.8 * top_d**2 / (0.8 * top_d**2 + 0.2 * top_k**2)
    adaptive = dict(zscore_fusion(scored, weights=weights, confidence_power=2.0))
    assert adaptive["a"] == pytest.approx(dense_w * za + (1 - dense_w) * low_k)
    assert adaptive["b"] == pytest.approx(dense_w * zb + (1 - dense_w) * top_k)
    assert max(adaptive, key=adaptive.get) == "b"


def test_confidence_power_ignores_a_list_with_nothing_standing_out():
    flat = {"dense": [("a", 0.5), ("b", 0.5)], "keyword": [("b", 3.0), ("c", 1.0)]}
    # dense's best hit is at its mean (z 0): its weight goes to 0 and keyword takes the whole sum, 0.55 + 0.45.
    fused = zscore_fusion(flat, weights={"dense": 0.55, "keyword": 0.45}, confidence_power=1.0)
    assert [item for item, _ in fused] == ["b", "a", "c"]
    assert [score for _, score in fused] == pytest.approx([1.0, -1.0, -1.0])
    both_flat = {"dense": [("a", 0.5), ("b", 0.5)], "keyword": [("a", 2.0)]}
    assert zscore_fusion(both_flat, confidence_power=1.0) == [("a", 0.0), ("b", 0.0)]


def test_default_hybrid_is_zscore_fusion_and_a_confidence_power_is_applied(build_index, embedder):
    settings = RetrievalSettings()
    assert settings.fusion == "zscore" and settings.confidence_power == 0  # chosen on seed 0 (RESULTS.md)
    index = build_index()
    query = "replace the probe part number"
    for power in (settings.confidence_power, 1.0):
        configured = settings.model_copy(update={"confidence_power": power})
        retriever = HybridRetriever(index, embedder, configured)
        dense = retriever.retrieve(query, k=settings.candidates, mode="dense")
        keyword = retriever.retrieve(query, k=settings.candidates, mode="keyword")
        scored = {"dense": [(p.chunk.id, p.score) for p in dense],
                  "keyword": [(p.chunk.id, p.score) for p in keyword]}
        expected = zscore_fusion(scored, weights={"dense": settings.dense_weight,
                                                  "keyword": 1 - settings.dense_weight}, confidence_power=power)
        hybrid = retriever.retrieve(query, k=5)
        assert [(p.chunk.id, p.score) for p in hybrid] == [(item, pytest.approx(score)) for item, score in expected[:5]]
        assert hybrid[0].chunk.text == PART_NUMBER_CHUNK
    fixed = HybridRetriever(index, embedder, settings).retrieve(query, k=5)
    assert [p.score for p in fixed] != pytest.approx([p.score for p in hybrid])  # the power changes the scores


def test_bm25_stems_terms_so_plural_queries_match_singular_text():
    texts = ["The infection spread quickly through the ward.", "Bake the bread for forty minutes."]
    stemmed = KeywordIndex([10, 20], texts)
    hits = stemmed.search("infections", 5)
    assert stemmed.stemmed and [rowid for rowid, _ in hits] == [10] and hits[0][1] > 0
    assert KeywordIndex([10, 20], texts, stemmer_language=None).search("infections", 5) == []


def test_rrf_fusion_can_be_chosen(build_index, embedder):
    index = build_index()
    retriever = HybridRetriever(index, embedder, RetrievalSettings(), fusion="rrf")
    passages = retriever.retrieve("QX-7731B", k=3)
    assert passages[0].chunk.text == PART_NUMBER_CHUNK
    dense_rank = [p.chunk for p in retriever.retrieve("QX-7731B", k=10, mode="dense")].index(passages[0].chunk) + 1
    assert passages[0].score == pytest.approx(1 / 61 + 1 / (60 + dense_rank))  # keyword rank 1 + dense rank
    with pytest.raises(LoragError, match="unknown retrieval fusion 'max'"):
        HybridRetriever(index, embedder, RetrievalSettings(), fusion="max")


def test_mode_follows_settings_unless_given():
    assert resolve_mode(None, RetrievalSettings()) == "hybrid"
    assert resolve_mode(None, RetrievalSettings(keyword=False)) == "dense"
    assert resolve_mode(None, RetrievalSettings(dense=False)) == "keyword"
    assert resolve_mode("keyword", RetrievalSettings(keyword=False)) == "keyword"
    with pytest.raises(LoragError, match="both false"):
        resolve_mode(None, RetrievalSettings(dense=False, keyword=False))
    with pytest.raises(LoragError, match="unknown retrieval mode 'sparse'"):
        resolve_mode("sparse", RetrievalSettings())


def test_rare_exact_keyword_is_found_by_keyword_and_hybrid(build_index, embedder):
    retriever = HybridRetriever(build_index(), embedder, RetrievalSettings())
    keyword = retriever.retrieve("QX-7731B", k=3, mode="keyword")
    hybrid = retriever.retrieve("QX-7731B", k=3, mode="hybrid")
    dense = retriever.retrieve("QX-7731B", k=3, mode="dense")

    assert keyword[0].chunk.text == PART_NUMBER_CHUNK and keyword[0].score == keyword[0].scores["keyword"] > 0
    assert hybrid[0].chunk.text == PART_NUMBER_CHUNK
    assert set(hybrid[0].scores) == {"dense", "keyword", "fused"} and hybrid[0].score == hybrid[0].scores["fused"]
    assert all(set(p.scores) == {"dense"} and p.score == p.scores["dense"] for p in dense)


def test_paraphrase_is_found_by_dense_and_hybrid_but_not_keyword(build_index, embedder):
    retriever = HybridRetriever(build_index(), embedder, RetrievalSettings())
    assert retriever.retrieve(PARAPHRASE, mode="keyword") == []
    dense = retriever.retrieve(PARAPHRASE, k=3, mode="dense")
    hybrid = retriever.retrieve(PARAPHRASE, k=3)
    assert dense[0].chunk.text == TRAIN_CHUNK and hybrid[0].chunk.text == TRAIN_CHUNK
    assert [p.chunk for p in hybrid] == [p.chunk for p in dense]  # one retriever only: RRF keeps its order
    assert dense[0].score > dense[1].score and hybrid[0].scores["dense"] == pytest.approx(dense[0].score)


def test_k_sources_and_passage_fields(build_index, embedder):
    retriever = HybridRetriever(build_index(), embedder, RetrievalSettings(k=4))
    passages = retriever.retrieve("warranty claim receipt")
    assert len(passages) == 4 and passages[0].chunk.source == "handbook/warranty.md"
    assert [p.score for p in passages] == sorted((p.score for p in passages), reverse=True)
    chunk = passages[0].chunk
    assert chunk.page >= 1 and chunk.end - chunk.start == len(chunk.text) and chunk.heading_path == ("Warranty",)
    only = retriever.retrieve("warranty claim receipt", k=10, sources=["recipes/bread.txt"])
    assert len(only) == 2 and {p.chunk.source for p in only} == {"recipes/bread.txt"}


@pytest.mark.parametrize(("query", "k", "message"), [("", None, "query is empty"), ("  ", None, "query is empty"),
                                                     ("q", 0, "k=0"), ("q", 101, "k=101")])
def test_bad_requests_are_refused(build_index, embedder, query, k, message):
    retriever = HybridRetriever(build_index(["recipes/bread.txt"]), embedder, RetrievalSettings())
    with pytest.raises(LoragError, match=message):
        retriever.retrieve(query, k=k)


def test_unavailable_reranker_is_skipped_with_a_log_line(tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="retrieval.reranker"):
        assert load_reranker(RetrievalSettings(reranker=str(tmp_path / "no-such-model"))) is None
    assert "no-such-model" in caplog.text and "not reranked" in caplog.text
    assert load_reranker(RetrievalSettings()) is None


@pytest.fixture(scope="module")
def tiny_cross_encoder(tmp_path_factory, embedder):
    """A 1-layer BERT sequence classifier with random weights and the embedder's own (offline) tokenizer."""
    import torch
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("tiny-cross-encoder")
    config = BertConfig(vocab_size=embedder.tokenizer.vocab_size, hidden_size=32, num_hidden_layers=1,
                        num_attention_heads=2, intermediate_size=64, num_labels=1)
    BertForSequenceClassification(config).save_pretrained(path)
    embedder.tokenizer.save_pretrained(path)
    return path


def test_reranker_reorders_candidates_by_its_own_scores(build_index, embedder, tiny_cross_encoder):
    reranker = load_reranker(RetrievalSettings(reranker=str(tiny_cross_encoder)), device="cpu")
    assert isinstance(reranker, CrossEncoderReranker)
    retriever = HybridRetriever(build_index(), embedder, RetrievalSettings(candidates=6), reranker=reranker)
    passages = retriever.retrieve("how do I calibrate the probe?", k=3)

    plain = HybridRetriever(retriever.index, embedder, RetrievalSettings(candidates=6)).retrieve(
        "how do I calibrate the probe?", k=6)
    expected = reranker.model.predict([("how do I calibrate the probe?", p.chunk.text) for p in plain])
    best = sorted(zip(expected, (p.chunk for p in plain)), key=lambda pair: -pair[0])[:3]
    assert [p.chunk for p in passages] == [chunk for _, chunk in best]
    assert [p.score for p in passages] == pytest.approx([float(score) for score, _ in best], abs=1e-5)
    assert all({"rerank", "fused", "dense"} <= set(p.scores) for p in passages)
