"""Evaluation datasets: local folders in either layout, the benchmarks FlagEmbedding evaluates, and
checks of qrels against corpus and queries.

Two on-disk layouts are read:

* BEIR: ``corpus.jsonl`` (``_id``, ``title``, ``text``), ``queries.jsonl`` (``_id``, ``text``),
  ``qrels/{split}.tsv`` (``query-id corpus-id score``, header optional). A split's queries are those
  its qrels name (BEIR's convention).
* FlagEmbedding's (its ``custom`` evaluation and every download it caches): ``corpus.jsonl``
  (``id``, ``title``, ``text``), ``{split}_queries.jsonl`` (``id``, ``text``),
  ``{split}_qrels.jsonl`` (``qid``, ``docid``, ``relevance``; MKQA: ``qid``, ``answers``).

Named benchmarks (``beir``, ``msmarco``, ``miracl``, ``mkqa``, ``mldr``, ``air_bench``, ``bright_short``,
``bright_long``) read the same
folders under ``dataset_dir/<name>`` and, when the files are missing, download them from the
Hugging Face hub (or the benchmark's own URLs) and save them there in FlagEmbedding's layout.
"""

from __future__ import annotations

import csv
import glob
import gzip
import json
import logging
import os
import shutil
import urllib.request
import zipfile
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field

from bge_ray.io.atomic import atomic_path
from bge_ray.io.jsonl import json_lines

from . import air_bench_tasks
from .beir import read_qrels
from .instructions import BRIGHT_LONG_INSTRUCTIONS, BRIGHT_SHORT_INSTRUCTIONS

logger = logging.getLogger(__name__)

HF_ENDPOINT = os.environ.get("HF_ENDPOINT", "https://huggingface.co")


class DatasetError(ValueError):
    """A dataset, split or file that is missing, empty or malformed; the message names it."""


# -- reading files ---------------------------------------------------------------------------------
def _json_lines(path: str) -> Iterator[tuple[int, dict]]:
    return json_lines(path, DatasetError)


def _field(row: dict, names: Sequence[str], path: str, n: int) -> str:
    for name in names:
        if row.get(name) is not None:
            return str(row[name])
    raise DatasetError(f"{path}:{n}: missing field {' or '.join(repr(x) for x in names)} (keys: {sorted(row)})")


def passage_text(row: dict) -> str:
    """BEIR / FlagEmbedding convention: ``title + " " + text`` when a title is present."""
    title, text = (row.get("title") or "").strip(), (row.get("text") or "").strip()
    return f"{title} {text}".strip() if title else text


def read_corpus(path: str) -> dict[str, str]:
    """``{doc id: passage text}`` from a corpus jsonl (``_id`` or ``id``, ``title``, ``text``)."""
    if not os.path.isfile(path):
        raise DatasetError(f"corpus file {path} does not exist")
    corpus: dict[str, str] = {}
    for n, row in _json_lines(path):
        doc_id = _field(row, ("_id", "id", "docid"), path, n)
        if row.get("text") is None and row.get("title") is None:
            raise DatasetError(f"{path}:{n}: document {doc_id!r} has neither 'text' nor 'title'")
        if doc_id in corpus:
            raise DatasetError(f"{path}:{n}: duplicate document id {doc_id!r}")
        corpus[doc_id] = passage_text(row)
    if not corpus:
        raise DatasetError(f"corpus file {path} holds no documents")
    return corpus


def read_queries(path: str) -> dict[str, str]:
    """``{query id: text}`` from a queries jsonl (``_id`` or ``id``, ``text``)."""
    queries: dict[str, str] = {}
    for n, row in _json_lines(path):
        qid = _field(row, ("_id", "id", "qid"), path, n)
        queries[qid] = _field(row, ("text", "query"), path, n)
    return queries


def read_qrels_jsonl(path: str) -> tuple[dict[str, dict[str, int]], dict[str, list[str]]]:
    """FlagEmbedding's ``{split}_qrels.jsonl``: ``(qrels, answers)``; MKQA rows carry ``answers``."""
    qrels: dict[str, dict[str, int]] = {}
    answers: dict[str, list[str]] = {}
    for n, row in _json_lines(path):
        qid = _field(row, ("qid", "query-id", "query_id"), path, n)
        if "answers" in row:
            if not isinstance(row["answers"], list):
                raise DatasetError(f"{path}:{n}: 'answers' must be a list of strings")
            answers[qid] = [str(a) for a in row["answers"]]
            continue
        docid = _field(row, ("docid", "corpus-id", "doc_id"), path, n)
        try:
            rel = int(float(_field(row, ("relevance", "score"), path, n)))
        except ValueError:
            raise DatasetError(f"{path}:{n}: relevance {row.get('relevance', row.get('score'))!r} is not a number") from None
        qrels.setdefault(qid, {})[docid] = rel
    return qrels, answers


# -- folders -----------------------------------------------------------------------------------------
BEIR_LAYOUT, FLAG_LAYOUT = "beir", "flag"


