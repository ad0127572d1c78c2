"""Fine-tune a decoder-only embedder with LoRA on Ray Train (FlagEmbedding's decoder_only.base and
decoder_only.icl arguments).

    python jobs/finetune_llm_embedder.py --model_name_or_path Qwen/Qwen2-1.5B \\
        --train_data data/train.jsonl --output_dir outputs/llm_ft \\
        --query_instruction_for_retrieval "Given a query, retrieve relevant passages" \\
        --train_group_size 8 --query_max_len 256 --passage_max_len 256 \\
        --per_device_train_batch_size 4 --learning_rate 1e-4 --num_train_epochs 1 --temperature 0.02 \\
        --lora_rank 32 --lora_alpha 64 --save_merged_lora_model --num_workers 4 --use_gpu
    ... --icl --query_max_len 2048 --icl_suffix_str '\\n<response>'   # bge-en-icl style few-shot training

``--model_name_or_path`` is required. ``--query_instruction_format`` defaults to
``<instruct>{}\\n<query>{}`` (FlagEmbedding's decoder-only format). OUTPUT_DIR receives the LoRA adapter
and tokenizer; with ``--save_merged_lora_model`` also OUTPUT_DIR/merged_model, a full model that
FlagLLMModel / FlagICLModel load directly (pass the same query_instruction_format at inference).
``--only_merge_lora_model`` skips training and merges the adapter already in OUTPUT_DIR. Rerun the
same command to resume from the last checkpoint under OUTPUT_DIR/checkpoints.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bge_ray.batch.cli import hf_bool  # noqa: E402
from bge_ray.train.arguments import (  # noqa: E402
    DataArgs,
    ModelArgs,
    RayArgs,
    TrainArgs,
    add_dataclass_arguments,
    from_namespace,
    parse_training_args,
)
from bge_ray.train.llm_embedder import LLM_QUERY_INSTRUCTION_FORMAT, LLMArgs, LLMEmbedderTask  # noqa: E402
from bge_ray.train.runner import run_training  # noqa: E402

logger = logging.getLogger("finetune_llm_embedder")
DESCRIPTION = __doc__.split("\n\n")[0]


def _given(argv: list[str], flag: str) -> bool:
    return any(a == flag or a.startswith(flag + "=") for a in argv)


def parse(argv: list[str]):
    """(ModelArgs, DataArgs, TrainArgs, RayArgs, LLMArgs); merging only needs no training data."""
    argv = list(argv)
    if not _given(argv, "--query_instruction_format"):
        argv += ["--query_instruction_format", LLM_QUERY_INSTRUCTION_FORMAT]
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--only_merge_lora_model", type=hf_bool, nargs="?", const=True, default=False)
    if pre.parse_known_args(argv)[0].only_merge_lora_model:
        parser = argparse.ArgumentParser(description=DESCRIPTION)
        classes = (ModelArgs, DataArgs, TrainArgs, RayArgs, LLMArgs)
        for cls in classes:
            add_dataclass_arguments(parser, cls)
        ns = parser.parse_args(argv)
        return [from_namespace(cls, ns) for cls in classes]
    return parse_training_args(argv, LLMArgs, description=DESCRIPTION)


def main(argv=None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    argv = sys.argv[1:] if argv is None else list(argv)
    model, data, train, ray_args, llm = parse(argv)
    if not model.model_name_or_path:
        raise SystemExit("finetune_llm_embedder.py: error: --model_name_or_path is required: the decoder-only "
                         "checkpoint to fine-tune (a local folder or a hub name, e.g. Qwen/Qwen2-1.5B); the "
                         "bundled default model is an encoder (use jobs/finetune_embedder.py for it)")
    if train.sentence_pooling_method not in (None, "last_token"):
        raise SystemExit("finetune_llm_embedder.py: error: decoder-only embedders pool the last token "
                         f"(--sentence_pooling_method last_token), got {train.sentence_pooling_method!r}")
    task = LLMEmbedderTask(model, data, train, llm=llm)
    if llm.only_merge_lora_model:
        out = task.merge_saved(os.path.abspath(train.output_dir))
        print(f"merged the LoRA adapter of {train.output_dir} into {out}")
        return 0
    if llm.icl and not data.same_dataset_within_batch:
        logger.info("--icl: batches are drawn from one dataset each (FlagEmbedding's ICL dataset always does)")
        data.same_dataset_within_batch = True
    result = run_training(task, model, data, train, ray_args)
    merged = os.path.join(result.output_dir, "merged_model")
    print(result.summary_line() + (f"; merged model: {merged}" if os.path.isdir(merged) else ""))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
