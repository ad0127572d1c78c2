"""Fine-tune a cross-encoder reranker on Ray Train (FlagEmbedding's reranker encoder_only.base arguments).

    python jobs/finetune_reranker.py --train_data data/reranker.jsonl --output_dir outputs/reranker \\
        --train_group_size 8 --query_max_len 64 --passage_max_len 448 \\
        --per_device_train_batch_size 8 --learning_rate 2e-5 --num_train_epochs 1 --num_workers 2
    ray job submit --working-dir . -- python jobs/finetune_reranker.py ... --num_workers 8 --use_gpu --bf16

``--model_name_or_path`` defaults to the bundled all-MiniLM-L6-v2 encoder (a new one-logit head is
added). The result loads into ``FlagReranker`` / ``FlagAutoReranker.from_finetuned``.
"""

from __future__ import annotations

import logging
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bge_ray.train.arguments import parse_training_args  # noqa: E402
from bge_ray.train.reranker import RerankerDataArgs, RerankerTask  # noqa: E402
from bge_ray.train.runner import run_training  # noqa: E402


def main(argv=None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    model, data, train, ray_args = parse_training_args(argv, description=__doc__.split("\n\n")[0],
                                                       data_class=RerankerDataArgs)
    result = run_training(RerankerTask(model, data, train), model, data, train, ray_args)
    print(result.summary_line(per_group=data.train_group_size))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