def detect_layout(folder: str) -> str | None:
    """``"beir"``, ``"flag"`` or None: which layout ``folder`` holds (by its query / qrels files)."""
    if os.path.isdir(os.path.join(folder, "qrels")) or os.path.isfile(os.path.join(folder, "queries.jsonl")):
        return BEIR_LAYOUT
    if glob.glob(os.path.join(folder, "*_qrels.jsonl")) or glob.glob(os.path.join(folder, "*_queries.jsonl")):
        return FLAG_LAYOUT
    return None


def folder_splits(folder: str) -> list[str]:
    """The splits a local folder holds (by its qrels files)."""
    layout = detect_layout(folder)
    if layout == BEIR_LAYOUT:
        return sorted(os.path.basename(p)[: -len(".tsv")] for p in glob.glob(os.path.join(folder, "qrels", "*.tsv")))
    if layout == FLAG_LAYOUT:
        return sorted(os.path.basename(p)[: -len("_qrels.jsonl")] for p in glob.glob(os.path.join(folder, "*_qrels.jsonl")))
    return []


def local_dataset_names(dataset_dir: str) -> list[str]:
    """Sub-folders of ``dataset_dir`` holding a dataset (one level deeper too, e.g. ``cqadupstack/android``)."""
    if not dataset_dir or not os.path.isdir(dataset_dir):
        return []
    names = []
    for entry in sorted(os.listdir(dataset_dir)):
        path = os.path.join(dataset_dir, entry)
        if not os.path.isdir(path) or entry.startswith("."):
            continue
        if detect_layout(path):
            names.append(entry)
        else:
            names += [f"{entry}/{sub}" for sub in sorted(os.listdir(path)) if detect_layout(os.path.join(path, sub))]
    return names


@dataclass
class SplitData:
    """One dataset split, validated: what the runner searches and scores."""

    dataset: str
    split: str
    corpus_file: str
    queries: dict[str, str]
    qrels: dict[str, dict[str, int]]
    answers: dict[str, list[str]] | None = None  # MKQA: per query, answer strings (qa_recall)
    issues: dict[str, int] = field(default_factory=dict)  # counted problems (warned, not fatal)
    issue_examples: dict[str, list[str]] = field(default_factory=dict)
    # BRIGHT: per query, documents removed from its ranking before scoring (its excluded_ids)
    excluded: dict[str, set[str]] | None = None


def load_split(folder: str, split: str, corpus_ids: Iterable[str], dataset: str, corpus_file: str) -> SplitData:
    """Read and check one split of a local folder (either layout).

    Qrels naming unknown query ids are dropped, qrels naming unknown document ids are kept (they
    count against recall, as in FlagEmbedding and BEIR); both are warned about and counted. A split
    with no qrels, or no query left to evaluate, is an error naming the file.
    """
    layout = detect_layout(folder)
    available = folder_splits(folder)
    if layout is None:
        raise DatasetError(f"{folder} holds no dataset: expected BEIR files (queries.jsonl, qrels/{{split}}.tsv) "
                           f"or FlagEmbedding files ({{split}}_queries.jsonl, {{split}}_qrels.jsonl)")
    if split not in available:
        raise DatasetError(f"split {split!r} of {dataset} not found in {folder}; available splits: {available or 'none'}")
    answers: dict[str, list[str]] = {}
    if layout == BEIR_LAYOUT:
        qrels_file = os.path.join(folder, "qrels", f"{split}.tsv")
        qrels = read_qrels(qrels_file)
        all_queries = read_queries(os.path.join(folder, "queries.jsonl"))
        queries = {q: all_queries[q] for q in qrels if q in all_queries}
        unknown_q = [q for q in qrels if q not in all_queries]
    else:
        qrels_file = os.path.join(folder, f"{split}_qrels.jsonl")
        queries_file = os.path.join(folder, f"{split}_queries.jsonl")
        if not os.path.isfile(queries_file):
            raise DatasetError(f"split {split!r} of {dataset}: {queries_file} does not exist")
        qrels, answers = read_qrels_jsonl(qrels_file)
        queries = read_queries(queries_file)
        if not queries:
            raise DatasetError(f"split {split!r} of {dataset} is empty: {queries_file} holds no queries")
        unknown_q = [q for q in (*qrels, *answers) if q not in queries]
    if not qrels and not answers:
        raise DatasetError(f"split {split!r} of {dataset} is empty: {qrels_file} holds no qrels rows")

    corpus_ids = corpus_ids if isinstance(corpus_ids, (set, dict)) else set(corpus_ids)
    issues: dict[str, int] = {}
    examples: dict[str, list[str]] = {}
    if unknown_q:
        issues["qrels_unknown_query_ids"] = len(unknown_q)
        examples["qrels_unknown_query_ids"] = unknown_q[:10]
        for q in unknown_q:
            qrels.pop(q, None)
            answers.pop(q, None)
        logger.warning("%s %s: %d qrels query ids are not among the queries (ignored), e.g. %s",
                       dataset, split, len(unknown_q), unknown_q[:5])
    unknown_d = [(q, d) for q, docs in qrels.items() for d in docs if d not in corpus_ids]
    if unknown_d:
        issues["qrels_unknown_doc_ids"] = len(unknown_d)
        examples["qrels_unknown_doc_ids"] = [f"{q}:{d}" for q, d in unknown_d[:10]]
        logger.warning("%s %s: %d qrels rows name documents missing from the corpus (kept: they count as "
                       "not retrieved), e.g. %s", dataset, split, len(unknown_d), examples["qrels_unknown_doc_ids"][:5])
    judged = set(qrels) | set(answers)
    if not any(q in judged for q in queries):
        raise DatasetError(f"split {split!r} of {dataset} is empty: no query in {folder} has qrels "
                           f"({len(queries)} queries, {len(judged) + len(unknown_q)} judged query ids)")
    no_qrels = sum(q not in judged for q in queries)
    if no_qrels:
        issues["queries_without_qrels"] = no_qrels
    return SplitData(dataset, split, corpus_file, queries, qrels, answers or None, issues, examples)


