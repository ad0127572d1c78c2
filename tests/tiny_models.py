"""Tiny randomly initialised checkpoints saved in the real on-disk layouts of the BGE families.

Built once per test session (see ``conftest.py``) and handed to both bge_ray and the FlagEmbedding
oracle. ``initializer_range`` is large on purpose: at the default 0.02 every text embeds alike and
an oracle comparison proves little.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from bge_ray.models.loading import bundled_model_path

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
INIT_RANGE = 0.5
SPECIALS = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]


def _sample_texts(limit: int = 2000) -> list[str]:
    """Training text for the tiny tokenizer: English and Arabic passages from the shared data."""
    texts = []
    for name in ("msmarco-subset", "arcd-subset"):
        path = SHARED_DATA / "beir" / name / "corpus.jsonl"
        with open(path, encoding="utf-8") as f:
            for i, line in enumerate(f):
                if i >= limit // 2:
                    break
                texts.append(json.loads(line)["text"])
    return texts


def build_unigram_tokenizer(out: Path, vocab_size: int = 800) -> None:
    """A sentencepiece-style Unigram tokenizer with XLM-R's special tokens and templates."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.Unigram())
    tok.normalizer = normalizers.NFKC()
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    trainer = trainers.UnigramTrainer(vocab_size=vocab_size, special_tokens=SPECIALS, unk_token="<unk>")
    tok.train_from_iterator(_sample_texts(), trainer=trainer)
    # The trainer returns its pieces in a different order on every run (Rust hash sets): rebuild the
    # model with the pieces sorted so that token ids, and so every fixture built on them, are the same
    # in every session.
    vocab = json.loads(tok.to_str())["model"]["vocab"]
    specials = [(p, s) for p, s in vocab if p in SPECIALS]
    pieces = sorted((p, s) for p, s in vocab if p not in SPECIALS)
    ordered = specials + pieces
    tok.model = models.Unigram([(p, round(s, 2)) for p, s in ordered], unk_id=[p for p, _ in ordered].index("<unk>"))
    ids = {t: tok.token_to_id(t) for t in SPECIALS}
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A </s>",
        pair="<s> $A </s> </s> $B </s>",
        special_tokens=[("<s>", ids["<s>"]), ("</s>", ids["</s>"])],
    )
    out.mkdir(parents=True, exist_ok=True)
    tok.save(str(out / "tokenizer.json"))
    config = {
        "tokenizer_class": "XLMRobertaTokenizer",
        "bos_token": "<s>",
        "eos_token": "</s>",
        "cls_token": "<s>",
        "sep_token": "</s>",
        "pad_token": "<pad>",
        "unk_token": "<unk>",
        "mask_token": "<mask>",
        "model_max_length": 512,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=1))
    specials = {k: v for k, v in config.items() if k.endswith("_token")}
    (out / "special_tokens_map.json").write_text(json.dumps(specials, indent=1))


def _copy_tokenizer(src: Path, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt"):
        if (src / name).exists():
            shutil.copy(src / name, out / name)


def build_bert(out: Path, hidden: int = 32, layers: int = 2, dropout: float = 0.1) -> Path:
    """bge-*-v1.5 layout: BertModel weights + the bundled BERT tokenizer (cls pooling).
    ``dropout=0`` makes training steps deterministic (gradient comparisons)."""
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    src = Path(bundled_model_path())
    cfg = BertConfig(
        vocab_size=30522,
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        intermediate_size=hidden * 2,
        max_position_embeddings=512,
        initializer_range=INIT_RANGE,
        hidden_dropout_prob=dropout,
        attention_probs_dropout_prob=dropout,
    )
    BertModel(cfg).save_pretrained(out)
    _copy_tokenizer(src, out)
    return out


def _xlmr_config(tokenizer_dir: Path, hidden: int = 32, layers: int = 2, **extra):
    from transformers import XLMRobertaConfig

    tok = json.loads((tokenizer_dir / "tokenizer.json").read_text())
    vocab = len(tok["model"]["vocab"])
    return XLMRobertaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        intermediate_size=hidden * 2,
        max_position_embeddings=514,
        pad_token_id=1,
        bos_token_id=0,
        eos_token_id=2,
        initializer_range=INIT_RANGE,
        **extra,
    )


def build_m3(out: Path, tokenizer_dir: Path, hidden: int = 32, colbert_dim: int | None = None) -> Path:
    """bge-m3 layout: XLMRobertaModel files + ``colbert_linear.pt`` + ``sparse_linear.pt``."""
    from transformers import XLMRobertaModel

    torch.manual_seed(1)
    XLMRobertaModel(_xlmr_config(tokenizer_dir, hidden)).save_pretrained(out)
    _copy_tokenizer(tokenizer_dir, out)
    colbert = torch.nn.Linear(hidden, colbert_dim or hidden)
    sparse = torch.nn.Linear(hidden, 1)
    for layer in (colbert, sparse):
        torch.nn.init.normal_(layer.weight, std=INIT_RANGE)
        torch.nn.init.normal_(layer.bias, std=INIT_RANGE)
    torch.save(colbert.state_dict(), out / "colbert_linear.pt")
    torch.save(sparse.state_dict(), out / "sparse_linear.pt")
    return out


def build_xlmr_reranker(out: Path, tokenizer_dir: Path, hidden: int = 32) -> Path:
    """bge-reranker layout: XLMRobertaForSequenceClassification with one label."""
    from transformers import XLMRobertaForSequenceClassification

    torch.manual_seed(2)
    cfg = _xlmr_config(tokenizer_dir, hidden, num_labels=1)
    XLMRobertaForSequenceClassification(cfg).save_pretrained(out)
    _copy_tokenizer(tokenizer_dir, out)
    return out


def build_qwen2(out: Path, tokenizer_dir: Path, hidden: int = 32, layers: int = 2, causal_lm: bool = False) -> Path:
    """A decoder-only (Qwen2) checkpoint on the tiny Unigram tokenizer; ``causal_lm`` adds the LM head."""
    from transformers import AutoModelForCausalLM, Qwen2Config, Qwen2Model

    torch.manual_seed(3)
    tok = json.loads((tokenizer_dir / "tokenizer.json").read_text())
    cfg = Qwen2Config(
        vocab_size=len(tok["model"]["vocab"]),
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=hidden * 2,
        max_position_embeddings=1024,
        initializer_range=INIT_RANGE,
        bos_token_id=0,
        eos_token_id=2,
        pad_token_id=1,
        tie_word_embeddings=False,
    )
    model = AutoModelForCausalLM.from_config(cfg) if causal_lm else Qwen2Model(cfg)
    model.save_pretrained(out)
    out = Path(out)
    _copy_tokenizer(tokenizer_dir, out)
    # A decoder tokenizer: no XLM-R templates, plain fast tokenizer class, EOS as padding.
    tcfg = json.loads((out / "tokenizer_config.json").read_text())
    tcfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    (out / "tokenizer_config.json").write_text(json.dumps(tcfg, indent=1))
    return out
