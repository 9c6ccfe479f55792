"""Packed chat SFT under the block-diffusion objective: a packed row's per-token losses equal each
conversation's alone, and a short run logs the validation loss and the real-token fraction."""

import grain
import jax
import numpy as np
import pytest

from helpers import assert_close_to_scale, load_config
from llada_jax import data, train
from llada_jax.data.pipeline import tokenize_sft
from llada_jax.data.tokenizer import build_task_tokenizer
from llada_jax.model.config import get_config
from llada_jax.train import objectives

MC = get_config("tiny")
BLOCK = 8
_logprobs = jax.jit(objectives.per_token_logprobs, static_argnames=("model_config", "block_size", "mdlm"))


def conversation(i: int, turns: int):
    head = [{"role": "system", "content": f"s{i}"}] if i % 2 else []
    body = []
    for t in range(turns):
        body += [{"role": "user", "content": f"{i}*{t}?" * (1 + (i + t) % 3)},
                 {"role": "assistant", "content": f"={i * t}" * (1 + (i + 2 * t) % 4)}]
    return {"messages": head + body, "meta": {}}


def test_packed_per_token_losses_equal_each_conversation_alone(tiny_hf):
    """Oracle: each conversation alone at the start of a row of its own (positions from 0, no
    neighbours; the rest of the row padding no real token attends, so one compiled forward serves
    every conversation). The packed row comes from the real pipeline (multi-turn conversations,
    block-aligned starts, padding between them); the same masked / edited input per
    conversation, fp32. (tests/train/test_objectives.py holds packed documents to unpadded
    rows of their own.)"""
    config, params = tiny_hf
    assert config == MC
    tok = build_task_tokenizer()
    examples = [conversation(i, 1 + i % 3) for i in range(12)]
    batch = next(iter(data.packed_sft_dataset(grain.MapDataset.source(examples), tok, batch_size=1, seq_len=256,
                                              block_size=BLOCK, shuffle=False, packing_bins=1)))
    x_0, weight, doc_ids = batch["tokens"], batch["loss_mask"], batch["doc_ids"]
    docs = [d for d in np.unique(doc_ids) if d > 0]
    assert len(docs) >= 3 and (doc_ids == 0).any()  # several conversations and some padding in the row
    assert not weight[doc_ids == 0].any()  # padding gets zero weight
    rng = np.random.default_rng(0)
    masked = weight & (rng.random(x_0.shape) < 0.5)
    edited = weight & ~masked & (rng.random(x_0.shape) < 0.3)
    x_t = np.where(masked, MC.mask_token_id, np.where(edited, rng.integers(0, 500, x_0.shape), x_0)).astype(np.int32)
    packed = -np.asarray(_logprobs(params, MC, x_t, x_0, block_size=BLOCK, doc_ids=doc_ids)) * weight
    multi_turn = 0
    for d in docs:
        span = np.flatnonzero(doc_ids[0] == d)
        a, b = span[0], span[-1] + 1
        own_x_t, own_x_0, own_ids = (np.full_like(x_0, tok.pad_id), np.full_like(x_0, tok.pad_id),
                                     np.zeros_like(doc_ids))
        own_x_t[:, :b - a], own_x_0[:, :b - a], own_ids[:, :b - a] = x_t[:, a:b], x_0[:, a:b], 1
        own = np.asarray(_logprobs(params, MC, own_x_t, own_x_0, block_size=BLOCK, doc_ids=own_ids))
        alone = -own[:, :b - a] * weight[:, a:b]
        assert_close_to_scale(packed[:, a:b], alone, rel=1e-5, err_msg=f"conversation {d} at {a}:{b}")
        by_itself = next(tokenize_sft(ex, tok) for ex in examples if tokenize_sft(ex, tok)["tokens"].tolist()
                         == x_0[0, a:b].tolist())
        np.testing.assert_array_equal(weight[0, a:b], by_itself["loss_mask"])  # the weights of every assistant turn
        multi_turn += int(np.sum(np.diff(by_itself["loss_mask"].astype(int)) == 1) > 1)
    assert multi_turn >= 1  # at least one packed conversation has several trained turns
    assert np.count_nonzero(packed) > 0


@pytest.fixture(scope="module")
def chat_data(tmp_path_factory):
    """A small chat JSONL dataset with a validation split."""
    import json

    d = tmp_path_factory.mktemp("chat")
    for split, lo, n in (("train", 0, 200), ("validation", 1000, 24)):
        with open(d / f"{split}.jsonl", "w") as f:
            for i in range(lo, lo + n):
                f.write(json.dumps(conversation(i, 1 + i % 3)) + "\n")
    data.import_jsonl("mini_chat", {"train": [str(d / "train.jsonl")], "validation": [str(d / "validation.jsonl")]},
                      str(d / "data"))
    return str(d / "data")


def test_a_short_packed_run_logs_validation_loss_and_real_token_fraction(tmp_path, chat_data):
    cfg = load_config("quickstart.py", **{
        "data.task": "", "data.dataset": "chat_jsonl/mini_chat", "data.data_dir": chat_data, "data.template": "chat",
        "data.pack_conversations": True, "data.packing_bins": 8, "data.seq_len": 128, "data.batch_size": 8,
        "objective.block_size": BLOCK, "total_steps": 4, "log_every": 1, "eval_every": 2, "eval_batches": 2,
        "checkpoint_every": 100})
    workdir = str(tmp_path)
    tokenizer = train.load_tokenizer(cfg, workdir)
    model_config = train.build_model_config(cfg)
    obj = train.build_objective(cfg, model_config, extra_special_ids=tokenizer.special_ids)
    held_out = train.eval_batches(cfg, workdir, tokenizer)
    assert len(held_out) == 2 and all((b["doc_ids"] > 0).any() for b in held_out)
    train.run_training(cfg, workdir, model_config, obj, train.train_iterator(cfg, workdir, tokenizer),
                       progress=False, eval_data=held_out)
    rows = train.read_metrics(workdir)
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert [r["step"] for r in rows if "val_loss" in r] == [2, 4]
    val = [r["val_loss"] for r in rows if "val_loss" in r]
    assert all(np.isfinite(val)) and val[-1] < val[0]  # the held-out loss follows training
    for r in rows:
        assert 0.5 < r["real_token_fraction"] < 1.0  # packed rows: mostly real, never counting padding
