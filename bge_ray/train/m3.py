"""BGE-M3 unified fine-tuning (FlagEmbedding's ``encoder_only.m3``): one XLM-R pass feeds the dense,
sparse (lexical) and ColBERT heads, each trained with the contrastive loss, plus their ensemble and
optional self-knowledge distillation from the ensemble.

The loss, as FlagEmbedding defines it (``EncoderOnlyEmbedderM3Model.forward``)::

    dense    = InfoNCE(q_cls . p_cls / T)
    sparse   = InfoNCE(sum_v q_sparse[v] * p_sparse[v] / T)       # vocab-size vectors, max weight per token
    colbert  = InfoNCE(mean_i max_j q_i . p_j / T)                # token vectors after the first
    ensemble = InfoNCE(dense + 0.3 * sparse + colbert)            # the scores above, already / T
    loss     = (dense + ensemble + 0.1 * sparse + colbert) / 4
    with self-distillation (after ``self_distill_start_step`` forward passes), teacher = softmax(ensemble):
    loss     = (loss + (kl(teacher, dense) + 0.1 * kl(teacher, sparse) + kl(teacher, colbert)) / 3) / 2

Each InfoNCE term goes through :class:`bge_ray.train.losses.ContrastiveLoss` (``score_fn`` for the
sparse, ColBERT and ensemble scores), so teacher-score distillation (``kl_div`` / ``m3_kd_loss``) and
``no_in_batch_neg`` datasets work for every mode. As in FlagEmbedding, ``--negatives_cross_device``
gathers negatives for the dense loss only; ``--cross_device_all_modes`` extends it to the sparse,
ColBERT, ensemble and self-distillation terms (then 2 workers at batch B equal 1 worker at 2B).

Where we differ from FlagEmbedding 1.4.2 on purpose:

- ``no_in_batch_neg`` datasets with ``--unified_finetuning``: FlagEmbedding scores the ensemble of its
  per-group scores with a group size of 1 (the diagonal of a [B, G] matrix; a one-column softmax, so
  the ensemble loss is 0 and the self-distillation teacher is all ones, and batches larger than the
  group size fail). We score the ensemble over each query's own group like the other modes.
- the self-distillation start counts micro-batches across the whole run (resumption keeps counting);
  FlagEmbedding's counter restarts at 0 in every process.
- the sparse vectors are built with one ``scatter_reduce`` per batch ([N, vocab]); FlagEmbedding's
  training path materialises [N, seq, vocab] first (same values and gradients).
- with ``--unified_finetuning`` off, heads found in the checkpoint are kept (frozen) and saved again,
  so the result still loads as BGE-M3; FlagEmbedding drops them.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from bge_ray.models.pooling import check_pooling, pool

from .embedder import (
    EmbedderTask,
    freeze_unused,
    load_backbone,
    load_backbone_weights,
    write_sentence_transformers_files,
)
from .losses import ContrastiveLoss, LossOutput, kl_div_loss, mean_across_ranks, world

logger = logging.getLogger(__name__)

COLBERT_HEAD = "colbert_linear.pt"
SPARSE_HEAD = "sparse_linear.pt"
# FlagEmbedding's constants: the sparse score's weight in the ensemble and in the total loss.
ENSEMBLE_SPARSE_WEIGHT = 0.3
LOSS_SPARSE_WEIGHT = 0.1


@dataclass
class M3Args:
    """FlagEmbedding's M3 arguments (``EncoderOnlyEmbedderM3ModelArguments`` / ``...TrainingArguments``)
    plus two of ours (``fix_heads``, ``cross_device_all_modes``)."""

    unified_finetuning: bool = field(default=False, metadata={"help": "train the sparse and ColBERT heads too"})
    use_self_distill: bool = field(default=False, metadata={"help": "distil the ensemble into each mode (unified)"})
    self_distill_start_step: int = field(default=-1, metadata={"help": "self-distill after this many forward passes"})
    fix_encoder: bool = field(default=False, metadata={"help": "freeze the encoder, train the heads only"})
    fix_heads: bool = field(default=False, metadata={"help": "freeze the sparse and ColBERT heads"})
    colbert_dim: int = field(default=-1, metadata={"help": "ColBERT head width (default: the hidden size)"})
    cross_device_all_modes: bool = field(
        default=False,
        metadata={"help": "with --negatives_cross_device, gather negatives for sparse / ColBERT / ensemble too "
                          "(FlagEmbedding: dense only)"})


@dataclass
class M3Reps:
    dense: torch.Tensor  # [N, hidden]
    sparse: torch.Tensor | None = None  # [N, vocab]
    colbert: torch.Tensor | None = None  # [N, seq - 1, colbert_dim], zero at padding


class M3Trainable(torch.nn.Module):
    """The XLM-R backbone and its two heads: features -> dense, sparse and ColBERT representations."""

    def __init__(self, backbone: torch.nn.Module, colbert_linear: torch.nn.Linear | None,
                 sparse_linear: torch.nn.Linear | None, special_token_ids: list[int], pooling_method: str = "cls",
                 normalize: bool = True, unified: bool = True, sub_batch_size: int | None = None):
        super().__init__()
        if unified and (colbert_linear is None or sparse_linear is None):
            raise ValueError("unified fine-tuning needs both heads")
        self.backbone = backbone
        self.colbert_linear = colbert_linear
        self.sparse_linear = sparse_linear
        self.pooling_method = check_pooling(pooling_method)
        self.normalize = normalize
        self.unified = unified
        self.sub_batch_size = sub_batch_size
        self.vocab_size = backbone.config.vocab_size
        keep = torch.ones(self.vocab_size)
        keep[[i for i in special_token_ids if i is not None and 0 <= i < self.vocab_size]] = 0.0
        self.register_buffer("sparse_keep", keep, persistent=False)

    @property
    def config(self):
        return self.backbone.config

    def sparse_embedding(self, hidden: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
        """[N, vocab]: each token id's largest ``relu(sparse_linear(h))``; cls / eos / pad / unk zeroed."""
        weights = torch.relu(self.sparse_linear(hidden)).squeeze(-1)  # [N, L]
        out = weights.new_zeros(input_ids.size(0), self.vocab_size)
        out = out.scatter_reduce(1, input_ids, weights, reduce="amax", include_self=True)
        return out * self.sparse_keep.to(out.dtype)

    def colbert_embedding(self, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        vecs = self.colbert_linear(hidden[:, 1:]) * mask[:, 1:, None].float()
        return F.normalize(vecs, dim=-1) if self.normalize else vecs

    def _encode(self, features: dict) -> M3Reps:
        hidden = self.backbone(**features, return_dict=True).last_hidden_state
        dense = pool(hidden, features["attention_mask"], self.pooling_method).float()
        if self.normalize:
            dense = F.normalize(dense, dim=-1)
        if not self.unified:
            return M3Reps(dense)
        return M3Reps(dense, self.sparse_embedding(hidden, features["input_ids"]),
                      self.colbert_embedding(hidden, features["attention_mask"]))

    def encode(self, features: dict) -> M3Reps:
        n = features["input_ids"].shape[0]
        step = self.sub_batch_size if self.sub_batch_size and self.sub_batch_size > 0 else n
        parts = [self._encode({k: v[s:s + step] for k, v in features.items()}) for s in range(0, n, step)]
        if len(parts) == 1:
            return parts[0]
        cat = lambda xs: None if xs[0] is None else torch.cat(xs)  # noqa: E731
        return M3Reps(cat([r.dense for r in parts]), cat([r.sparse for r in parts]), cat([r.colbert for r in parts]))

    def forward(self, queries: dict, passages: dict) -> tuple[M3Reps, M3Reps]:
        return self.encode(queries), self.encode(passages)


# -- scores ---------------------------------------------------------------------------------------------
def colbert_scores(q: torch.Tensor, p: torch.Tensor, q_mask: torch.Tensor, temperature: float) -> torch.Tensor:
    """FlagEmbedding's training ColBERT score: for each query token its best passage token (padded
    passage tokens are zero vectors and take part), summed and divided by the query's token count."""
    token = torch.einsum("qin,pjn->qipj", q, p)
    return token.max(-1).values.sum(1) / q_mask.sum(-1, keepdim=True).to(token.dtype) / temperature


def _combine(parts: list[tuple[float, LossOutput]], scale: float = 1.0) -> LossOutput:
    backward = sum(w * o.backward for w, o in parts) * scale
    value = sum(w * o.value for w, o in parts) * scale
    return LossOutput(backward, value)


def _max_across_ranks(n: int, device) -> int:
    import torch.distributed as dist

    _, size = world()
    if size == 1:
        return n
    t = torch.tensor([n], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t.item())


def _pad_tokens(x: torch.Tensor, length: int) -> torch.Tensor:
    return x if x.size(1) == length else F.pad(x, (0, 0, 0, length - x.size(1)))


class M3Loss:
    """The unified M3 loss (see the module docstring) over :class:`M3Reps`."""

    def __init__(self, temperature: float = 0.02, negatives_cross_device: bool = False,
                 kd_loss_type: str = "kl_div", unified: bool = True, use_self_distill: bool = False,
                 self_distill_start_step: int = -1, cross_device_all_modes: bool = False):
        self.temperature = temperature
        self.unified = unified
        self.use_self_distill = use_self_distill
        self.self_distill_start_step = self_distill_start_step
        self.cross_device = negatives_cross_device
        self.all_modes = cross_device_all_modes
        self.dense = ContrastiveLoss(temperature, negatives_cross_device, kd_loss_type)
        self.heads = ContrastiveLoss(temperature, negatives_cross_device and cross_device_all_modes, kd_loss_type)

    def sparse_scores(self, q: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
        return q @ p.transpose(0, 1) / self.temperature

    def packed_colbert_scores(self, q_packed: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
        """``q_packed``: query token vectors with their attention mask as one extra channel (one tensor
        to gather across workers)."""
        return colbert_scores(q_packed[..., :-1], p, q_packed[..., -1], self.temperature)

    def __call__(self, q: M3Reps, p: M3Reps, q_mask: torch.Tensor, teacher_scores: torch.Tensor | None = None,
                 no_in_batch_neg: bool = False, step: int = 0) -> LossOutput:
        """``q_mask``: the queries' attention mask [B, L]; ``step``: forward passes done before this one."""
        full: dict[str, torch.Tensor] = {}

        def capture(name, fn):
            def scored(a, b):
                full[name] = fn(a, b)
                return full[name]
            return scored

        dense = self.dense(q.dense, p.dense, teacher_scores, no_in_batch_neg, score_fn=capture("dense", self.dense.scores))
        if not self.unified:
            return dense
        rank, size = world()
        cross = self.cross_device and size > 1 and not no_in_batch_neg
        all_cross = cross and self.all_modes
        q_col, p_col = q.colbert, p.colbert
        if all_cross:  # one token count on every rank, for the all-gather
            q_col = _pad_tokens(q_col, _max_across_ranks(q_col.size(1), q_col.device))
            p_col = _pad_tokens(p_col, _max_across_ranks(p_col.size(1), p_col.device))
            q_mask = F.pad(q_mask, (0, q_col.size(1) + 1 - q_mask.size(1)))
        q_packed = torch.cat([q_col, q_mask[:, 1:, None].to(q_col.dtype)], dim=-1)
        sparse = self.heads(q.sparse, p.sparse, teacher_scores, no_in_batch_neg,
                            score_fn=capture("sparse", self.sparse_scores))
        colbert = self.heads(q_packed, p_col, teacher_scores, no_in_batch_neg,
                             score_fn=capture("colbert", self.packed_colbert_scores))
        dense_full = full["dense"]
        if cross and not all_cross:  # FlagEmbedding: this rank's queries against this rank's passages
            b, n = q.dense.size(0), p.dense.size(0)
            dense_full = dense_full[rank * b:(rank + 1) * b, rank * n:(rank + 1) * n]
        ens_full = dense_full + ENSEMBLE_SPARSE_WEIGHT * full["sparse"] + full["colbert"]
        b, n = q.dense.size(0), p.dense.size(0)
        ensemble = self.heads(q.dense.new_zeros(b, 1), p.dense.new_zeros(n, 1), teacher_scores, no_in_batch_neg,
                              score_fn=lambda _q, _p: ens_full)
        loss = _combine([(1.0, dense), (1.0, ensemble), (LOSS_SPARSE_WEIGHT, sparse), (1.0, colbert)], 0.25)
        if not (self.use_self_distill and step > self.self_distill_start_step):
            return loss
        if no_in_batch_neg:  # each query against its own group, as the losses above
            s_dense, s_sparse, s_colbert, s_ens = dense.scores, sparse.scores, colbert.scores, ensemble.scores
        else:
            s_dense, s_sparse, s_colbert, s_ens = dense_full, full["sparse"], full["colbert"], ens_full
        teacher = torch.softmax(s_ens.detach(), dim=-1)
        sd = (kl_div_loss(teacher, s_dense) + LOSS_SPARSE_WEIGHT * kl_div_loss(teacher, s_sparse)
              + kl_div_loss(teacher, s_colbert)) / 3
        if all_cross:  # every rank holds the same global term; see losses.py on the scaling
            sd_out = LossOutput(sd * size, sd.detach())
        else:
            sd_out = LossOutput(sd, mean_across_ranks(sd))
        return _combine([(1.0, loss), (1.0, sd_out)], 0.5)


# -- heads ----------------------------------------------------------------------------------------------
def load_heads(folder: str | None, hidden: int, colbert_dim: int = -1) -> tuple[torch.nn.Linear, torch.nn.Linear, bool]:
    """(colbert_linear, sparse_linear, loaded): from the checkpoint's ``.pt`` files when both are there
    (``weights_only``), newly initialised otherwise (as FlagEmbedding does)."""
    from bge_ray.models.loading import load_linear_head

    out = colbert_dim if colbert_dim and colbert_dim > 0 else hidden
    paths = {name: os.path.join(folder, name) if folder else "" for name in (COLBERT_HEAD, SPARSE_HEAD)}
    present = [name for name, path in paths.items() if path and os.path.isfile(path)]
    if len(present) == 2:
        return (load_linear_head(paths[COLBERT_HEAD], hidden, out), load_linear_head(paths[SPARSE_HEAD], hidden, 1),
                True)
    if present:
        logger.warning("%s has only %s: both M3 heads are newly initialised", folder, present[0])
    else:
        logger.info("no %s / %s in %s: the M3 heads are newly initialised", COLBERT_HEAD, SPARSE_HEAD, folder)
    return torch.nn.Linear(hidden, out), torch.nn.Linear(hidden, 1), False


def special_token_ids(tokenizer) -> list[int]:
    """The tokens FlagEmbedding leaves out of sparse vectors: cls, eos, pad, unk."""
    ids = (tokenizer.cls_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id, tokenizer.unk_token_id)
    return sorted({i for i in ids if i is not None})


def build_m3_module(backbone, tokenizer, model_path: str | None, m3: M3Args, pooling_method: str = "cls",
                    normalize: bool = True, sub_batch_size: int | None = None,
                    fix_position_embedding: bool = False) -> M3Trainable:
    """The trainable module around ``backbone`` with the heads of ``model_path`` and ``m3``'s freezing."""
    colbert, sparse, loaded = load_heads(model_path, backbone.config.hidden_size, m3.colbert_dim)
    if not m3.unified_finetuning and not loaded:
        colbert = sparse = None  # dense only, nothing to keep
    module = M3Trainable(backbone, colbert, sparse, special_token_ids(tokenizer), pooling_method, normalize,
                         m3.unified_finetuning, sub_batch_size)
    freeze_unused(backbone, fix_position_embedding)
    if m3.fix_encoder:
        backbone.requires_grad_(False)
    for head in (colbert, sparse):
        if head is not None and (m3.fix_heads or not m3.unified_finetuning):
            head.requires_grad_(False)
    if not any(p.requires_grad for p in module.parameters()):
        raise ValueError("nothing to train: --fix_encoder freezes the encoder and the heads are frozen "
                         "(--fix_heads, or --unified_finetuning off)")
    return module


def save_heads(module: M3Trainable, folder: str) -> None:
    for name, head in ((COLBERT_HEAD, module.colbert_linear), (SPARSE_HEAD, module.sparse_linear)):
        if head is not None:
            torch.save({k: v.detach().clone().cpu() for k, v in head.state_dict().items()}, os.path.join(folder, name))


@dataclass
class M3Task(EmbedderTask):
    """BGE-M3 fine-tuning for the shared Ray Train loop (FlagEmbedding's encoder_only.m3)."""

    m3: M3Args = field(default_factory=M3Args)

    def build(self):
        if self.m3.fix_encoder and self.m3.fix_heads:
            raise ValueError("--fix_encoder with --fix_heads leaves nothing to train")
        if self.m3.use_self_distill and not self.m3.unified_finetuning:
            logger.warning("--use_self_distill needs --unified_finetuning: ignored")
        backbone, tokenizer = load_backbone(self.model)
        from bge_ray.models.loading import resolve_model_path

        path = resolve_model_path(self.model.model_name_or_path, cache_dir=self.model.cache_dir)
        t = self.train
        module = build_m3_module(backbone, tokenizer, path, self.m3, self.pooling_method, t.normalize_embeddings,
                                 t.sub_batch_size, t.fix_position_embedding)
        self.loss = M3Loss(t.temperature, t.negatives_cross_device, t.kd_loss_type, self.m3.unified_finetuning,
                           self.m3.use_self_distill, self.m3.self_distill_start_step, self.m3.cross_device_all_modes)
        self.tokenizer = tokenizer
        return module, tokenizer

    def step(self, model, rows, batch, device) -> LossOutput:
        q, p, teacher = self.features(self.tokenizer, rows, batch, device)
        q_reps, p_reps = model(q, p)
        return self.loss(q_reps, p_reps, q["attention_mask"], teacher, bool(rows[0]["no_in_batch_neg"]), step=batch)

    def save(self, model: M3Trainable, tokenizer, folder: str) -> None:
        os.makedirs(folder, exist_ok=True)
        model.backbone.save_pretrained(folder, safe_serialization=True)
        tokenizer.save_pretrained(folder)
        save_heads(model, folder)
        write_sentence_transformers_files(folder, model.pooling_method, model.normalize, self.data.passage_max_len,
                                          model.backbone.config.hidden_size)

    def load(self, model: M3Trainable, folder: str) -> None:
        load_backbone_weights(model.backbone, folder)
        for name, head in ((COLBERT_HEAD, model.colbert_linear), (SPARSE_HEAD, model.sparse_linear)):
            if head is not None:
                head.load_state_dict(torch.load(os.path.join(folder, name), map_location="cpu", weights_only=True))
