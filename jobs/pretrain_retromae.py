"""RetroMAE pre-training of a BERT encoder on Ray Train (FlagEmbedding's retromae_pretrain arguments).

    python jobs/pretrain_retromae.py --train_data data/pretrain.jsonl --output_dir outputs/retromae \\
        --max_seq_length 512 --encoder_mlm_probability 0.3 --decoder_mlm_probability 0.5 \\
        --per_device_train_batch_size 32 --learning_rate 1e-4 --num_train_epochs 2 --num_workers 2
    ray job submit --working-dir . -- python jobs/pretrain_retromae.py ... --num_workers 8 --use_gpu

``--train_data``: jsonl files with a ``text`` field per line, or folders of them. The encoder is
saved at the top of OUTPUT_DIR as an ordinary BERT checkpoint with cls pooling (load it with
FlagModel, or fine-tune it with jobs/finetune_embedder.py --model_name_or_path OUTPUT_DIR).
``--model_name_or_path`` defaults to the bundled all-MiniLM-L6-v2. Rerun the same command to resume
from the last checkpoint under OUTPUT_DIR/checkpoints.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bge_ray.train.arguments import (  # noqa: E402
    ModelArgs,
    RayArgs,
    TrainArgs,
    add_dataclass_arguments,
    from_namespace,
)
from bge_ray.train.retromae import RetroMAEDataArgs, RetroMAETask, run_pretraining  # noqa: E402


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    classes = (ModelArgs, RetroMAEDataArgs, TrainArgs, RayArgs)
    for cls in classes:
        add_dataclass_arguments(parser, cls)
    parser.set_defaults(output_dir="outputs/retromae")
    ns = parser.parse_args(argv)
    if not ns.train_data:
        parser.error("--train_data is required (jsonl files with a 'text' field, or folders of them)")
    for path in ns.train_data:
        if not os.path.exists(path):
            parser.error(f"--train_data: {path} does not exist")
    try:
        return [from_namespace(cls, ns) for cls in classes]
    except ValueError as exc:
        parser.error(str(exc))


def main(argv=None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    model, data, train, ray_args = parse_args(argv)
    result = run_pretraining(RetroMAETask(model, data, train), model, data, train, ray_args)
    print(result.summary_line(unit="texts"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
