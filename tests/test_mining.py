"""Hard-negative mining and teacher scoring on a real local Ray, on a slice of msmarco-subset."""

from __future__ import annotations

import collections
import importlib.util
import json
import os
import subprocess
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from bge_ray.batch.mine import MineConfig, embed_with_cache, mine_hard_negatives, select_negatives
from bge_ray.batch.teacher import add_teacher_scores
from bge_ray.io.training_data import TrainingDataError, read_training_jsonl
from bge_ray.models.spec import EmbedderSpec, RerankerSpec

REPO = Path(__file__).resolve().parents[1]
MAX_LEN = 64
SPEC = EmbedderSpec(max_length=MAX_LEN, batch_size=64)
EPS = 1e-4  # float noise between the actor pool's batches and a direct encode


def _load_job(name: str):
    spec = importlib.util.spec_from_file_location(f"job_{name}", REPO / "jobs" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _lines(path) -> list[dict]:
    return [json.loads(x) for x in Path(path).read_text(encoding="utf-8").splitlines()]


def _write(path: Path, rows) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def msmarco_slice(shared_data, tmp_path_factory):
    """8 queries with two graded-2+ positives each (other relevant passages stay in the pool, so false
    negatives exist), and a pool of ~240 passages."""
    beir = shared_data / "beir" / "msmarco-subset"
    corpus = {}
    with open(beir / "corpus.jsonl", encoding="utf-8") as f:
        for line in f:
            r = json.loads(line)
            corpus[r["_id"]] = f"{r['title']} {r['text']}".strip()
    queries = {}
    with open(beir / "queries.jsonl", encoding="utf-8") as f:
        for line in f:
            r = json.loads(line)
            queries[r["_id"]] = r["text"]
    rel = collections.defaultdict(list)
    for line in (beir / "qrels" / "test.tsv").read_text().splitlines():
        q, c, s = line.split()
        if int(s) >= 2 and c in corpus:
            rel[q].append(c)
    qids = [q for q in queries if len(rel[q]) >= 2][:8]
    train = [{"query": queries[q], "pos": [corpus[c] for c in rel[q][:2]], "type": "normal"} for q in qids]
    relevant = [c for q in qids for c in rel[q][:8]]
    pool = list(dict.fromkeys(relevant + list(corpus)[:200]))
    root = tmp_path_factory.mktemp("mining")
    _write(root / "train.jsonl", train)
    _write(root / "pool.jsonl", [{"text": corpus[c], "id": c} for c in pool])
    return {"root": root, "train": root / "train.jsonl", "pool": root / "pool.jsonl",
            "pool_texts": [corpus[c] for c in pool], "lines": train}


@pytest.fixture(scope="module")
def first_run(ray_local, msmarco_slice):
    """The mining job script's main() (arguments as FlagEmbedding users pass them), with a cache."""
    root = msmarco_slice["root"]
    job = _load_job("mine_hard_negatives")
    argv = [
        "--input_file", str(msmarco_slice["train"]), "--output_file", str(root / "mined.jsonl"),
        "--candidate_pool", str(msmarco_slice["pool"]), "--range_for_sampling", "3-40",
        "--negative_number", "5", "--max_passage_length", str(MAX_LEN), "--max_query_length", str(MAX_LEN),
        "--batch_size", "64", "--search_batch_size", "3", "--embedding_cache", str(root / "cache"), "--seed", "7",
    ]
    assert job.main(argv) == 0
    return root / "mined.jsonl"


def _no_embedding(*args, **kwargs):
    raise AssertionError("embedded again despite the cache")


@pytest.fixture(scope="module")
def direct_scores(first_run, msmarco_slice):
    """query x pool similarities from the vectors the first run cached (read back without embedding)."""
    spec = replace(SPEC, extra={"query_max_length": MAX_LEN})
    groups = {"passage": msmarco_slice["pool_texts"], "query": [r["query"] for r in msmarco_slice["lines"]]}
    vectors, _ = embed_with_cache(groups, spec, str(msmarco_slice["root"] / "cache"), _no_embedding)
    return vectors["query"] @ vectors["passage"].T, vectors


def _rank_interval(row: np.ndarray, j: int) -> tuple[int, int]:
    """Ranks passage j could hold given float noise: (#clearly above, #above-or-tied)."""
    return int((row > row[j] + EPS).sum()), int((row > row[j] - EPS).sum())


def test_negatives_come_from_the_rank_range(first_run, msmarco_slice, direct_scores):
    pool = msmarco_slice["pool_texts"]
    where = {t: i for i, t in enumerate(pool)}
    out = _lines(first_run)
    assert len(out) == len(msmarco_slice["lines"])
    for i, (src, got) in enumerate(zip(msmarco_slice["lines"], out, strict=True)):
        assert got["query"] == src["query"] and got["pos"] == src["pos"] and got["type"] == "normal"
        assert len(got["neg"]) == 5 and len(set(got["neg"])) == 5
        assert not set(got["neg"]) & set(src["pos"]), "a positive was mined as a negative"
        for neg in got["neg"]:
            lo, hi = _rank_interval(direct_scores[0][i], where[neg])
            assert lo <= 39 and hi >= 3, f"line {i}: negative ranked {lo}..{hi}, outside [3, 40)"


def test_cache_reused_and_output_deterministic(first_run, msmarco_slice):
    """A second run with other chunking reads every vector from the cache and writes the same file."""
    root = msmarco_slice["root"]

    result = mine_hard_negatives(
        str(msmarco_slice["train"]), str(root / "again.jsonl"), SPEC,
        MineConfig(range_for_sampling="3-40", negative_number=5, search_batch_size=64, seed=7),
        candidate_pool=str(msmarco_slice["pool"]), query_max_length=MAX_LEN,
        embedding_cache=str(root / "cache"), embed_fn=_no_embedding,
    )
    assert result.passages.embedded == result.queries.embedded == 0
    assert result.passages.cached == len(msmarco_slice["pool_texts"]) and result.queries.cached == 8
    assert (root / "again.jsonl").read_bytes() == first_run.read_bytes()

    other_seed = mine_hard_negatives(
        str(msmarco_slice["train"]), str(root / "seed8.jsonl"), SPEC,
        MineConfig(range_for_sampling="3-40", negative_number=5, seed=8),
        candidate_pool=str(msmarco_slice["pool"]), query_max_length=MAX_LEN,
        embedding_cache=str(root / "cache"), embed_fn=_no_embedding,
    )
    assert other_seed.negatives == 40 and (root / "seed8.jsonl").read_bytes() != first_run.read_bytes()

    # Teacher scores of the old negatives go with them; everything else is kept.
    scored = _write(root / "scored_input.jsonl", [
        dict(r, neg=["old negative"], neg_scores=[0.5], pos_scores=[1.0] * len(r["pos"]))
        for r in msmarco_slice["lines"]
    ])
    result = mine_hard_negatives(
        str(scored), str(root / "rescored.jsonl"), SPEC, MineConfig(range_for_sampling="3-40", negative_number=5, seed=7),
        candidate_pool=str(msmarco_slice["pool"]), query_max_length=MAX_LEN,
        embedding_cache=str(root / "cache"), embed_fn=_no_embedding,
    )
    assert result.stale_scores_dropped == 8
    for got, first in zip(_lines(root / "rescored.jsonl"), _lines(first_run), strict=True):
        assert "neg_scores" not in got and got["pos_scores"] == [1.0, 1.0] and got["neg"] == first["neg"]

    # Another passage length is another passage cache key; the query vectors stay valid.
    calls = []
    with pytest.raises(AssertionError):
        mine_hard_negatives(
            str(msmarco_slice["train"]), str(root / "len32.jsonl"), EmbedderSpec(max_length=32),
            candidate_pool=str(msmarco_slice["pool"]), query_max_length=MAX_LEN,
            embedding_cache=str(root / "cache"), embed_fn=lambda *a, **k: calls.append(a) or _no_embedding(),
        )
    ids, texts, roles, spec = calls[0]
    assert set(roles) == {"passage"} and len(texts) == len(msmarco_slice["pool_texts"]) and spec.max_length == 32


@pytest.mark.parametrize("ratio,margin", [(0.9, None), (None, 0.05)])
def test_score_filter_drops_near_positive_candidates(first_run, msmarco_slice, direct_scores, ratio, margin):
    root = msmarco_slice["root"]
    pool = msmarco_slice["pool_texts"]
    where = {t: i for i, t in enumerate(pool)}
    cfg = MineConfig(range_for_sampling="0-60", negative_number=5, max_score_ratio=ratio, min_margin=margin, seed=7)
    out_file = root / f"filtered-{ratio}-{margin}.jsonl"
    result = mine_hard_negatives(
        str(msmarco_slice["train"]), str(out_file), SPEC, cfg, candidate_pool=str(msmarco_slice["pool"]),
        query_max_length=MAX_LEN, embedding_cache=str(root / "cache"),
    )
    assert result.passages.embedded == 0, "the filter run should reuse the cached vectors"
    assert result.dropped_by_score > 0, "the slice should hold candidates close to the positives"
    for i, (src, got) in enumerate(zip(msmarco_slice["lines"], _lines(out_file), strict=True)):
        best = max(direct_scores[0][i][where[p]] for p in src["pos"])
        limit = min(x for x in (ratio * best if ratio else np.inf, best - margin if margin else np.inf))
        assert len(got["neg"]) == 5
        for neg in got["neg"]:
            assert direct_scores[0][i][where[neg]] <= limit + EPS
        # Every candidate in range that passes the filter was eligible; those above the limit never are.
        above = {pool[j] for j in np.argsort(-direct_scores[0][i])[:60] if direct_scores[0][i][j] > limit + EPS}
        assert not above & set(got["neg"])


def test_pool_on_the_cluster_gives_the_same_negatives(first_run, msmarco_slice, direct_scores, s3_server):
    """--pool_output s3://...: the embed job embeds and indexes the pool on the object store, searcher
    actors answer the query chunks, and the negatives are those the in-process search picks (score
    filter and random fill included, the fill's scores read back from the searchers)."""
    root = msmarco_slice["root"]
    bucket, pool_index = "pools", "auto"  # a flat index here; the IVF layout: tests/test_sharded_index.py
    s3_server.create_bucket(Bucket=bucket)
    cfg = MineConfig(range_for_sampling="0-60", negative_number=5, min_margin=0.05, search_batch_size=3, seed=7)
    kwargs = {"candidate_pool": str(msmarco_slice["pool"]), "query_max_length": MAX_LEN,
              "embedding_cache": str(root / "cache")}
    local = mine_hard_negatives(str(msmarco_slice["train"]), str(root / "local.jsonl"), SPEC, cfg, **kwargs)
    n_pool = len(msmarco_slice["pool_texts"])
    for run in range(2):
        out = root / f"cluster-{pool_index}-{run}.jsonl"
        result = mine_hard_negatives(
            str(msmarco_slice["train"]), str(out), SPEC, cfg, pool_output=f"s3://{bucket}/pools",
            pool_index=pool_index, num_searchers=2, embed_fn=_no_embedding, **kwargs,
        )
        # First run: the pool embedded by the job; the second reuses it (queries, positives: the cache).
        assert (result.passages.embedded, result.passages.cached) == ((n_pool, 8 * 2) if run == 0 else (0, n_pool + 16))
        assert result.dropped_by_score == local.dropped_by_score and result.negatives == local.negatives
        got, want = _lines(out), _lines(root / "local.jsonl")
        assert [g["neg"] for g in got] == [w["neg"] for w in want]
    keys = [o["Key"] for o in s3_server.list_objects_v2(Bucket=bucket, Prefix="pools/")["Contents"]]
    assert any(k.endswith("/manifest.json") for k in keys) and any(k.startswith("pools/inputs/") for k in keys)
    assert any(k.endswith("/index.faiss") for k in keys)


def test_select_negatives_follows_flagembedding_rules():
    ranked, scores = [5, 1, 2, 3, 4, -1, -1], [0.9, 0.8, 0.7, 0.6, 0.5, -np.inf, -np.inf]
    rng = __import__("random").Random(0)
    sel = select_negatives(ranked, scores, start=1, n=2, exclude={2}, threshold=None, rng=rng, corpus_size=6)
    assert len(sel.ids) == 2 and set(sel.ids) <= {1, 3, 4} and sel.from_range == 2
    # Fewer than n: range candidates in rank order, then fill from outside ranks [0, start), no repeats.
    sel = select_negatives(ranked, scores, start=1, n=4, exclude={2}, threshold=None, rng=rng, corpus_size=7)
    assert sel.ids[:3] == [1, 3, 4] and sel.ids[3] in {0, 6} and sel.from_range == 3
    sel = select_negatives(ranked, scores, start=1, n=4, exclude={2}, threshold=0.65, rng=rng, corpus_size=6,
                           score_of=lambda j: 0.0, random_fill=False)
    assert sel.ids == [3, 4] and sel.dropped_by_score == 1


def test_teacher_scores_match_flag_reranker(ray_local, msmarco_slice, tiny_xlmr_reranker, tmp_path):
    """Scores from a 2-actor pool equal FlagEmbedding's FlagReranker.compute_score on the same pairs."""
    from FlagEmbedding import FlagReranker as OracleReranker

    lines = [dict(r, neg=msmarco_slice["pool_texts"][10 + 3 * i : 13 + 3 * i], pos_scores=[0.0, 0.0])
             for i, r in enumerate(msmarco_slice["lines"][:4])]
    lines.append({"query": lines[0]["query"], "pos": lines[0]["pos"][:1]})  # no neg; a repeated pair
    src = _write(tmp_path / "mined.jsonl", lines)
    job = _load_job("score_teacher")
    argv = ["--input_file", str(src), "--output_file", str(tmp_path / "scored.jsonl"),
            "--reranker_name_or_path", str(tiny_xlmr_reranker), "--reranker_model_class", "encoder-only-base",
            "--reranker_max_length", "128", "--use_fp16", "False", "--num_actors", "2", "--rows_per_call", "4",
            "--normalize"]
    assert job.main(argv) == 0
    out = _lines(tmp_path / "scored.jsonl")
    oracle = OracleReranker(str(tiny_xlmr_reranker), use_fp16=False, devices="cpu", max_length=128)
    for src_line, got in zip(lines, out, strict=True):
        assert got["pos"] == src_line["pos"] and got.get("neg") == src_line.get("neg")
        assert len(got["pos_scores"]) == len(got["pos"]) and len(got["neg_scores"]) == len(got.get("neg", []))
        pairs = [(got["query"], p) for p in got["pos"] + got.get("neg", [])]
        want = oracle.compute_score(pairs, normalize=True)
        np.testing.assert_allclose(got["pos_scores"] + got["neg_scores"], want, atol=1e-5)
    assert len({s for line in out for s in line["pos_scores"] + line["neg_scores"]}) > 5, "scores all alike"


BAD_LINES = [
    ('{"query": "q", "pos": ["p"]}\n{"query": "q", "pos": ["p"]\n', r"bad\.jsonl:2: not valid JSON"),
    ('{"query": "q", "pos": ["p"]}\n\n{"pos": ["p"]}\n', r"bad\.jsonl:3: missing 'query'"),
    ('{"query": "q", "neg": ["p"]}\n', r"bad\.jsonl:1: missing 'pos'"),
    ('{"query": "q", "pos": "p"}\n', r"bad\.jsonl:1: 'pos' must be a list of strings"),
    ('{"query": "q", "pos": ["p"], "neg": ["n", 3]}\n', r"bad\.jsonl:1: neg\[1\] must be a string"),
    ('{"query": 5, "pos": ["p"]}\n', r"bad\.jsonl:1: 'query' must be a string"),
    ('["q", "p"]\n', r"bad\.jsonl:1: expected a JSON object"),
]


@pytest.mark.parametrize("text,message", BAD_LINES)
def test_bad_input_names_file_and_line(tmp_path, text, message):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(text, encoding="utf-8")
    with pytest.raises(TrainingDataError, match=message):
        read_training_jsonl(str(bad))
    # Both jobs fail on it before loading any model, and leave no output.
    with pytest.raises(TrainingDataError, match=message):
        mine_hard_negatives(str(bad), str(tmp_path / "out.jsonl"), SPEC)
    with pytest.raises(TrainingDataError, match=message):
        add_teacher_scores(str(bad), str(tmp_path / "out.jsonl"), RerankerSpec(model="unused"))
    assert not (tmp_path / "out.jsonl").exists()


def test_bad_candidate_pool_and_range(tmp_path):
    train = _write(tmp_path / "t.jsonl", [{"query": "q", "pos": ["p"]}])
    pool = _write(tmp_path / "pool.jsonl", ['{"text": "a"}', '{"title": "b"}'])
    with pytest.raises(TrainingDataError, match=r"pool\.jsonl:2: missing 'text'"):
        mine_hard_negatives(str(train), str(tmp_path / "o.jsonl"), SPEC, candidate_pool=str(pool))
    for bad in ("10", "20-10", "a-b"):
        with pytest.raises(ValueError, match="range_for_sampling"):
            mine_hard_negatives(str(train), str(tmp_path / "o.jsonl"), SPEC, MineConfig(range_for_sampling=bad))


# FlagEmbedding's hard-negative miner is a repository script (scripts/hn_mine.py), not part of its PyPI
# package: the candidate comparison reads it from a clone of the repository.
FLAGEMBEDDING_REPO = Path(os.environ.get("BGE_RAY_FLAGEMBEDDING_REPO", "/work/.mirror/FlagOpen+FlagEmbedding/repo"))


def _oracle_model():
    from FlagEmbedding import FlagAutoModel as OracleAutoModel

    from bge_ray.models.loading import bundled_model_path

    return OracleAutoModel.from_finetuned(
        bundled_model_path(), model_class="encoder-only-base", pooling_method="mean", use_fp16=False,
        devices="cpu", query_max_length=MAX_LEN, passage_max_length=MAX_LEN,
    )


def test_vectors_match_flagembedding(direct_scores, msmarco_slice):
    """FlagEmbedding's FlagAutoModel as the oracle for the vectors the actor pool made (queries through
    encode_queries)."""
    oracle_model = _oracle_model()
    vectors = direct_scores[1]
    queries = [r["query"] for r in msmarco_slice["lines"]]
    np.testing.assert_allclose(vectors["query"], oracle_model.encode_queries(queries), atol=1e-5)
    np.testing.assert_allclose(vectors["passage"][::12], oracle_model.encode(msmarco_slice["pool_texts"][::12]),
                               atol=1e-5)


def _hn_mine_source() -> str:
    for run in (["git", "-C", str(FLAGEMBEDDING_REPO), "show", "HEAD:scripts/hn_mine.py"],
                ["cat", str(FLAGEMBEDDING_REPO / "scripts" / "hn_mine.py")]):
        done = subprocess.run(run, capture_output=True, text=True)
        if done.returncode == 0:
            return done.stdout
    pytest.skip(f"scripts/hn_mine.py is not in FlagEmbedding's PyPI package and no clone of its repository "
                f"is at {FLAGEMBEDDING_REPO} (set BGE_RAY_FLAGEMBEDDING_REPO)")


def test_candidates_match_flagembedding_find_knn_neg(direct_scores, msmarco_slice, tmp_path):
    """FlagEmbedding's own find_knn_neg (scripts/hn_mine.py) as the oracle for the mined candidates.

    With negative_number >= the range size nothing is sampled, so both sides keep every candidate in
    rank order; FlagEmbedding then appends random fill, which ours is told to skip here. direct_scores
    filled the embedding cache that the mining run reads (its embed_fn refuses work).
    """
    source = _hn_mine_source()
    oracle_model = _oracle_model()
    script = tmp_path / "hn_mine_oracle.py"
    script.write_text(source, encoding="utf-8")
    spec = importlib.util.spec_from_file_location("hn_mine_oracle", script)
    hn_mine = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(hn_mine)
    pool = [json.loads(x)["text"] for x in msmarco_slice["pool"].read_text(encoding="utf-8").splitlines()]
    theirs_file, ours_file = tmp_path / "theirs.jsonl", tmp_path / "ours.jsonl"
    hn_mine.find_knn_neg(oracle_model, str(msmarco_slice["train"]), str(theirs_file), candidate_pool=pool,
                         sample_range=[3, 40], negative_number=37)
    mine_hard_negatives(
        str(msmarco_slice["train"]), str(ours_file), SPEC,
        MineConfig(range_for_sampling="3-40", negative_number=37, random_fill=False),
        candidate_pool=str(msmarco_slice["pool"]), query_max_length=MAX_LEN,
        embedding_cache=str(msmarco_slice["root"] / "cache"), embed_fn=_no_embedding,
    )
    for theirs, ours in zip(_lines(theirs_file), _lines(ours_file), strict=True):
        assert len(theirs["neg"]) == 37 and 30 <= len(ours["neg"]) <= 37
        head = theirs["neg"][: len(ours["neg"])]
        # Rank order may swap near-ties (float noise between two encoders); the sets must agree.
        assert set(head) == set(ours["neg"])
        assert sum(a == b for a, b in zip(head, ours["neg"], strict=True)) >= len(head) - 4
