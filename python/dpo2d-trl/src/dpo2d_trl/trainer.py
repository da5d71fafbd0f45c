"""`DPO2DTrainer`: TRL's `DPOTrainer` with dpo2d's data, tokenization, data
order and 2-D losses.

What it changes in `DPOTrainer`, and nothing else:

* ``_prepare_dataset`` (TRL's tokenization hook): pairs are tokenized as
  `dpo2d train` does (:mod:`dpo2d_trl.align`), keeping each token's segment
  and each segment's scores. This is the one private TRL method replaced.
* ``data_collator`` (a constructor argument): the TRL batch keys
  (``input_ids``, ``attention_mask``, ``completion_mask``; chosen rows first)
  plus, for the 2-D losses, each token's segment id and the segment scores.
* ``_get_train_sampler`` (a `transformers.Trainer` hook): dpo2d's seeded
  per-epoch order (``random``) or file order (``sequential``).
* ``compute_loss`` (public): ``2d-dpo`` and ``1d-dpo`` as dpo2d computes them
  (:mod:`dpo2d_trl.loss`), with dpo2d's metrics gathered over all ranks;
  every other loss is TRL's own ``loss_type`` (``super().compute_loss``).
* ``log`` (public): ``lr`` and ``tokens/s`` as dpo2d names them; a callback
  writes ``metrics.jsonl`` on rank 0.

The reference for the 2-D losses runs alongside the policy, as TRL's default
``precompute_ref_log_probs=False`` does it: a frozen copy of the starting
policy (prepared with DeepSpeed or FSDP like the policy) or, with LoRA, the
base model with the adapters disabled. (TRL's precompute keeps only
sequence sums; the 2-D loss needs per-token reference log-probs.)
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import os
import time
from dataclasses import dataclass, field
from typing import Any

import torch
from datasets import Dataset
from transformers import TrainerCallback
from trl import DPOConfig, DPOTrainer

from .align import NO_SEGMENT, Aligner, TokenizedPair
from .data import PLAIN, SCORED, Pair, load_pairs, parse_pair, require_scored
from .loss import PAPER_WEIGHTS, TWO_D_LOSSES, check_weights, two_d_loss
from .sampler import Dpo2dSampler

try:  # TRL utilities used by its own reference pass; optional so a rename degrades gracefully.
    from trl.trainer.utils import use_adapter as _use_adapter
except ImportError:  # pragma: no cover
    _use_adapter = None
try:
    from trl.trainer.utils import disable_gradient_checkpointing as _disable_gc
except ImportError:  # pragma: no cover
    _disable_gc = None

# Per-pair metrics, in the order they are gathered.
_METRICS = (
    "loss",
    "rewards/chosen",
    "rewards/rejected",
    "rewards/accuracies",
    "rewards/margins",
    "logps/chosen",
    "logps/rejected",
    "nll_loss",
    "sft_loss",
    "segments/pairs",
    "kl/chosen",
    "kl/rejected",
)


@dataclass
class DPO2DConfig(DPOConfig):
    """`DPOConfig` plus dpo2d's options, with dpo2d's defaults where the two differ."""

    dpo2d_loss: str | None = field(
        default="2d-dpo",
        metadata={"help": "2d-dpo or 1d-dpo (dpo2d's loss); None: TRL's `loss_type`."},
    )
    sft_weight: float = field(default=0.1, metadata={"help": "Weight of the SFT term (mean NLL per chosen token)."})
    aspect_weights: list[float] = field(
        default_factory=lambda: list(PAPER_WEIGHTS),
        metadata={"help": "W: helpfulness, correctness, safety, completeness, clarity (sum 1)."},
    )
    max_prompt_length: int = field(default=512, metadata={"help": "Prompt tokens kept (its end)."})
    dpo2d_data_order: bool = field(
        default=True,
        metadata={"help": "Train in dpo2d's order (seeded SplitMix64 per epoch, or file order when sequential)."},
    )
    metrics_file: str | None = field(default="metrics.jsonl", metadata={"help": "Written in output_dir on rank 0."})
    # dpo2d's defaults where DPOConfig has others. Checkpointing is off unless asked for
    # (transformers 5 names it `activation_checkpointing`, `gradient_checkpointing` being its alias).
    gradient_checkpointing: bool | None = None
    bf16: bool | None = False
    max_length: int | None = 1024
    remove_unused_columns: bool = False
    precompute_ref_log_probs: bool = False
    prediction_loss_only: bool = True

    def __post_init__(self):
        super().__post_init__()
        if self.dpo2d_loss is not None:
            if self.dpo2d_loss not in TWO_D_LOSSES:
                raise ValueError(f"dpo2d_loss must be one of {', '.join(TWO_D_LOSSES)} or None, got {self.dpo2d_loss!r}")
            if self.precompute_ref_log_probs:
                raise ValueError(
                    f"{self.dpo2d_loss} needs per-token reference log-probs, which TRL's precompute does not keep; "
                    "set precompute_ref_log_probs=False (the reference then runs alongside the policy)"
                )
            self.aspect_weights = list(check_weights(self.aspect_weights))
        if not self.max_length or self.max_length < 2:
            raise ValueError("max_length must be at least 2")
        if self.beta <= 0:
            raise ValueError(f"beta must be > 0, got {self.beta}")


# ---------------------------------------------------------------- data ----


def _response_from_trl(v: Any) -> Any:
    """TRL's conversational completion (a list with one assistant message) as text."""
    if isinstance(v, list) and len(v) == 1 and isinstance(v[0], dict) and v[0].get("role") == "assistant":
        return v[0].get("content")
    return v


