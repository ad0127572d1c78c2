"""AIR-Bench's task table (per benchmark version: task type -> domain -> language -> dataset -> splits)
and its selection by task type, domain, language and split, as the AIR-Bench package defines them.

Dataset names are ``{task_type}_{domain}_{language}_{dataset}`` (``qa_wiki_en_default``,
``long-doc_arxiv_en_gpt3``).
"""

from __future__ import annotations

from collections.abc import Sequence

LATEST_VERSION = "AIR-Bench_24.05"

_QA_13 = "en zh ar bn de es fa fr hi id ja ko ru"
_QA_LANGS = {
    "AIR-Bench_24.05": {"wiki": _QA_13, "web": _QA_13, "healthcare": "en zh de es fr", "law": "en de fr",
                        "arxiv": "en", "science": "ru", "news": _QA_13, "finance": "en zh ar fr", "msmarco": "en"},
    "AIR-Bench_24.04": {"wiki": "en zh", "web": "en zh", "healthcare": "en zh", "law": "en", "arxiv": "en",
                        "news": "en zh", "finance": "en zh", "msmarco": "en"},
}
# Long-doc datasets (English only) and, in 24.05, the one split each has.
_LONG_DOC_0505 = {
    "healthcare": {"pubmed_100K-200K_1": "test", "pubmed_100K-200K_2": "test", "pubmed_100K-200K_3": "dev",
                   "pubmed_40K-50K_5-merged": "test", "pubmed_30K-40K_10-merged": "test"},
    "arxiv": {"gpt3": "test", "llama2": "dev", "gemini": "test", "llm-survey": "test"},
    "law": {"lex_files_300K-400K": "dev", "lex_files_400K-500K": "test", "lex_files_500K-600K": "test",
            "lex_files_600K-700K": "test"},
    "book": {"origin-of-species_darwin": "test", "a-brief-history-of-time_stephen-hawking": "dev"},
}


def _table(version: str) -> dict[str, dict[str, dict[str, dict[str, list[str]]]]]:
    old = version == "AIR-Bench_24.04"
    qa_default = {"default": ["test"] if old else ["dev", "test"]}
    qa = {d: {lang: dict(qa_default) for lang in langs.split()} for d, langs in _QA_LANGS[version].items()}
    if not old:
        qa["msmarco"]["en"] = {"default": ["dev"]}
    long_doc = {d: {"en": {name: ["test"] if old else [split] for name, split in sets.items()}}
                for d, sets in _LONG_DOC_0505.items()}
    return {"qa": qa, "long-doc": long_doc}


TASK_TABLE = {v: _table(v) for v in _QA_LANGS}


class AirBenchError(ValueError):
    """An unknown version, task type, domain, language or split."""


def _check(kind: str, wanted: Sequence[str] | None, available: Sequence[str], version: str) -> list[str]:
    if not wanted:
        return sorted(available)
    out = sorted({w.lower() for w in ([wanted] if isinstance(wanted, str) else wanted)})
    bad = [w for w in out if w not in available]
    if bad:
        raise AirBenchError(f"{version}: unknown {kind} {bad}; available {kind}: {sorted(available)}")
    return out


def version_table(version: str | None) -> dict:
    version = version or LATEST_VERSION
    if version not in TASK_TABLE:
        raise AirBenchError(f"unknown AIR-Bench version {version!r}; available: {sorted(TASK_TABLE)}")
    return TASK_TABLE[version]


def version_splits(version: str | None) -> list[str]:
    return ["test"] if version == "AIR-Bench_24.04" else ["dev", "test"]


def dataset_splits(version: str | None, name: str) -> list[str]:
    """The splits AIR-Bench defines for dataset ``name`` ([] if it has no such dataset)."""
    parts = name.split("_", 3)
    if len(parts) != 4:
        return []
    task_type, domain, language, dataset = parts
    return list(version_table(version).get(task_type, {}).get(domain, {}).get(language, {}).get(dataset, []))


def select(version: str | None = None, task_types: Sequence[str] | None = None, domains: Sequence[str] | None = None,
           languages: Sequence[str] | None = None, splits: Sequence[str] | None = None) -> list[tuple[str, list[str]]]:
    """``[(dataset name, its splits to run)]`` in AIR-Bench's order: every dataset of the chosen task types,
    domains and languages (None: all) that has at least one of ``splits`` (None: the version's splits)."""
    table = version_table(version)
    version = version or LATEST_VERSION
    all_domains = sorted({d for t in table.values() for d in t})
    all_langs = sorted({lang for t in table.values() for d in t.values() for lang in d})
    types = _check("task types", task_types, list(table), version)
    doms = _check("domains", domains, all_domains, version)
    langs = _check("languages", languages, all_langs, version)
    wanted = _check("splits", splits, version_splits(version), version)
    out = []
    for t in types:
        for d in doms:
            for lang in langs:
                for dataset, have in table[t].get(d, {}).get(lang, {}).items():
                    run = [s for s in wanted if s in have]
                    if run:
                        out.append((f"{t}_{d}_{lang}_{dataset}", run))
    return out