# -- downloads (run where a hub is reachable) ------------------------------------------------------
def _write_jsonl(path: str, rows: Iterable[dict]) -> int:
    n = 0
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
            n += 1
    logger.info("wrote %d rows to %s", n, path)
    return n


def _hf_dataset(repo: str, config: str | None, split: str, cache_dir: str | None, token: str | None, force: bool):
    """``datasets.load_dataset`` with an error that says what was being fetched and why it failed."""
    import datasets

    try:
        return datasets.load_dataset(
            repo, config, split=split, cache_dir=cache_dir, token=token,
            download_mode="force_redownload" if force else None,
        )
    except Exception as exc:  # noqa: BLE001 - the hub raises many kinds; re-raised with context
        raise DatasetError(
            f"could not load {repo}{'/' + config if config else ''} split {split!r} from the Hugging Face hub "
            f"({type(exc).__name__}: {exc}); without hub access, put the files in the local folder instead"
        ) from exc


def _download(url: str, cache_dir: str, force: bool = False) -> str:
    """``url`` saved under ``cache_dir`` (kept for the next run); ``.gz`` files are decompressed."""
    os.makedirs(cache_dir, exist_ok=True)
    name = url.rstrip("/").split("/")[-1]
    path = os.path.join(cache_dir, name)
    final = path[:-3] if name.endswith(".gz") else path
    if os.path.exists(final) and os.path.getsize(final) > 0 and not force:
        return final
    logger.info("downloading %s", url)
    try:
        with urllib.request.urlopen(url, timeout=60) as resp, atomic_path(path) as tmp, open(tmp, "wb") as f:
            shutil.copyfileobj(resp, f)
    except OSError as exc:
        raise DatasetError(f"could not download {url} ({type(exc).__name__}: {exc}); without network access, "
                           f"put the files in the local folder instead") from exc
    if name.endswith(".gz"):
        with gzip.open(path, "rb") as src, atomic_path(final) as tmp, open(tmp, "wb") as dst:
            shutil.copyfileobj(src, dst)
        os.unlink(path)
    return final


def _trec_qrels(path: str) -> dict[str, dict[str, int]]:
    """``qid Q0 docid rel`` (space or tab separated) -> qrels."""
    qrels: dict[str, dict[str, int]] = {}
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            parts = line.split()
            if not parts:
                continue
            if len(parts) != 4:
                raise DatasetError(f"{path}:{n}: expected 'qid Q0 docid relevance', got {line.strip()!r}")
            qrels.setdefault(parts[0], {})[parts[2]] = int(parts[3])
    return qrels


def _tsv_queries(path: str) -> dict[str, str]:
    with open(path, encoding="utf-8", newline="") as f:
        return {row[0]: row[1] for row in csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE) if len(row) >= 2}


def _save_qrels(save_dir: str, split: str, qrels: dict[str, dict[str, int]]) -> None:
    _write_jsonl(os.path.join(save_dir, f"{split}_qrels.jsonl"),
                 ({"qid": q, "docid": d, "relevance": r} for q, docs in qrels.items() for d, r in docs.items()))


def _save_queries(save_dir: str, split: str, queries: dict[str, str], keep: Iterable[str] | None = None) -> None:
    keep = set(keep) if keep is not None else None
    _write_jsonl(os.path.join(save_dir, f"{split}_queries.jsonl"),
                 ({"id": q, "text": t} for q, t in queries.items() if keep is None or q in keep))