def pairs_from_rows(rows, requirement: str) -> list[Pair]:
    """Pairs from row dicts in dpo2d's shape or TRL's (standard or conversational, explicit prompt)."""
    out, problems = [], []
    for i, row in enumerate(rows, 1):
        row = dict(row)
        for side in ("chosen", "rejected"):
            row[side] = _response_from_trl(row.get(side))
        pair, probs = parse_pair(row, i, requirement)
        if pair is None:
            problems.extend(f"row {p.line}: {p.message} [{p.code}]" for p in probs)
        else:
            out.append(pair)
    if problems:
        raise ValueError("invalid pairs:\n" + "\n".join(problems[:20]))
    return out


def tokenized_dataset(pairs: list[TokenizedPair]) -> Dataset:
    """The columns the collator reads (TRL's ``prompt_ids``/``chosen_ids``/``rejected_ids`` and the segments)."""
    return Dataset.from_dict(
        {
            "index": [p.index for p in pairs],
            "prompt_ids": [p.prompt for p in pairs],
            "chosen_ids": [p.chosen.ids for p in pairs],
            "rejected_ids": [p.rejected.ids for p in pairs],
            "chosen_segments": [p.chosen.token_segments for p in pairs],
            "rejected_segments": [p.rejected.token_segments for p in pairs],
            "chosen_scores": [[list(s) for s in p.chosen.scores] for p in pairs],
            "rejected_scores": [[list(s) for s in p.rejected.scores] for p in pairs],
        }
    )


