"""DPO2DTrainer end to end on a tiny random Llama (CPU, seconds): the wiring
of dataset, collator, sampler, loss, metrics.jsonl and saving."""

import json

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from dpo2d_trl.data import Pair, Response, Segment
from dpo2d_trl.loss import two_d_loss
from dpo2d_trl.trainer import DPO2DConfig, DPO2DTrainer, dpo2d_readable_config


def pairs():
    def seg(t, h):
        return Segment(t, (h, 4, 4, h, 3))

    def resp(*segs):
        return Response("".join(s.text for s in segs), list(segs))

    p = [{"role": "user", "content": "hi"}]
    return [
        Pair(p, resp(seg("Ab. ", 4), seg("Cd.", 3)), resp(seg("No. ", 0), seg("x", 1), seg("y.", 2))),
        Pair(p, resp(seg("Yes.", 4)), resp(seg("Nope.", 1))),
        Pair(p, resp(seg("Ok. ", 3), seg("Fine.", 4)), resp(seg("Bad.", 0))),
    ]


def tiny_model(vocab: int) -> LlamaForCausalLM:
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=True)  # fmt: skip
    return LlamaForCausalLM(cfg)


@pytest.mark.parametrize("loss", ["2d-dpo", "1d-dpo"])
def test_one_step_writes_dpo2d_metrics_and_a_model(tok, tmp_path, loss):
    out = tmp_path / "run"
    args = DPO2DConfig(
        output_dir=str(out), dpo2d_loss=loss, per_device_train_batch_size=2, max_steps=2, logging_steps=1,
        learning_rate=1e-3, use_cpu=True, report_to="none", save_strategy="no", train_sampling_strategy="sequential",
        max_length=64, max_prompt_length=32, disable_tqdm=True, seed=1,
    )  # fmt: skip
    trainer = DPO2DTrainer(tiny_model(len(tok)), args=args, train_dataset=pairs(), processing_class=tok)
    # The loss of the first batch, computed directly, equals what the trainer logs at step 1.
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(2)])
    trainer.train()
    records = [json.loads(l) for l in open(out / "metrics.jsonl")]
    assert [r["step"] for r in records] == [1, 2]
    first = records[0]
    for key in ("loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies",
                "logps/chosen", "logps/rejected", "nll_loss", "sft_loss", "segments/pairs", "kl/chosen",
                "kl/rejected", "lr", "grad_norm", "tokens/s"):  # fmt: skip
        assert key in first, key
    assert first["rewards/chosen"] == 0.0 and first["segments/pairs"] == 1.5  # N = 2 and 1
    model = LlamaForCausalLM(trainer.model.config)
    model.load_state_dict(tiny_model(len(tok)).state_dict())
    with torch.no_grad():
        ids, am, cm = batch["input_ids"], batch["attention_mask"], batch["completion_mask"]
        labels = ids.masked_fill(cm == 0, -100)
        lp = DPO2DTrainer._token_logps(model, ids, am, labels)
    counts, sc = batch["segment_counts"].tolist(), batch["segment_scores"].tolist()
    scores = [[tuple(s) for s in sc[i][: counts[i]]] for i in range(4)]
    seg, m = batch["segment_ids"][:, 1:], cm[:, 1:]
    direct = two_d_loss(loss, lp[:2], lp[2:], lp[:2], lp[2:], m[:2], m[2:], seg[:2], seg[2:], scores[:2], scores[2:])
    assert first["loss"] == pytest.approx(direct.loss.item(), rel=1e-5)
    trainer.save_model(str(out / "final"))
    dpo2d_readable_config(str(out / "final"))
    cfg = json.load(open(out / "final" / "config.json"))
    assert cfg["rope_theta"] == cfg["rope_parameters"]["rope_theta"] and cfg["torch_dtype"] == "float32"
    assert LlamaForCausalLM.from_pretrained(str(out / "final")).config.vocab_size == len(tok)


def test_2d_loss_refuses_plain_pairs(tok, tmp_path):
    plain = [Pair([{"role": "user", "content": "hi"}], Response("ab"), Response("cd"))]
    args = DPO2DConfig(output_dir=str(tmp_path), use_cpu=True, report_to="none")
    with pytest.raises(ValueError, match="segment-level 5-aspect scores"):
        DPO2DTrainer(tiny_model(len(tok)), args=args, train_dataset=plain, processing_class=tok)
    with pytest.raises(ValueError, match="precompute_ref_log_probs"):
        DPO2DConfig(output_dir=str(tmp_path), precompute_ref_log_probs=True)


def test_trl_losses_run_on_dpo2d_tokens_with_a_precomputed_reference(tok, tmp_path):
    args = DPO2DConfig(
        output_dir=str(tmp_path), dpo2d_loss=None, loss_type=["sigmoid", "sft"], loss_weights=[1.0, 0.1],
        precompute_ref_log_probs=True, per_device_train_batch_size=2, max_steps=1, logging_steps=1,
        use_cpu=True, report_to="none", save_strategy="no", disable_tqdm=True, max_length=64, max_prompt_length=32,
    )  # fmt: skip
    plain = [Pair([{"role": "user", "content": "hi"}], Response(c), Response(r)) for c, r in [("ab", "cd"), ("Yes.", "No.")]]
    trainer = DPO2DTrainer(tiny_model(len(tok)), args=args, train_dataset=plain, processing_class=tok)
    assert "ref_chosen_logps" in trainer.train_dataset.column_names
    trainer.train()
    rec = json.loads(open(tmp_path / "metrics.jsonl").readline())
    assert rec["step"] == 1 and rec["rewards/chosen"] == pytest.approx(0.0, abs=1e-5) and "lr" in rec
