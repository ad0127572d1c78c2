"""Helpers shared by the benchmark scripts: data, random checkpoints from published configs, timing."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"


def job_env(work: Path | None = None, **extra: str) -> dict[str, str]:
    """Environment for the jobs a benchmark starts: offline hubs, Ray on loopback without auth,
    and (given ``work``) a private datasets cache."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false", "RAY_AUTH_MODE": "disabled", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
           **extra}
    if work is not None:
        env["HF_DATASETS_CACHE"] = str(Path(work) / "hf_cache")
    return env

# Published configs (architecture only; weights are random here: no hub on these machines).
ARCH_CONFIGS = {
    "bge-base-en-v1.5": dict(
        model_type="bert", hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
        intermediate_size=3072, vocab_size=30522, max_position_embeddings=512, type_vocab_size=2,
    ),
    "bge-small-en-v1.5": dict(
        model_type="bert", hidden_size=384, num_hidden_layers=12, num_attention_heads=12,
        intermediate_size=1536, vocab_size=30522, max_position_embeddings=512, type_vocab_size=2,
    ),
    # Not a published model: the smallest real transformer, for scale runs where the model must not dominate.
    "tiny-1x32": dict(
        model_type="bert", hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=64, vocab_size=30522, max_position_embeddings=512, type_vocab_size=2,
    ),
    "bge-m3": dict(
        model_type="xlm-roberta", hidden_size=1024, num_hidden_layers=24, num_attention_heads=16,
        intermediate_size=4096, vocab_size=250002, max_position_embeddings=8194, type_vocab_size=1,
        pad_token_id=0,  # the benchmark reuses the bundled BERT tokenizer, whose [PAD] is 0
    ),
}


def load_passages(folder: str | os.PathLike, limit: int | None = None, repeat: int = 1) -> list[str]:
    """BEIR corpus texts (title + " " + text), optionally repeated to make a longer run."""
    texts = []
    with open(Path(folder) / "corpus.jsonl", encoding="utf-8") as f:
        for line in f:
            d = json.loads(line)
            title = (d.get("title") or "").strip()
            texts.append(f"{title} {d['text'].strip()}".strip() if title else d["text"].strip())
    texts = texts * repeat
    return texts[:limit] if limit else texts


def build_random_checkpoint(arch: str, out: Path, tokenizer_dir: str | None = None) -> Path:
    """Random weights in ``arch``'s published shape, with the bundled BERT tokenizer and (for bge-m3)
    the two M3 heads, saved in the real on-disk layout."""
    import shutil

    from transformers import AutoConfig, AutoModel

    from bge_ray.models.loading import bundled_model_path

    cfg = dict(ARCH_CONFIGS[arch])
    model_type = cfg.pop("model_type")
    config = AutoConfig.for_model(model_type, **cfg)
    torch.manual_seed(0)
    with torch.device("cpu"):
        model = AutoModel.from_config(config)
    model.save_pretrained(out)
    src = Path(tokenizer_dir or bundled_model_path())
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt"):
        if (src / name).exists():
            shutil.copy(src / name, out / name)
    if arch == "bge-m3":
        torch.save(torch.nn.Linear(cfg["hidden_size"], cfg["hidden_size"]).state_dict(), out / "colbert_linear.pt")
        torch.save(torch.nn.Linear(cfg["hidden_size"], 1).state_dict(), out / "sparse_linear.pt")
    return out


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed(fn, device: str):
    sync(device)
    t0 = time.perf_counter()
    out = fn()
    sync(device)
    return out, time.perf_counter() - t0


def matmul_peak_flops(device: str, dtype: torch.dtype, n: int = 4096, iters: int = 10) -> float:
    """Achievable dense matmul FLOP/s on ``device`` in ``dtype`` (the roofline we report against)."""
    if device == "cpu":
        n, iters = 2048, 5
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(2):
        a @ b
    _, dt = timed(lambda: [a @ b for _ in range(iters)], device)
    return 2 * n**3 * iters / dt


def model_flops_per_token(config, avg_len: float) -> float:
    """Forward FLOPs per token: 2 x non-embedding weights, plus attention's QK^T and AV."""
    h, layers = config.hidden_size, config.num_hidden_layers
    inter = config.intermediate_size
    weights = layers * (4 * h * h + 2 * h * inter)
    return 2 * weights + layers * 4 * h * avg_len