# -- benchmarks --------------------------------------------------------------------------------------
class Benchmark:
    """A family of datasets FlagEmbedding evaluates: its names, splits and download code."""

    eval_name = "custom"
    names: tuple[str, ...] = ()  # downloadable dataset names ((): local folders only)
    shared_corpus = False  # one corpus.jsonl in dataset_dir for every name (MKQA)

    def __init__(self, dataset_dir: str | None = None, cache_dir: str | None = None, token: str | None = None,
                 force_redownload: bool = False):
        self.dataset_dir = dataset_dir
        self.cache_dir = cache_dir or os.path.join(os.path.expanduser("~"), ".cache", "bge_ray", "eval")
        self.token = token if token is not None else os.environ.get("HF_TOKEN")
        self.force = force_redownload

    # names and folders
    def splits(self, name: str | None) -> list[str] | None:
        """Splits the benchmark defines for ``name``; None: whatever the local folder holds."""
        return None

    def check_name(self, name: str) -> None:
        """Raise unless ``name`` is a local folder or a downloadable name."""
        local = local_dataset_names(self.dataset_dir) if self.dataset_dir else []
        expanded = [x for x in local if x == name or x.startswith(name + "/")]
        if expanded or self.valid_remote_name(name):
            return
        where = f"in {self.dataset_dir}" if self.dataset_dir else "(no dataset_dir given)"
        msg = f"dataset {name!r} not found {where}; local datasets: {local or 'none'}"
        if self.names:
            msg += f"; {self.eval_name} can download: {list(self.names)}"
        raise DatasetError(msg)

    def valid_remote_name(self, name: str) -> bool:
        return name in self.names

    def default_names(self) -> list[str | None]:
        """What to evaluate when no dataset_names are given (FlagEmbedding: all of them)."""
        if self.dataset_dir and detect_layout(self.dataset_dir):
            return [None]
        local = local_dataset_names(self.dataset_dir) if self.dataset_dir else []
        if local:
            return list(local)
        if self.names:
            return list(self.names)
        raise DatasetError(f"dataset_dir {self.dataset_dir!r} holds no dataset: expected corpus.jsonl with BEIR "
                           f"(queries.jsonl, qrels/{{split}}.tsv) or FlagEmbedding ({{split}}_queries.jsonl, "
                           f"{{split}}_qrels.jsonl) files, in it or in its sub-folders")

    def expand(self, name: str) -> list[str]:
        """``cqadupstack`` -> its local sub-datasets; other names as they are."""
        local = local_dataset_names(self.dataset_dir) if self.dataset_dir else []
        if name in local:
            return [name]
        subs = [x for x in local if x.startswith(name + "/")]
        return subs or [name]

    def folder(self, name: str | None) -> str:
        if name is None:
            return self.dataset_dir
        root = self.dataset_dir or os.path.join(self.cache_dir, self.eval_name)
        return os.path.join(root, name)

    def corpus_file(self, name: str | None) -> str:
        folder = self.folder(name)
        if self.shared_corpus and name is not None:
            own = os.path.join(folder, "corpus.jsonl")
            return own if os.path.isfile(own) else os.path.join(os.path.dirname(folder), "corpus.jsonl")
        return os.path.join(folder, "corpus.jsonl")

    def ensure(self, name: str | None, splits: Sequence[str]) -> list[str]:
        """Make sure the local files exist (downloading what is missing); return the splits to run.

        A requested split the dataset does not have is skipped with a warning, as in FlagEmbedding,
        unless none of the requested splits exists: that is an error listing the available ones.
        """
        folder = self.folder(name)
        local = folder_splits(folder) if os.path.isdir(folder) else []
        available = sorted(set(self.splits(name) or []) | set(local))
        display = name or folder
        wanted = [s for s in splits if s in available]
        for s in splits:
            if s not in wanted:
                logger.warning("%s has no split %r; skipping it", display, s)
        if not wanted:
            raise DatasetError(f"none of the splits {list(splits)} exists for {display} (folder {folder}); "
                               f"available splits: {available or 'none'}")
        if name is not None and self.valid_remote_name(name):
            corpus = self.corpus_file(name)
            if self.force or not os.path.isfile(corpus):
                self.download_corpus(name, os.path.dirname(corpus))
            for s in wanted:
                if self.force or s not in folder_splits(folder):
                    self.download_split(name, s, folder)
        return wanted

    def load(self, name: str | None, split: str, corpus_ids: Iterable[str]) -> SplitData:
        return load_split(self.folder(name), split, corpus_ids, name or os.path.basename(os.path.abspath(self.folder(name))),
                          self.corpus_file(name))

    # downloads (FlagEmbedding layout)
    def download_corpus(self, name: str, save_dir: str) -> None:
        raise DatasetError(f"{self.eval_name} cannot download {name!r}; put its files in {save_dir}")

    def download_split(self, name: str, split: str, save_dir: str) -> None:
        raise DatasetError(f"{self.eval_name} cannot download {name!r} split {split!r}; put its files in {save_dir}")

    def _hf(self, repo: str, config: str | None, split: str):
        return _hf_dataset(repo, config, split, os.path.join(self.cache_dir, "hf"), self.token, self.force)

    def _url(self, url: str) -> str:
        return _download(url, os.path.join(self.cache_dir, "files", self.eval_name), self.force)


class CustomBenchmark(Benchmark):
    """Local folders only (FlagEmbedding's ``custom`` evaluation; BEIR-format folders too)."""


BEIR_NAMES = ("arguana", "climate-fever", "cqadupstack", "dbpedia-entity", "fever", "fiqa", "hotpotqa", "msmarco",
              "nfcorpus", "nq", "quora", "scidocs", "scifact", "trec-covid", "webis-touche2020")
CQADUPSTACK = ("android", "english", "gaming", "gis", "mathematica", "physics", "programmers", "stats", "tex",
               "unix", "webmasters", "wordpress")

