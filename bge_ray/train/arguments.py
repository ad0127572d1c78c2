"""Training arguments under FlagEmbedding's names (its ModelArgs, DataArgs and HF TrainingArguments
fields that the loops use), plus the Ray Train ones: one dataclass per concern, one argparse builder.

Every field becomes ``--field``; booleans accept ``--flag``, ``--flag True`` and ``--flag false`` as
HfArgumentParser does. Job scripts add their family's fields (M3 heads, LoRA, RetroMAE masks) with
their own dataclass and the same builder.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import typing
from dataclasses import dataclass, field

from bge_ray.batch.cli import hf_bool


@dataclass
class ModelArgs:
    model_name_or_path: str | None = field(default=None, metadata={"help": "default: the bundled all-MiniLM-L6-v2"})
    config_name: str | None = None
    tokenizer_name: str | None = None
    cache_dir: str | None = None
    trust_remote_code: bool = False


@dataclass
class GroupDataArgs:
    """What embedder and reranker training data share (FlagEmbedding's DataArgs)."""

    train_data: list[str] = field(default_factory=list, metadata={"help": "jsonl files or folders of them"})
    train_group_size: int = 8
    query_max_len: int = 32
    passage_max_len: int = 128
    pad_to_multiple_of: int | None = None
    max_example_num_per_dataset: int = 100_000_000
    query_instruction_format: str = "{}{}"
    passage_instruction_format: str = "{}{}"
    knowledge_distillation: bool = False
    shuffle_ratio: float = 0.0
    same_dataset_within_batch: bool = False
    small_threshold: int = 0
    drop_threshold: int = 0

    def __post_init__(self):
        # Shell users type "\n" literally, as FlagEmbedding expects.
        self.query_instruction_format = self.query_instruction_format.replace("\\n", "\n")
        self.passage_instruction_format = self.passage_instruction_format.replace("\\n", "\n")


@dataclass
class DataArgs(GroupDataArgs):
    query_instruction_for_retrieval: str | None = None
    passage_instruction_for_retrieval: str | None = None


@dataclass
class TrainArgs:
    output_dir: str = "outputs/finetune"
    overwrite_output_dir: bool = False
    per_device_train_batch_size: int = 8
    gradient_accumulation_steps: int = 1
    learning_rate: float = 5e-5
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_epsilon: float = 1e-8
    max_grad_norm: float = 1.0
    num_train_epochs: float = 3.0
    max_steps: int = -1
    lr_scheduler_type: str = "linear"
    warmup_ratio: float = 0.0
    warmup_steps: int = 0
    logging_steps: int = field(default=10, metadata={
        "help": "report metrics to Ray Train every N steps (each report syncs the workers); every step's "
                "metrics are kept in training_summary.json either way"})
    save_steps: int = 500
    save_total_limit: int | None = None
    seed: int = 42
    fp16: bool = False
    bf16: bool = False
    gradient_checkpointing: bool = False
    deepspeed: str | None = field(default=None, metadata={"help": "DeepSpeed JSON config (needs the deepspeed extra)"})
    # Contrastive-loss options (FlagEmbedding's AbsEmbedderTrainingArguments).
    negatives_cross_device: bool = False
    temperature: float = 0.02
    fix_position_embedding: bool = False
    sentence_pooling_method: str | None = field(
        default=None, metadata={"help": "cls | mean | last_token; default: from the model's registry entry or files"}
    )
    normalize_embeddings: bool = True
    sub_batch_size: int | None = None
    grad_cache: bool = field(default=False, metadata={
        "help": "gradient caching: sub-batches of --sub_batch_size with the gradients of the whole batch "
                "(memory bounded by the sub-batch)"})
    kd_loss_type: str = field(default="kl_div", metadata={"choices": ["kl_div", "m3_kd_loss"]})


@dataclass
class RayArgs:
    num_workers: int = field(default=1, metadata={"help": "Ray Train workers (one per GPU with --use_gpu)"})
    use_gpu: bool = False
    cpus_per_worker: float | None = field(default=None, metadata={"help": "default: the machine's CPUs / workers"})
    address: str | None = field(default=None, metadata={"help": "Ray cluster address (default: local or RAY_ADDRESS)"})
    storage_path: str | None = field(default=None, metadata={"help": "where Ray Train keeps checkpoints (default: OUTPUT_DIR/ray)"})
    run_name: str | None = field(default=None, metadata={"help": "Ray Train run name; rerun with the same name to resume"})
    max_failures: int = field(default=0, metadata={"help": "worker-group restarts from the last checkpoint"})


def _unwrap(tp):
    """``int | None`` -> (int, optional); ``list[str]`` -> (list, str)."""
    origin = typing.get_origin(tp)
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)) and len(args) == 1:
        return _unwrap(args[0])
    if origin is list:
        return list, args[0]
    return tp, None


def add_dataclass_arguments(parser: argparse.ArgumentParser, cls, title: str | None = None) -> None:
    """One ``--name`` per dataclass field, typed from its annotation."""
    group = parser.add_argument_group(title or cls.__name__)
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp, item = _unwrap(hints[f.name])
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        kw: dict = {"default": default, "help": f.metadata.get("help"), "dest": f.name}
        if "choices" in f.metadata:
            kw["choices"] = f.metadata["choices"]
        if tp is bool:
            kw.update(type=hf_bool, nargs="?", const=True)
        elif tp is list:
            kw.update(type=item, nargs="+")
        else:
            kw["type"] = tp
        group.add_argument(f"--{f.name}", **kw)


def from_namespace(cls, ns: argparse.Namespace):
    return cls(**{f.name: getattr(ns, f.name) for f in dataclasses.fields(cls)})


def parse_training_args(argv, *extra: type, description: str | None = None, data_class: type = DataArgs):
    """Parse ``argv`` into (ModelArgs, DataArgs, TrainArgs, RayArgs, *extra instances); ``data_class``
    replaces DataArgs (the reranker's data arguments)."""
    parser = argparse.ArgumentParser(description=description)
    classes = (ModelArgs, data_class, TrainArgs, RayArgs, *extra)
    for cls in classes:
        add_dataclass_arguments(parser, cls)
    ns = parser.parse_args(argv)
    out = [from_namespace(cls, ns) for cls in classes]
    data = out[1]
    if not data.train_data:
        parser.error("--train_data is required (jsonl files or folders of them)")
    for path in data.train_data:
        if not os.path.exists(path):
            parser.error(f"--train_data: {path} does not exist")
    return out