@dataclass
class DataCollatorFor2D:
    """Pads a list of tokenized pairs into TRL's batch layout: ``[2B, T]`` rows
    of prompt + chosen (first B) and prompt + rejected (last B), right-padded,
    with ``completion_mask`` on the response tokens. With ``with_segments``,
    also ``segment_ids`` ``[2B, T]`` (-1 outside segments) and
    ``segment_scores`` ``[2B, S, 5]`` with ``segment_counts`` ``[2B]``.
    No truncation: the pairs are already cut as dpo2d cuts them."""

    pad_token_id: int
    with_segments: bool = True

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        if self.with_segments and examples and "chosen_segments" not in examples[0]:
            raise ValueError(
                "the batch has no segment columns: the dataset was not tokenized by dpo2d_trl "
                "(DPO2DTrainer._prepare_dataset was not called; has TRL's DPOTrainer changed?)"
            )
        rows, masks, segs, scores = [], [], [], []
        for side in ("chosen", "rejected"):
            for ex in examples:
                p, r = list(ex["prompt_ids"]), list(ex[f"{side}_ids"])
                rows.append(p + r)
                masks.append([0] * len(p) + [1] * len(r))
                if self.with_segments:
                    segs.append([NO_SEGMENT] * len(p) + [int(s) for s in ex[f"{side}_segments"]])
                    scores.append([list(s) for s in ex[f"{side}_scores"]])
        width = max(len(r) for r in rows)
        n = len(rows)
        input_ids = torch.full((n, width), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((n, width), dtype=torch.long)
        completion_mask = torch.zeros((n, width), dtype=torch.long)
        for i, (r, m) in enumerate(zip(rows, masks)):
            input_ids[i, : len(r)] = torch.tensor(r, dtype=torch.long)
            attention_mask[i, : len(r)] = 1
            completion_mask[i, : len(m)] = torch.tensor(m, dtype=torch.long)
        out = {"input_ids": input_ids, "attention_mask": attention_mask, "completion_mask": completion_mask}
        for key in ("ref_chosen_logps", "ref_rejected_logps"):  # TRL's precomputed reference (its own losses)
            if key in examples[0]:
                out[key] = torch.tensor([ex[key] for ex in examples])
        if self.with_segments:
            segment_ids = torch.full((n, width), NO_SEGMENT, dtype=torch.long)
            s_max = max(1, max(len(s) for s in scores))
            segment_scores = torch.zeros((n, s_max, 5), dtype=torch.long)
            for i, (s, sc) in enumerate(zip(segs, scores)):
                segment_ids[i, : len(s)] = torch.tensor(s, dtype=torch.long)
                if sc:
                    segment_scores[i, : len(sc)] = torch.tensor(sc, dtype=torch.long)
            out["segment_ids"] = segment_ids
            out["segment_scores"] = segment_scores
            out["segment_counts"] = torch.tensor([len(sc) for sc in scores], dtype=torch.long)
        return out


# ------------------------------------------------------------- metrics ----


class MetricsJsonl(TrainerCallback):
    """Appends every log record (dpo2d's names) to ``<output_dir>/metrics.jsonl`` on rank 0."""

    def __init__(self, path: str):
        self.path = path

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs or "train_runtime" in logs:
            return
        rec: dict[str, Any] = {"step": state.global_step, "epoch": logs.get("epoch", state.epoch or 0.0)}
        for k, v in logs.items():
            if k == "epoch" or isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                continue
            rec[k] = v
        os.makedirs(os.path.dirname(self.path) or ".", exist_ok=True)
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(rec) + "\n")


def dpo2d_readable_config(model_dir: str) -> bool:
    """Make a saved model's ``config.json`` readable by dpo2d: transformers 5
    writes the rotary base as ``rope_parameters.rope_theta`` and the dtype as
    ``dtype``, while dpo2d reads the top-level ``rope_theta`` (default 10000,
    which would silently give other logits) and ``torch_dtype``. Both spellings
    are kept, so transformers reads the file as before. True if it changed."""
    path = os.path.join(model_dir, "config.json")
    if not os.path.isfile(path):
        return False
    with open(path, encoding="utf-8") as f:
        cfg = json.load(f)
    changed = False
    rope = cfg.get("rope_parameters")
    if isinstance(rope, dict) and "rope_theta" not in cfg and isinstance(rope.get("rope_theta"), (int, float)):
        cfg["rope_theta"] = rope["rope_theta"]
        changed = True
    if "torch_dtype" not in cfg and isinstance(cfg.get("dtype"), str):
        cfg["torch_dtype"] = cfg["dtype"]
        changed = True
    if changed:
        tmp = path + ".tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(cfg, f, indent=2, sort_keys=True)
            f.write("\n")
        os.replace(tmp, path)
    return changed