#: Per-dataset query instructions FlagEmbedding's BEIR evaluation uses with ``use_special_instructions``.
BEIR_INSTRUCTIONS = {
    "dbpedia-entity": "Given a query, retrieve relevant entity descriptions from DBPedia.",
    "arguana": "Given a claim, find documents that refute the claim.",
    "climate-fever": "Given a claim about climate change, retrieve documents that support or refute the claim.",
    "cqadupstack": "Given a question, retrieve detailed question descriptions from Stackexchange that are "
                   "duplicates to the given question.",
    "fever": "Given a claim, retrieve documents that support or refute the claim.",
    "fiqa": "Given a financial question, retrieve user replies that best answer the question.",
    "hotpotqa": "Given a multi-hop question, retrieve documents that can help answer the question.",
    "msmarco": "Given a web search query, retrieve relevant passages that answer the query.",
    "nfcorpus": "Given a question, retrieve relevant documents that best answer the question.",
    "nq": "Given a question, retrieve Wikipedia passages that answer the question.",
    "quora": "Given a question, retrieve questions that are semantically equivalent to the given question.",
    "scidocs": "Given a scientific paper title, retrieve paper abstracts that are cited by the given paper.",
    "scifact": "Given a scientific claim, retrieve documents that support or refute the claim.",
    "webis-touche2020": "Given a question, retrieve detailed and persuasive arguments that answer the question.",
    "trec-covid": "Given a query on COVID-19, retrieve documents that answer the query.",
}


class BeirBenchmark(Benchmark):
    """BEIR: ``BeIR/{name}`` on the hub (cqadupstack: the BEIR zip, one folder per forum)."""

    eval_name = "beir"
    names = BEIR_NAMES
    ZIP_URL = "https://public.ukp.informatik.tu-darmstadt.de/thakur/BEIR/datasets/{}.zip"

    def valid_remote_name(self, name: str) -> bool:
        return name in self.names or (name.startswith("cqadupstack/") and name.split("/", 1)[1] in CQADUPSTACK)

    def splits(self, name):
        if name is None or not self.valid_remote_name(name):
            return None
        return ["dev"] if name == "msmarco" else ["test"]

    def expand(self, name: str) -> list[str]:
        if name == "cqadupstack":
            return [f"cqadupstack/{sub}" for sub in CQADUPSTACK]
        return super().expand(name)

    def download_corpus(self, name, save_dir):
        if name.startswith("cqadupstack/"):
            return self._cqadupstack(name)
        rows = self._hf(f"BeIR/{name}", "corpus", "corpus")
        _write_jsonl(os.path.join(save_dir, "corpus.jsonl"),
                     ({"id": str(r["_id"]), "title": r["title"], "text": r["text"]} for r in rows))

    def download_split(self, name, split, save_dir):
        if name.startswith("cqadupstack/"):
            return self._cqadupstack(name)
        rows = self._hf(f"BeIR/{name}-qrels", None, "validation" if split == "dev" else split)
        qrels: dict[str, dict[str, int]] = {}
        for r in rows:
            qrels.setdefault(str(r["query-id"]), {})[str(r["corpus-id"])] = int(r["score"])
        queries = {str(r["_id"]): r["text"] for r in self._hf(f"BeIR/{name}", "queries", "queries")}
        _save_qrels(save_dir, split, qrels)
        _save_queries(save_dir, split, queries, keep=qrels)

    def _cqadupstack(self, name):
        """The BEIR zip holds BEIR-format folders: copy the forum's folder as it is."""
        sub = name.split("/", 1)[1]
        archive = self._url(self.ZIP_URL.format("cqadupstack"))
        extract = os.path.join(os.path.dirname(archive), "cqadupstack_unzipped")
        if not os.path.isdir(os.path.join(extract, "cqadupstack", sub)):
            with zipfile.ZipFile(archive) as z:
                z.extractall(extract)
        dst = self.folder(name)
        os.makedirs(os.path.dirname(dst), exist_ok=True)
        shutil.copytree(os.path.join(extract, "cqadupstack", sub), dst, dirs_exist_ok=True)


class MsmarcoBenchmark(Benchmark):
    """MS MARCO passage / document ranking: dev (sparse labels), TREC DL 2019 and 2020."""

    eval_name = "msmarco"
    names = ("passage", "document")
    BASE = "https://msmarco.z22.web.core.windows.net/msmarcoranking"
    TREC = "https://trec.nist.gov/data/deep"

    def splits(self, name):
        return ["dev", "dl19", "dl20"] if name in self.names else None

    def download_corpus(self, name, save_dir):
        if name == "passage":
            rows = self._hf("Tevatron/msmarco-passage-corpus", "default", "train")
            out = ({"id": str(r["docid"]), "title": r["title"], "text": r["text"]} for r in rows)
        else:
            rows = self._hf("irds/msmarco-document", "docs", "train")
            out = ({"id": str(r["doc_id"]), "title": r["title"], "text": r["body"]} for r in rows)
        _write_jsonl(os.path.join(save_dir, "corpus.jsonl"), out)

    def download_split(self, name, split, save_dir):
        year = {"dl19": "2019", "dl20": "2020"}.get(split)
        if name == "passage" and split == "dev":
            qrels: dict[str, dict[str, int]] = {}
            for r in self._hf("BeIR/msmarco-qrels", None, "validation"):
                qrels.setdefault(str(r["query-id"]), {})[str(r["corpus-id"])] = int(r["score"])
            queries = {str(r["_id"]): r["text"] for r in self._hf("BeIR/msmarco", "queries", "queries")}
        else:
            kind = "pass" if name == "passage" else "docs"
            qrels_url = (f"{self.TREC}/{year}qrels-{kind}.txt" if year
                         else f"{self.BASE}/msmarco-docdev-qrels.tsv.gz")
            queries_url = (f"{self.BASE}/msmarco-test{year}-queries.tsv.gz" if year
                           else f"{self.BASE}/msmarco-docdev-queries.tsv.gz")
            qrels = _trec_qrels(self._url(qrels_url))
            queries = _tsv_queries(self._url(queries_url))
        _save_qrels(save_dir, split, qrels)
        _save_queries(save_dir, split, queries, keep=qrels)


