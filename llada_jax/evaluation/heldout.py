"""Held-out evaluation: decode prompts with Draft-and-Edit, score completions with the task's reward.

Accuracy is the fraction of completions with reward 1 (exact answers); `reward` is the mean
reward (partial credit where the task gives it); TPF is generated tokens per model forward,
every forward counted (REFERENCE §5 "Metrics").

On a mesh (`mesh=`), with one process or several, every process passes the same examples:
`generate_everywhere` pads each batch to a multiple of the mesh's batch axes, each process
decodes its rows of the one global batch, and the rows come back to every process in order
(padding dropped), so the metrics are those of the whole list on any number of processes.
"""

from __future__ import annotations

import time
from typing import Any, Mapping, Optional, Sequence

import jax
import numpy as np

from llada_jax import decode, rewards
from llada_jax.parallel import hosts
from llada_jax.model.config import ModelConfig


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


def gather_rows(out: decode.GenerateOutput, index: int, count: int, n: int,
                gen_length: int) -> decode.GenerateOutput:
    """Every process's rows of a `generate(mesh=...)` output in global order, the first `n` kept
    (the padding dropped): `tokens`, `forwards`, `steps`, `tpf` and `num_generated`. This
    process decoded row slice `index` of `count` (`hosts.batch_rows`); the other fields are
    left as this process's."""
    if jax.process_count() == 1:
        return out._replace(tokens=out.tokens[:n], forwards=out.forwards[:n], steps=out.steps[:n],
                            tpf=out.tpf[:n], num_generated=out.num_generated[:n])
    tokens = np.full((len(out.tokens), gen_length), -1, np.int32)
    for i, t in enumerate(out.tokens):
        tokens[i, :len(t)] = t
    every = hosts.allgather(dict(index=np.int32(index), tokens=tokens, forwards=np.asarray(out.forwards),
                                 steps=np.asarray(out.steps), tpf=np.asarray(out.tpf, np.float32),
                                 num_generated=np.asarray(out.num_generated)))
    first = [int(np.flatnonzero(every["index"] == i)[0]) for i in range(count)]  # one process per row slice
    rows = {k: np.concatenate([every[k][p] for p in first])[:n] for k in every if k != "index"}
    return out._replace(tokens=[[int(t) for t in row if t >= 0] for row in rows["tokens"]], forwards=rows["forwards"],
                        steps=rows["steps"], tpf=rows["tpf"], num_generated=rows["num_generated"])


def generate_everywhere(params, model_config: ModelConfig, prompts: Sequence[Sequence[int]], *, mesh,
                        gen_length: int, **generate_kw) -> decode.GenerateOutput:
    """`decode.generate` of all `prompts` (the same list on every process) on `mesh`.

    The list is padded with copies of its last prompt to a multiple of the mesh's batch axes,
    each process decodes its rows of that global batch (`params` as sharded on `mesh`), and
    every process gets every prompt's `tokens`, `forwards`, `steps`, `tpf` and `num_generated`
    back in order (`gather_rows`). Sampling keys are per global row, as on one process."""
    prompts = [list(p) for p in prompts]
    ways = hosts.batch_ways(mesh)
    padded = prompts + [prompts[-1]] * (-len(prompts) % ways)
    index, count = hosts.batch_rows(mesh, len(padded), "prompts per batch (padded)")
    per = len(padded) // count
    out = decode.generate(params, model_config, padded[index * per:(index + 1) * per], gen_length=gen_length,
                            mesh=mesh, **generate_kw)
    return gather_rows(out, index, count, len(prompts), gen_length)


def evaluate(params, model_config: ModelConfig, tokenizer, examples: Sequence[Mapping[str, Any]], *,
             mode: str = "S", gen_length: int = 16, block_length: int = 16, batch_size: int = 64,
             reward: str = "by_task", template: str = "chat", rng: Optional[Any] = None, mesh=None,
             return_outputs: bool = False, **generate_kw) -> dict:
    """Decodes every example's prompt in `mode` and scores it. Returns accuracy, reward, TPF, counts;
    with `return_outputs` also `outputs`, each batch's `decode.GenerateOutput` in order (what a
    study reads beyond the metrics: tokens, MBE forwards, the trajectory with `record_trajectory`).

    With `mesh` (`params` as sharded there), batches are decoded across the mesh and its
    processes (`generate_everywhere`); every process passes the same examples and gets the
    same metrics back. Sampling (`rng`, temperature > 0): batch k draws with `fold_in(rng, k)`, so
    no two batches share their noise."""
    prompts, metas = prompts_and_metas(examples, tokenizer, template)
    scores, tpf, forwards, generated, outputs = [], [], [], [], []
    t0 = time.perf_counter()
    for i in range(0, len(prompts), batch_size):
        key = None if rng is None else jax.random.fold_in(rng, i // batch_size)
        kw = dict(gen_length=gen_length, block_length=block_length, preset=mode, rng=key, **generate_kw)
        if mesh is None:
            out = decode.generate(params, model_config, prompts[i:i + batch_size], **kw)
        else:
            out = generate_everywhere(params, model_config, prompts[i:i + batch_size], mesh=mesh, **kw)
        texts = [completion_text(t, tokenizer) for t in out.tokens]
        r, _ = rewards.score(texts, metas[i:i + batch_size], reward)
        scores.append(r)
        forwards.append(np.asarray(out.forwards))
        generated.append(np.asarray(out.num_generated))
        tpf.append(np.asarray(out.tpf))
        if return_outputs:
            outputs.append(out)
    scores = np.concatenate(scores)
    forwards, generated = np.concatenate(forwards), np.concatenate(generated)
    return {**({"outputs": outputs} if return_outputs else {}),
        "mode": mode,
        "n": int(len(scores)),
        "accuracy": float(np.mean(scores >= 1.0)),
        "reward": float(np.mean(scores)),
        "tpf": float(generated.sum() / max(forwards.sum(), 1)),
        "forwards_per_sample": float(forwards.mean()),
        "seconds": round(time.perf_counter() - t0, 2),
    }


def spread(values: Sequence[float]) -> dict:
    """A metric over training seeds (or any repeats): mean, std (ddof 1; 0 for a single value),
    min, max and count."""
    v = np.asarray(values, dtype=np.float64)
    return {"mean": float(v.mean()), "std": float(v.std(ddof=1)) if len(v) > 1 else 0.0,
            "min": float(v.min()), "max": float(v.max()), "n": int(len(v))}
