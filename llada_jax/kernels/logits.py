"""The final norm, `lm_head` and what the losses read from the logits, in sequence chunks.

At a 157k vocabulary the `[N, L, V]` fp32 logits of a training batch are the largest tensor of
the step (and its log-softmax a second one). `chunked_output_stats` walks the sequence in
chunks of `chunk` positions under `lax.scan` (every row of the batch per step, so a batch
sharding is kept), and per chunk computes the logits (fp32 results of the matmul via
`preferred_element_type`), their logsumexp, the target's log-probability and the per-token
statistics the objectives need (argmax, optionally the entropy and the argmax with one id
excluded). The chunk body is under `jax.checkpoint`, so the backward pass recomputes a chunk's
logits instead of keeping them: only `[N, chunk, V]` ever exists.
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int


def rms_norm(x, scale, eps: float, dtype):
    """RMSNorm: fp32 statistics, cast to `dtype`, times the weight (the model's `RMSNorm`)."""
    xf = x.astype(jnp.float32)
    xf = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)
    return scale.astype(dtype) * xf.astype(dtype)


def chunked_output_stats(hidden: Float[Array, "N L D"], norm_scale: Float[Array, " D"], head: Float[Array, "D V"],
                         targets: Int[Array, "N L"], *, eps: float, dtype, chunk: int, entropy: bool = False,
                         exclude_id: Optional[int] = None, temperature: float = 1.0,
                         normaliser_exclude_id: Optional[int] = None) -> dict[str, Array]:
    """Per-token statistics of `softmax(lm_head(norm(hidden)))` without materialising `[N, L, V]`.

    Returns `{"logp": log p(target) [N, L] fp32, "argmax": [N, L] int32}`, plus `"entropy"` (fp32,
    differentiable) with `entropy=True` and `"draft"` (argmax with `exclude_id` never chosen)
    with `exclude_id`. `temperature` and `normaliser_exclude_id` change only `logp`: it is then
    log q(target) for q = softmax(logits / temperature) with that id left out of the normaliser
    (the decoder's sampling distribution, RL). Equal to the full computation in values and
    gradients.
    """
    n, length, d = hidden.shape
    c = min(chunk, length)
    num = -(-length // c)
    pad = num * c - length
    hp = jnp.pad(hidden, ((0, 0), (0, pad), (0, 0))).reshape(n, num, c, d).swapaxes(0, 1)  # [C, N, c, D]
    tp = jnp.pad(targets, ((0, 0), (0, pad))).reshape(n, num, c).swapaxes(0, 1)  # [C, N, c]

    @jax.checkpoint  # nothing saved: the backward pass recomputes this chunk's logits
    def body(h, t):
        x = rms_norm(h, norm_scale, eps, dtype)
        logits = jnp.einsum("ncd,dv->ncv", x, head.astype(dtype), preferred_element_type=jnp.float32)
        lse = jax.nn.logsumexp(logits, axis=-1)
        out = {"argmax": jnp.argmax(logits, axis=-1).astype(jnp.int32)}
        if temperature == 1.0 and normaliser_exclude_id is None:
            out["logp"] = jnp.take_along_axis(logits, t[..., None], axis=-1)[..., 0] - lse
        else:
            q = logits / temperature
            if normaliser_exclude_id is not None:
                q = jnp.where(jnp.arange(q.shape[-1]) == normaliser_exclude_id, -jnp.inf, q)
            out["logp"] = jnp.take_along_axis(q, t[..., None], axis=-1)[..., 0] - jax.nn.logsumexp(q, axis=-1)
        if entropy:
            probs = jnp.exp(logits - lse[..., None])
            out["entropy"] = lse - jnp.sum(probs * logits, axis=-1)
        if exclude_id is not None:
            out["draft"] = jnp.argmax(logits.at[..., exclude_id].set(-jnp.inf), axis=-1).astype(jnp.int32)
        return out

    _, outs = jax.lax.scan(lambda _, xs: (None, body(*xs)), None, (hp, tp))
    return {k: v.swapaxes(0, 1).reshape(n, num * c)[:, :length] for k, v in outs.items()}
