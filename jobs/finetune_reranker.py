"""Fine-tune a reranker on Ray Train: a cross-encoder, a decoder-only LLM reranker or a layerwise one
(FlagEmbedding's reranker encoder_only.base / decoder_only.base / decoder_only.layerwise arguments).

    python jobs/finetune_reranker.py --train_data data/reranker.jsonl --output_dir outputs/reranker \\
        --train_group_size 8 --query_max_len 64 --passage_max_len 448 \\
        --per_device_train_batch_size 8 --learning_rate 2e-5 --num_train_epochs 1 --num_workers 2
    ray job submit --working-dir . -- python jobs/finetune_reranker.py ... --num_workers 8 --use_gpu --bf16
    ... --model_class decoder-only-base --model_name_or_path google/gemma-2b \\
        --lora_rank 32 --lora_alpha 64 --save_merged_lora_model       # a bge-reranker-v2-gemma style reranker
    ... --model_class decoder-only-layerwise --model_name_or_path openbmb/MiniCPM-2B-dpo-bf16 \\
        --model_type from_raw_model --start_layer 8 --head_multi --cutoff_layers 8 16 24 32 40

``--model_class encoder-only-base`` (default) starts from the bundled all-MiniLM-L6-v2 encoder unless
``--model_name_or_path`` says otherwise (a new one-logit head is added); the result loads into
``FlagReranker`` / ``FlagAutoReranker.from_finetuned``. Decoder-only runs train a LoRA adapter by
default: OUTPUT_DIR holds it (``FlagLLMReranker(base, peft_path=OUTPUT_DIR)``), and with
``--save_merged_lora_model`` OUTPUT_DIR/merged_model is a full model for ``FlagLLMReranker``.
Layerwise runs write a full model that ``LayerWiseFlagLLMReranker(OUTPUT_DIR)`` loads. Rerun the same
command to resume from the last checkpoint under OUTPUT_DIR/checkpoints.
"""

from __future__ import annotations

import logging
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bge_ray.train.arguments import parse_training_args  # noqa: E402
from bge_ray.train.llm_reranker import LLMRerankerArgs, LLMRerankerTask  # noqa: E402
from bge_ray.train.reranker import RerankerDataArgs, RerankerTask  # noqa: E402
from bge_ray.train.runner import run_training  # noqa: E402


def main(argv=None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        model, data, train, ray_args, llm = parse_training_args(argv, LLMRerankerArgs, data_class=RerankerDataArgs,
                                                                description=__doc__.split("\n\n")[0])
    except ValueError as exc:  # an argument value the dataclasses reject
        raise SystemExit(f"finetune_reranker.py: error: {exc}") from None
    if llm.model_class == "encoder-only-base":
        task = RerankerTask(model, data, train)
    else:
        if not model.model_name_or_path:
            raise SystemExit(f"finetune_reranker.py: error: --model_class {llm.model_class} needs "
                             "--model_name_or_path (a causal LM folder or hub name); the bundled default model "
                             "is an encoder")
        task = LLMRerankerTask(model, data, train, llm=llm)
    result = run_training(task, model, data, train, ray_args)
    print(result.summary_line(per_group=data.train_group_size))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
