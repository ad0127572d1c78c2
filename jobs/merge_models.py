"""Merge checkpoints of one architecture (LM-Cocktail): by given weights, or by weights computed from
a few examples of the target task.

    python jobs/merge_models.py --model_names_or_paths base/ finetuned/ --weights 0.5 0.5 --output_path merged/
    python jobs/merge_models.py --model_names_or_paths base/ finetuned/ --model_type embedder \\
        --example_data examples.jsonl --temperature 5 --output_path merged/

``--example_data`` is training jsonl (query, pos, neg); the weights are softmax(-loss / temperature)
over each model's loss on it and are printed. The output loads into the same inference class as the
inputs (embedders, rerankers, M3 with its heads, LoRA runs through their merged_model/ folders).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bge_ray.train.merge import mix_models, mix_models_with_data  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model_names_or_paths", nargs="+", required=True, help="local folders (or hub names)")
    p.add_argument("--weights", nargs="+", type=float, default=None, help="one per model, summing to 1")
    p.add_argument("--model_type", choices=["embedder", "reranker"], default="embedder")
    p.add_argument("--example_data", default=None, help="training jsonl of the target task (auto weights)")
    p.add_argument("--temperature", type=float, default=5.0)
    p.add_argument("--max_input_length", type=int, default=512)
    p.add_argument("--neg_number", type=int, default=7)
    p.add_argument("--output_path", required=True)
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from bge_ray.models.loading import resolve_model_path

    folders = [resolve_model_path(m) for m in a.model_names_or_paths]
    if (a.weights is None) == (a.example_data is None):
        p.error("give either --weights or --example_data")
    if a.weights is not None:
        if len(a.weights) != len(folders):
            p.error(f"{len(folders)} models but {len(a.weights)} weights")
        out = mix_models(folders, a.weights, a.output_path)
        print(f"merged {len(folders)} models with weights {a.weights} -> {out}")
        return 0
    from bge_ray.io.training_data import read_training_jsonl

    examples = read_training_jsonl(a.example_data)
    out, weights, losses = mix_models_with_data(folders, a.model_type, examples, a.output_path, a.temperature,
                                                max_length=a.max_input_length, neg_number=a.neg_number)
    for f, w, loss in zip(a.model_names_or_paths, weights, losses, strict=True):
        print(f"{f}: loss {loss:.4f} on {len(examples)} examples -> weight {w:.4f}")
    print(f"merged -> {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
