"""Fine-tune BGE-M3 on Ray Train: dense, sparse and ColBERT heads with self-distillation
(FlagEmbedding's encoder_only.m3 arguments).

    python jobs/finetune_m3.py --model_name_or_path BAAI/bge-m3 --train_data data/train.jsonl \\
        --output_dir outputs/ft-m3 --train_group_size 8 --query_max_len 64 --passage_max_len 256 \\
        --per_device_train_batch_size 4 --learning_rate 1e-5 --num_train_epochs 1 --temperature 0.02 \\
        --unified_finetuning --use_self_distill --knowledge_distillation --kd_loss_type m3_kd_loss \\
        --negatives_cross_device --num_workers 2
    ray job submit --working-dir . -- python jobs/finetune_m3.py ... --num_workers 8 --use_gpu

``--model_name_or_path`` is required (an M3 checkpoint such as BAAI/bge-m3 or a local folder; without
``colbert_linear.pt`` / ``sparse_linear.pt`` beside it the heads start new). The output folder loads
with ``bge_ray.models.BGEM3FlagModel``. Rerun the same command to resume from OUTPUT_DIR/checkpoints.
"""

from __future__ import annotations

import logging
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bge_ray.train.arguments import parse_training_args  # noqa: E402
from bge_ray.train.m3 import M3Args, M3Task  # noqa: E402
from bge_ray.train.runner import run_training  # noqa: E402


def main(argv=None) -> int:
    model, data, train, ray_args, m3 = parse_training_args(argv, M3Args, description=__doc__.split("\n\n")[0])
    if not model.model_name_or_path:
        print("finetune_m3.py: error: --model_name_or_path is required (an M3 checkpoint such as BAAI/bge-m3, "
              "or a local folder in its layout); there is no sensible default for M3", file=sys.stderr)
        raise SystemExit(2)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    task = M3Task(model, data, train, train.sentence_pooling_method or "cls", m3)
    result = run_training(task, model, data, train, ray_args)
    print(result.summary_line())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