class MiraclBenchmark(Benchmark):
    """MIRACL: 18 languages; corpus from ``miracl/miracl-corpus``, topics and qrels from ``miracl/miracl``."""

    eval_name = "miracl"
    names = ("ar", "bn", "en", "es", "fa", "fi", "fr", "hi", "id", "ja", "ko", "ru", "sw", "te", "th", "zh", "de", "yo")

    def splits(self, name):
        if name not in self.names:
            return None
        return ["dev"] if name in ("de", "yo") else ["train", "dev"]

    def download_corpus(self, name, save_dir):
        rows = self._hf("miracl/miracl-corpus", name, "train")
        _write_jsonl(os.path.join(save_dir, "corpus.jsonl"),
                     ({"id": str(r["docid"]), "title": r["title"], "text": r["text"]} for r in rows))

    def download_split(self, name, split, save_dir):
        base = f"{HF_ENDPOINT}/datasets/miracl/miracl/resolve/main/miracl-v1.0-{name}"
        qrels = _trec_qrels(self._url(f"{base}/qrels/qrels.miracl-v1.0-{name}-{split}.tsv"))
        queries = _tsv_queries(self._url(f"{base}/topics/topics.miracl-v1.0-{name}-{split}.tsv"))
        _save_qrels(save_dir, split, qrels)
        _save_queries(save_dir, split, queries)


_MKQA_TRANSLATE = str.maketrans({
    **dict.fromkeys("\u0001\u0002\u0003\u0004\u0005\u0006\u0007\u0008\u000e\u000f\u0011\u0012\u0013\u0014"
                    "\u0015\u0016\u0017\u0018\u0019\u001a\u001b\u00ad", ""),
    **dict.fromkeys("\u000b\u000c\u0085", " "),
    **dict.fromkeys("\u2010\u2011\u2043\u2012\u2013\u2014\u2015\u2212\uff0d\u207b", "-"),
    **dict.fromkeys("\u201c\u201d\u201e\u201f", '"'),
    **dict.fromkeys("\u2019\u055a\ua78b\ua78c\uff07\u2018\u201a\u201b\u0060\u00b4\u2032\u2035", "'"),
    "\u2033": "''", "\u2036": "''", "\u2034": "'''", "\u2037": "'''", "\u2057": "''''", "\u2026": "...",
    **dict.fromkeys("\u2044\u2215", "/"),
})


def mkqa_normalize(text: str) -> str:
    """The MKQA corpus normalisation FlagEmbedding applies (dashes, quotes, primes, control characters)."""
    return text.translate(_MKQA_TRANSLATE).replace(" . . . ", " ... ")


class MkqaBenchmark(Benchmark):
    """MKQA: 26 languages over one English corpus (BEIR's NQ); judged by answers (qa_recall), not qrels."""

    eval_name = "mkqa"
    names = ("en", "ar", "fi", "ja", "ko", "ru", "es", "sv", "he", "th", "da", "de", "fr", "it", "nl", "pl", "pt", "hu",
             "vi", "ms", "km", "no", "tr", "zh_cn", "zh_hk", "zh_tw")
    shared_corpus = True
    ZIP = f"{HF_ENDPOINT}/datasets/Shitao/bge-m3-data/resolve/main/MKQA_test-data.zip"

    def splits(self, name):
        return ["test"] if name in self.names else None

    def download_corpus(self, name, save_dir):
        rows = self._hf("BeIR/nq", "corpus", "corpus")
        _write_jsonl(os.path.join(save_dir, "corpus.jsonl"), (
            {"id": str(r["_id"]), "title": mkqa_normalize(r["title"]).lower(), "text": mkqa_normalize(r["text"]).lower()}
            for r in rows))

    def download_split(self, name, split, save_dir):
        archive = self._url(self.ZIP)
        with zipfile.ZipFile(archive) as z:
            member = next((m for m in z.namelist() if m.endswith(f"/{name}.jsonl") or m == f"{name}.jsonl"), None)
            if member is None:
                raise DatasetError(f"{archive} has no {name}.jsonl")
            lines = [json.loads(x) for x in z.read(member).decode("utf-8").splitlines() if x.strip()]
        _write_jsonl(os.path.join(save_dir, f"{split}_qrels.jsonl"),
                     ({"qid": str(d["id"]), "answers": d["answers"]} for d in lines))
        _save_queries(save_dir, split, {str(d["id"]): d["question"] for d in lines})


