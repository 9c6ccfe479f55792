"""Held-out evaluation: decode prompts with Draft-and-Edit, score completions with the task's reward.

Accuracy is the fraction of completions with reward 1 (exact answers); `reward` is the mean
reward (partial credit where the task gives it); TPF is generated tokens per model forward,
every forward counted (REFERENCE §5 "Metrics").
"""

from __future__ import annotations

import time
from typing import Any, Mapping, Optional, Sequence

import numpy as np

from llada_jax import decoding, rewards
from llada_jax.config import ModelConfig


def prompts_and_metas(examples: Sequence[Mapping[str, Any]], tokenizer,
                      template: str = "chat") -> tuple[list[list[int]], list[dict]]:
    """Prompt ids (everything before the final assistant turn, in `template`) and the metas."""
    prompts, metas = [], []
    for ex in examples:
        messages = ex["messages"]
        prompts.append(tokenizer.encode_prompt(messages[:-1], template=template))
        metas.append(dict(ex["meta"]))
    return prompts, metas


def completion_text(tokens: Sequence[int], tokenizer) -> str:
    """The decoded completion up to its first EOS, special tokens kept so end-of-turn is visible."""
    out = [t for t in tokens if t != tokenizer.eos_id]
    return tokenizer.decode(out)


def evaluate(params, model_config: ModelConfig, tokenizer, examples: Sequence[Mapping[str, Any]], *,
             mode: str = "S", gen_length: int = 16, block_length: int = 16, batch_size: int = 64,
             reward: str = "by_task", template: str = "chat", rng: Optional[Any] = None, **generate_kw) -> dict:
    """Decodes every example's prompt in `mode` and scores it. Returns accuracy, reward, TPF, counts."""
    prompts, metas = prompts_and_metas(examples, tokenizer, template)
    scores, tpf, forwards, generated = [], [], [], []
    t0 = time.perf_counter()
    for i in range(0, len(prompts), batch_size):
        out = decoding.generate(params, model_config, prompts[i:i + batch_size], gen_length=gen_length,
                                block_length=block_length, preset=mode, rng=rng, **generate_kw)
        texts = [completion_text(t, tokenizer) for t in out.tokens]
        r, _ = rewards.score(texts, metas[i:i + batch_size], reward)
        scores.append(r)
        forwards.append(np.asarray(out.forwards))
        generated.append(np.asarray(out.num_generated))
        tpf.append(np.asarray(out.tpf))
    scores = np.concatenate(scores)
    forwards, generated = np.concatenate(forwards), np.concatenate(generated)
    return {
        "mode": mode,
        "n": int(len(scores)),
        "accuracy": float(np.mean(scores >= 1.0)),
        "reward": float(np.mean(scores)),
        "tpf": float(generated.sum() / max(forwards.sum(), 1)),
        "forwards_per_sample": float(forwards.mean()),
        "seconds": round(time.perf_counter() - t0, 2),
    }