class Dpo2dCheckpoints(TrainerCallback):
    """Checkpoints as dpo2d writes them: every ``save_steps`` but not at the
    end, where ``final/`` is (transformers would also save one after the last
    step); every checkpoint's ``config.json`` in the form dpo2d reads (rank 0)."""

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step >= state.max_steps and not (args.save_steps and state.global_step % args.save_steps == 0):
            control.should_save = False

    def on_save(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            dpo2d_readable_config(os.path.join(args.output_dir, f"checkpoint-{state.global_step}"))


# ------------------------------------------------------------- trainer ----


class DPO2DTrainer(DPOTrainer):
    """`DPOTrainer` on dpo2d's 2-D data with dpo2d's 2-D losses (module docs).

    ``train_dataset`` / ``eval_dataset``: a path to a dpo2d JSONL file, a
    list of :class:`dpo2d_trl.data.Pair`, a list of :class:`TokenizedPair`,
    or a `datasets.Dataset` (already tokenized by this package, or rows in
    dpo2d's or TRL's pair shape).
    """

    def __init__(
        self,
        model,
        ref_model=None,
        args: DPO2DConfig | None = None,
        train_dataset=None,
        eval_dataset=None,
        processing_class=None,
        callbacks=None,
        peft_config=None,
        **kwargs,
    ):
        if args is None:
            args = DPO2DConfig(output_dir="runs/dpo2d-trl")
        if not isinstance(args, DPO2DConfig):
            raise TypeError("DPO2DTrainer needs a DPO2DConfig")
        if processing_class is None:
            raise ValueError("pass the tokenizer as processing_class")
        self._dpo2d_args = args
        self._aligner = Aligner(processing_class)
        train_dataset = self._to_dataset(train_dataset, "train")
        if eval_dataset is not None:
            eval_dataset = self._to_dataset(eval_dataset, "eval")
        tok = processing_class
        if tok.pad_token is None:
            tok.pad_token = tok.eos_token
        collator = DataCollatorFor2D(tok.pad_token_id, with_segments=args.dpo2d_loss is not None)
        callbacks = list(callbacks or []) + [Dpo2dCheckpoints()]
        if args.metrics_file:
            callbacks.append(MetricsJsonl(os.path.join(args.output_dir, args.metrics_file)))
        self._tokens = 0
        self._tokens_clock = time.perf_counter()
        if (
            ref_model is None
            and peft_config is None
            and not isinstance(model, str)
            and not hasattr(model, "peft_config")
            and not getattr(model.config, "_name_or_path", "")
        ):
            # TRL loads the reference copy from the model's path; a model built in memory has none.
            ref_model = copy.deepcopy(model)
        super().__init__(
            model,
            ref_model=ref_model,
            args=args,
            data_collator=collator,
            train_dataset=train_dataset,
            eval_dataset=eval_dataset,
            processing_class=processing_class,
            callbacks=callbacks,
            peft_config=peft_config,
            **kwargs,
        )

    # -- data -------------------------------------------------------------

    def _requirement(self) -> str:
        return SCORED if self._dpo2d_args.dpo2d_loss is not None else PLAIN

    def _tokenize(self, pairs: list[Pair], name: str) -> Dataset:
        a = self._dpo2d_args
        if a.dpo2d_loss is not None:
            require_scored(pairs, a.dpo2d_loss)
        tokenized, report = self._aligner.pairs(pairs, a.max_length, a.max_prompt_length)
        if int(os.environ.get("RANK", "0")) == 0:
            print(f"{name}: {report}", flush=True)
        return tokenized_dataset(tokenized)

    def _to_dataset(self, data, name: str) -> Dataset:
        if isinstance(data, (str, os.PathLike)):
            return self._tokenize(load_pairs(data, self._requirement()).pairs, name)
        if isinstance(data, list) and data and isinstance(data[0], TokenizedPair):
            return tokenized_dataset(data)
        if isinstance(data, list):
            if data and not isinstance(data[0], Pair):
                data = pairs_from_rows(data, self._requirement())
            return self._tokenize(data, name)
        if isinstance(data, dict):
            return {k: self._to_dataset(v, f"{name}_{k}") for k, v in data.items()}  # type: ignore[return-value]
        return data

    def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
        # Replaces TRL's tokenization with dpo2d's (module docs).
        if isinstance(dataset, Dataset) and "prompt_ids" in dataset.column_names and "chosen_segments" in dataset.column_names:
            return dataset
        if isinstance(dataset, Dataset):
            return self._tokenize(pairs_from_rows(dataset, self._requirement()), dataset_name)
        raise TypeError(f"{type(self).__name__} takes a map-style Dataset, a list of pairs or a JSONL path")

    def _get_train_sampler(self, train_dataset=None):
        a = self.args
        if not getattr(a, "dpo2d_data_order", False) or a.train_sampling_strategy not in ("random", "sequential"):
            return super()._get_train_sampler(train_dataset)
        ds = train_dataset if train_dataset is not None else self.train_dataset
        seed = a.data_seed if a.data_seed is not None else a.seed
        return Dpo2dSampler(len(ds), seed, a.train_sampling_strategy)

    # -- loss ---------------------------------------------------------------

    @staticmethod
    def _token_logps(model, input_ids, attention_mask, labels) -> torch.Tensor:
        """``[N, T-1]``: log-prob of token t+1 at position t where labels are set, else 0."""
        # TRL's fused LM head (added to the policy and the reference by DPOTrainer) gives the
        # log-probs without a [tokens x vocab] logits tensor; a model without it gives logits.
        try:
            out = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels, fused_lm_head=True, use_cache=False)
        except TypeError:
            out = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
        target = labels[:, 1:]
        lp = getattr(out, "log_probs", None)
        if lp is not None:
            lp = lp[:, -target.shape[1] :]
        else:
            logits = out.logits[:, -target.shape[1] - 1 : -1]
            lp = torch.log_softmax(logits.float(), -1).gather(-1, target.clamp(min=0).unsqueeze(-1)).squeeze(-1)
        return lp.float() * (target != -100)

    def _reference_logps(self, model, input_ids, attention_mask, labels) -> torch.Tensor:
        gc_off = (
            _disable_gc(self.model, self.args.gradient_checkpointing_kwargs) if _disable_gc else contextlib.nullcontext()
        )
        with torch.no_grad(), gc_off:
            if self.ref_model is not None:
                return self._token_logps(self.ref_model, input_ids, attention_mask, labels)
            unwrapped = self.accelerator.unwrap_model(self.model)
            if hasattr(unwrapped, "peft_config"):
                name = "ref" if "ref" in unwrapped.peft_config else None
                ctx = _use_adapter(unwrapped, adapter_name=name) if _use_adapter else unwrapped.disable_adapter()
                with ctx:
                    return self._token_logps(model, input_ids, attention_mask, labels)
        raise RuntimeError("no reference model: the 2-D losses need one running alongside the policy")

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        a = self._dpo2d_args
        if a.dpo2d_loss is None:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        mode = "train" if self.model.training else "eval"
        input_ids, attention_mask, completion_mask = inputs["input_ids"], inputs["attention_mask"], inputs["completion_mask"]
        labels = input_ids.masked_fill(completion_mask == 0, -100)
        policy = self._token_logps(model, input_ids, attention_mask, labels)
        reference = self._reference_logps(model, input_ids, attention_mask, labels)
        mask = completion_mask[:, 1:]
        seg = inputs["segment_ids"][:, 1:]
        counts = inputs["segment_counts"].tolist()
        all_scores = inputs["segment_scores"].tolist()
        scores = [[tuple(s) for s in all_scores[i][: counts[i]]] for i in range(len(counts))]
        b = input_ids.shape[0] // 2
        out = two_d_loss(
            a.dpo2d_loss,
            policy[:b],
            policy[b:],
            reference[:b],
            reference[b:],
            mask[:b],
            mask[b:],
            seg[:b],
            seg[b:],
            scores[:b],
            scores[b:],
            beta=a.beta,
            sft_weight=a.sft_weight,
            aspect_weights=a.aspect_weights,
        )
        # The global batch's values: per-pair values of every rank, then their means.
        stacked = torch.stack([out.per_pair[k].float() for k in _METRICS], dim=1)  # [B, K]
        gather = self.accelerator.gather_for_metrics if mode == "eval" else self.accelerator.gather
        means = gather(stacked).mean(0).tolist()
        for k, v in zip(_METRICS, means):
            self._metrics[mode][k].append(v)
        if mode == "train":
            self._tokens += int(self.accelerator.gather(attention_mask.sum().reshape(1)).sum().item())
        if return_outputs:
            return out.loss, {"per_pair": out.per_pair}
        return out.loss

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "learning_rate" in logs:
            logs["lr"] = logs.pop("learning_rate")
        if "loss" in logs and self.model.training and self._dpo2d_args.dpo2d_loss is not None:
            now = time.perf_counter()
            logs["tokens/s"] = self._tokens / max(now - self._tokens_clock, 1e-9)
            self._tokens, self._tokens_clock = 0, now
        super().log(logs, start_time)