class MldrBenchmark(Benchmark):
    """MLDR: long documents in 13 languages (``Shitao/MLDR``)."""

    eval_name = "mldr"
    names = ("ar", "de", "en", "es", "fr", "hi", "it", "ja", "ko", "pt", "ru", "th", "zh")

    def splits(self, name):
        return ["train", "dev", "test"] if name in self.names else None

    def download_corpus(self, name, save_dir):
        rows = self._hf("Shitao/MLDR", f"corpus-{name}", "corpus")
        _write_jsonl(os.path.join(save_dir, "corpus.jsonl"), ({"id": str(r["docid"]), "text": r["text"]} for r in rows))

    def download_split(self, name, split, save_dir):
        rows = self._hf("Shitao/MLDR", name, split)
        qrels: dict[str, dict[str, int]] = {}
        queries = {}
        for r in rows:
            qid = str(r["query_id"])
            queries[qid] = r["query"]
            judged = qrels.setdefault(qid, {})
            for d in r["positive_passages"]:
                judged[str(d["docid"])] = 1
            for d in r["negative_passages"]:
                judged[str(d["docid"])] = 0
        _save_qrels(save_dir, split, qrels)
        _save_queries(save_dir, split, queries)


class AirBenchBenchmark(Benchmark):
    """AIR-Bench: names ``{task_type}_{domain}_{language}_{dataset}`` (e.g. ``qa_wiki_en_default``,
    ``long-doc_arxiv_en_gpt3``) from ``AIR-Bench/{task_type}_{domain}_{language}``, each with the splits
    AIR-Bench's task table gives it (:mod:`bge_ray.eval.air_bench_tasks`); test qrels are gated (set
    HF_TOKEN). :meth:`select` picks datasets by task type, domain and language."""

    eval_name = "air_bench"
    TASK_TYPES = ("qa", "long-doc")

    def __init__(self, *args, benchmark_version: str = air_bench_tasks.LATEST_VERSION, **kwargs):
        super().__init__(*args, **kwargs)
        try:
            air_bench_tasks.version_table(benchmark_version)
        except air_bench_tasks.AirBenchError as exc:
            raise DatasetError(str(exc)) from None
        self.version = benchmark_version
        self.names = tuple(n for n, _ in air_bench_tasks.select(benchmark_version))

    @classmethod
    def parse(cls, name: str) -> tuple[str, str, str, str] | None:
        parts = name.split("_", 3)
        if len(parts) != 4 or parts[0] not in cls.TASK_TYPES or not all(parts):
            return None
        return parts[0], parts[1], parts[2], parts[3]

    def select(self, task_types=None, domains=None, languages=None, splits=None) -> list[str]:
        """Dataset names of the chosen task types / domains / languages having one of ``splits``
        (None: all), as AIR-Bench's own runner picks them."""
        try:
            return [n for n, _ in air_bench_tasks.select(self.version, task_types, domains, languages, splits)]
        except air_bench_tasks.AirBenchError as exc:
            raise DatasetError(str(exc)) from None

    def valid_remote_name(self, name: str) -> bool:
        return bool(air_bench_tasks.dataset_splits(self.version, name))

    def check_name(self, name: str) -> None:
        try:
            super().check_name(name)
        except DatasetError:
            raise DatasetError(f"dataset {name!r} is neither a local folder in {self.dataset_dir} nor an {self.version} "
                               f"dataset; AIR-Bench names look like qa_wiki_en_default or long-doc_arxiv_en_gpt3 "
                               f"(select them with task_types / domains / languages)") from None

    def default_names(self):
        local = local_dataset_names(self.dataset_dir) if self.dataset_dir else []
        return list(local) if local else list(self.names)

    def splits(self, name):
        return air_bench_tasks.dataset_splits(self.version, name) or None if name is not None else None

    def _repo(self, name):
        task_type, domain, language, dataset = self.parse(name)
        return f"{task_type}_{domain}_{language}", dataset.replace("-", "_")

    def download_corpus(self, name, save_dir):
        repo, ds = self._repo(name)
        rows = self._hf(f"AIR-Bench/{repo}", self.version, f"corpus_{ds}")
        _write_jsonl(os.path.join(save_dir, "corpus.jsonl"), ({"id": str(r["id"]), "text": r["text"]} for r in rows))

    def download_split(self, name, split, save_dir):
        repo, ds = self._repo(name)
        old = self.version == "AIR-Bench_24.04"
        queries = {str(r["id"]): r["text"] for r in
                   self._hf(f"AIR-Bench/{repo}", self.version, f"queries_{ds}" if old else f"queries_{ds}_{split}")}
        # dev qrels are public in their own repo; test qrels are gated
        qrels_repo = f"AIR-Bench/qrels-{repo}" + ("-dev" if split == "dev" else "")
        qrels: dict[str, dict[str, int]] = {}
        for r in self._hf(qrels_repo, self.version, f"qrels_{ds}" if old else f"qrels_{ds}_{split}"):
            qrels.setdefault(str(r["qid"]), {})[str(r["docid"])] = int(r["relevance"])
        _save_qrels(save_dir, split, qrels)
        _save_queries(save_dir, split, queries)


