"""Where the time of one encode call goes: tokenisation, padding, the model, transfers.

    python benchmarks/profile_encode.py --arch bge-base-en-v1.5 --device cuda:0 --fp16 --repeat 10
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import SHARED, build_random_checkpoint, load_passages, timed  # noqa: E402


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--data", default=str(SHARED / "beir" / "msmarco-subset"))
    p.add_argument("--arch", default="bge-base-en-v1.5")
    p.add_argument("--tokenizer", default=None)
    p.add_argument("--device", default="cuda:0")
    p.add_argument("--fp16", action="store_true")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--max-length", type=int, default=512)
    p.add_argument("--repeat", type=int, default=10)
    p.add_argument("--no-pin", action="store_true")
    args = p.parse_args()
    import bge_ray
    from bge_ray.models.encode import plan_batches
    from bge_ray.models.tokenize import collate, pad_values, tokenize

    texts = load_passages(args.data, None, args.repeat)
    path = build_random_checkpoint(args.arch, Path(tempfile.mkdtemp()) / args.arch, args.tokenizer)
    m = bge_ray.FlagModel(str(path), devices=args.device, use_fp16=args.fp16, batch_size=args.batch_size,
                          passage_max_length=args.max_length)
    import bge_ray.models.encode as enc

    enc.PIN_MEMORY = not args.no_pin
    m.encode_corpus(texts[:512])
    for r in range(3):
        _, total = timed(lambda: m.encode_corpus(texts), args.device)
        print(f"encode_corpus round {r}: {total:.2f} s", flush=True)
    feats, tok_s = timed(lambda: tokenize(m.tokenizer, texts, args.max_length), "cpu")
    batches = plan_batches(feats.lengths, args.batch_size)
    pad = pad_values(m.tokenizer)
    cpu, col_s = timed(lambda: [collate(feats, b, pad, pin_memory=True) for b in batches], "cpu")
    model = m._replica(args.device)
    gpu, h2d_s = timed(lambda: [{k: v.to(args.device, non_blocking=True) for k, v in c.items()} for c in cpu],
                       args.device)

    def forward_all():
        for b in gpu:
            model(**b).last_hidden_state[:, 0]

    with torch.inference_mode():
        for _ in range(2):
            _, fwd_s = timed(forward_all, args.device)
    padded = sum(int(c["attention_mask"].numel()) for c in cpu)
    real = int(feats.lengths.sum())
    print(f"encode_corpus total {total:.2f} s | tokenize {tok_s:.2f} s | collate {col_s:.2f} s | "
          f"h2d {h2d_s:.2f} s | forward only {fwd_s:.2f} s | tokens {real}, padded positions {padded} "
          f"({padded / real - 1:.1%} padding)")


if __name__ == "__main__":
    main()
