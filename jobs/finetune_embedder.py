"""Fine-tune an encoder-only embedder on Ray Train (FlagEmbedding's encoder_only.base arguments).

    python jobs/finetune_embedder.py --train_data data/train.jsonl --output_dir outputs/ft \\
        --train_group_size 8 --query_max_len 32 --passage_max_len 128 \\
        --per_device_train_batch_size 16 --learning_rate 2e-5 --num_train_epochs 1 \\
        --temperature 0.02 --negatives_cross_device --num_workers 2
    ray job submit --working-dir . -- python jobs/finetune_embedder.py ... --num_workers 8 --use_gpu

``--model_name_or_path`` defaults to the bundled all-MiniLM-L6-v2. Rerun the same command to resume
from the last checkpoint under OUTPUT_DIR/checkpoints.
"""

from __future__ import annotations

import logging
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bge_ray.train.arguments import parse_training_args  # noqa: E402
from bge_ray.train.embedder import EmbedderTask, resolve_pooling  # noqa: E402
from bge_ray.train.runner import run_training  # noqa: E402


def main(argv=None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    model, data, train, ray_args = parse_training_args(argv, description=__doc__.split("\n\n")[0])
    pooling = resolve_pooling(model.model_name_or_path, train.sentence_pooling_method)
    task = EmbedderTask(model, data, train, pooling)
    result = run_training(task, model, data, train, ray_args)
    print(result.summary_line())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