class BrightShortBenchmark(Benchmark):
    """BRIGHT (``xlangai/bright``), short documents. Splits are the query sets (``examples`` and the
    LLM-reasoning rewrites); query ids are ``{split}-{id}``. Each query's ``excluded_ids`` are kept in its
    qrels with relevance 0 and removed from its ranking before scoring, as in FlagEmbedding."""

    eval_name = "bright_short"
    names = ("biology", "earth_science", "economics", "psychology", "robotics", "stackoverflow", "sustainable_living",
             "leetcode", "pony", "aops", "theoremqa_questions", "theoremqa_theorems")
    SPLITS = ("examples", "Gemini-1.0_reason", "claude-3-opus_reason", "gpt4_reason", "grit_reason", "llama3-70b_reason")
    documents_config, gold_field = "documents", "gold_ids"
    instructions = BRIGHT_SHORT_INSTRUCTIONS

    def splits(self, name):
        return list(self.SPLITS) if name in self.names else None

    def default_names(self):
        local = local_dataset_names(self.dataset_dir) if self.dataset_dir else []
        return list(local) if local else list(self.names)

    def load(self, name, split, corpus_ids):
        data = super().load(name, split, corpus_ids)
        data.excluded = {q: {d for d, r in docs.items() if r <= 0} for q, docs in data.qrels.items()}
        return data

    def download_corpus(self, name, save_dir):
        rows = self._hf("xlangai/bright", self.documents_config, name)
        _write_jsonl(os.path.join(save_dir, "corpus.jsonl"), ({"id": str(r["id"]), "text": r["content"]} for r in rows))

    def download_split(self, name, split, save_dir):
        queries: dict[str, str] = {}
        qrels: dict[str, dict[str, int]] = {}
        for r in self._hf("xlangai/bright", split, name):
            qid = f"{split}-{r['id']}"
            queries[qid] = r["query"]
            judged = qrels.setdefault(qid, {})
            for d in r[self.gold_field]:
                judged[str(d)] = 1
            for d in set(r["excluded_ids"]) - {"N/A"}:
                if str(d) in judged:
                    raise DatasetError(f"BRIGHT {name} {split}: query {qid} lists {d!r} as both gold and excluded")
                judged[str(d)] = 0
        _save_qrels(save_dir, split, qrels)
        _save_queries(save_dir, split, queries)


class BrightLongBenchmark(BrightShortBenchmark):
    """BRIGHT, long documents (``long_documents``, gold ids ``gold_ids_long``)."""

    eval_name = "bright_long"
    names = ("biology", "earth_science", "economics", "psychology", "robotics", "stackoverflow", "sustainable_living",
             "pony")
    documents_config, gold_field = "long_documents", "gold_ids_long"
    instructions = BRIGHT_LONG_INSTRUCTIONS


def drop_excluded(data: SplitData, results: dict[str, dict[str, float]]) -> dict[str, dict[str, float]]:
    """``results`` without each query's excluded documents (BRIGHT); others unchanged."""
    if not data.excluded:
        return results
    return {q: {d: s for d, s in docs.items() if d not in data.excluded.get(q, ())} for q, docs in results.items()}


def special_instruction(eval_name: str, dataset: str | None) -> str | None:
    """The per-dataset query instruction FlagEmbedding uses with ``use_special_instructions`` (None: none)."""
    if not dataset:
        return None
    if eval_name == "beir":
        return BEIR_INSTRUCTIONS.get(dataset.split("/", 1)[0])
    cls = BENCHMARKS.get(eval_name)
    table = getattr(cls, "instructions", None)
    return table.get(dataset) if table else None


BENCHMARKS: dict[str, type[Benchmark]] = {
    "custom": CustomBenchmark,
    "beir": BeirBenchmark,
    "msmarco": MsmarcoBenchmark,
    "miracl": MiraclBenchmark,
    "mkqa": MkqaBenchmark,
    "mldr": MldrBenchmark,
    "air_bench": AirBenchBenchmark,
    "bright_short": BrightShortBenchmark,
    "bright_long": BrightLongBenchmark,
}


def get_benchmark(eval_name: str, dataset_dir: str | None = None, **kwargs) -> Benchmark:
    """The benchmark called ``eval_name`` (``custom`` for local folders in either layout)."""
    cls = BENCHMARKS.get(eval_name)
    if cls is None:
        raise DatasetError(f"unknown eval_name {eval_name!r}; choose one of {sorted(BENCHMARKS)}")
    if eval_name == "custom" and not dataset_dir:
        raise DatasetError("the custom evaluation reads local folders: pass dataset_dir")
    if dataset_dir and not os.path.isdir(dataset_dir) and eval_name == "custom":
        raise DatasetError(f"dataset_dir {dataset_dir} does not exist")
    return cls(dataset_dir, **kwargs)


def resolve_names(bench: Benchmark, dataset_names: Sequence[str] | None) -> list[str | None]:
    """Dataset names to evaluate, checked (unknown names raise, listing what is there)."""
    if not dataset_names:
        names: list[str | None] = []
        for n in bench.default_names():
            names += [n] if n is None else bench.expand(n)
        return names
    out: list[str | None] = []
    for n in dataset_names:
        bench.check_name(n)
        out += bench.expand(n)
    return out
