"""The LLaDA2 MoE denoiser in Flax linen (REFERENCE §1).

A pre-norm transformer whose position i predicts the clean token at position i (no shift).
Modules hold parameters and nothing else; `forward` is the pure entry point.

Dimension letters in einsums: B batch, T query length, S key length, D model, N query
heads, K kv heads, G query heads per kv head, H head dim, F mlp width, E experts, V vocab.

Every parameter carries logical axis names (see `sharding.py` for the rule table):
  vocab, embed, heads, kv_heads, head_dim, mlp, exp, expert_mlp, router_exp, norm, layers.
Activations carry act_batch, act_length, act_embed, act_heads, act_kv_heads, act_vocab.
"""

from __future__ import annotations

import functools
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name
from jaxtyping import Array, Bool, Float, Int

from llada_jax import kernels
from llada_jax.model import lora
from llada_jax.model.config import FP32_PARAMS, ModelConfig
from llada_jax.kernels import AttentionMask
from llada_jax.kernels.logits import chunked_output_stats, rms_norm
from llada_jax.model.moe import EXPERT_IMPLS, route
from llada_jax.model.quant import QArray, dequantize
from llada_jax.parallel import sharding
from llada_jax.parallel.sharding import constrain

Dtype = Any


def _dt(name: str):
    return jnp.dtype(name)


def _param(module: nn.Module, name: str, init, shape, axes, dtype):
    """A parameter; `W + A @ B` when the params hold LoRA adapters for it (`model.lora`)."""
    w = module.param(name, nn.with_logical_partitioning(init, axes), shape, dtype)
    return lora.adapted_param(module, name, w)


def _constrain(x, axes):
    return constrain(x, axes)


_KERNEL_INIT = nn.initializers.normal(stddev=0.02)


class RMSNorm(nn.Module):
    """fp32 statistics, cast back to the input dtype, then times the weight (as the reference)."""

    eps: float
    dtype: Dtype
    param_dtype: Dtype

    @nn.compact
    def __call__(self, x):
        w = _param(self, "scale", nn.initializers.ones, (x.shape[-1],), ("norm",), self.param_dtype)
        return rms_norm(x, w, self.eps, self.dtype)


def rope(x: Float[Array, "B T N H"], positions: Int[Array, "B T"], rotary_dim: int, theta: float):
    """Rotate-half (NeoX) RoPE on the first `rotary_dim` dims of each head; the rest untouched."""
    inv_freq = theta ** (-jnp.arange(0, rotary_dim, 2, dtype=jnp.float32) / rotary_dim)
    freqs = positions.astype(jnp.float32)[..., None] * inv_freq  # [B, T, R/2]
    emb = jnp.concatenate([freqs, freqs], axis=-1)[:, :, None, :]  # [B, T, 1, R]
    cos, sin = jnp.cos(emb).astype(x.dtype), jnp.sin(emb).astype(x.dtype)
    x_rot, x_pass = x[..., :rotary_dim], x[..., rotary_dim:]
    half = rotary_dim // 2
    rotated = jnp.concatenate([-x_rot[..., half:], x_rot[..., :half]], axis=-1)
    return jnp.concatenate([x_rot * cos + rotated * sin, x_pass], axis=-1)


class Attention(nn.Module):
    """QKV projections (stored per role so heads shard cleanly), QK-norm, partial RoPE, GQA.

    The HF checkpoint fuses Q|K|V rows into one matrix; `hf.py` splits it by heads, which
    is the same computation. `mask` is a `kernels.AttentionMask` and `config.attention_impl`
    picks the kernel. With a cache, the chunk's K/V are written at `cache_index` and the
    queries attend over the whole cache under a dense mask ([B|1, T, S]).
    """

    config: ModelConfig

    @nn.compact
    def __call__(self, x, positions, mask, cache=None, cache_index=None):
        c = self.config
        dt, pdt = _dt(c.dtype), _dt(c.param_dtype)
        d, n, k, h = c.hidden_size, c.num_heads, c.num_kv_heads, c.head_dim
        wq = _param(self, "q_proj", _KERNEL_INIT, (d, n, h), ("embed", "heads", "head_dim"), pdt)
        wk = _param(self, "k_proj", _KERNEL_INIT, (d, k, h), ("embed", "kv_heads", "head_dim"), pdt)
        wv = _param(self, "v_proj", _KERNEL_INIT, (d, k, h), ("embed", "kv_heads", "head_dim"), pdt)
        wo = _param(self, "o_proj", _KERNEL_INIT, (n, h, d), ("heads", "head_dim", "embed"), pdt)
        norm = functools.partial(RMSNorm, eps=c.rms_norm_eps, dtype=dt, param_dtype=pdt)

        q = jnp.einsum("btd,dnh->btnh", x, wq.astype(dt))  # [B, T, N, H]
        kk = jnp.einsum("btd,dkh->btkh", x, wk.astype(dt))  # [B, T, K, H]
        v = jnp.einsum("btd,dkh->btkh", x, wv.astype(dt))  # [B, T, K, H]
        q = norm(name="q_norm")(q)
        kk = norm(name="k_norm")(kk)
        q = rope(q, positions, c.rotary_dim, c.rope_theta)
        kk = rope(kk, positions, c.rotary_dim, c.rope_theta)
        q = _constrain(q, ("act_batch", "act_length", "act_heads", None))
        kk = _constrain(kk, ("act_batch", "act_length", "act_kv_heads", None))
        v = _constrain(v, ("act_batch", "act_length", "act_kv_heads", None))
        q, kk, v = (checkpoint_name(a, "qkv_proj") for a in (q, kk, v))

        new_cache = None
        if cache is not None:
            # Write this chunk's K/V at each row's cache_index; attend over the whole cache.
            write = jax.vmap(lambda buf, upd, i: jax.lax.dynamic_update_slice_in_dim(buf, upd, i, axis=0))
            kc = write(cache["k"], kk.astype(cache["k"].dtype), cache_index)
            vc = write(cache["v"], v.astype(cache["v"].dtype), cache_index)
            new_cache = {"k": kc, "v": vc}
            kk, v = kc.astype(dt), vc.astype(dt)

        out = kernels.attention(q, kk, v, mask, impl=c.attention_impl)  # [B, T, N, H], fp32 softmax
        out = checkpoint_name(_constrain(out, ("act_batch", "act_length", "act_heads", None)), "attn_out")
        y = jnp.einsum("btnh,nhd->btd", out, wo.astype(dt))
        return y, new_cache


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    config: ModelConfig
    width: int
    axis: str = "mlp"

    @nn.compact
    def __call__(self, x):
        c = self.config
        dt, pdt = _dt(c.dtype), _dt(c.param_dtype)
        d, f = c.hidden_size, self.width
        wg = _param(self, "gate_proj", _KERNEL_INIT, (d, f), ("embed", self.axis), pdt)
        wu = _param(self, "up_proj", _KERNEL_INIT, (d, f), ("embed", self.axis), pdt)
        wd = _param(self, "down_proj", _KERNEL_INIT, (f, d), (self.axis, "embed"), pdt)
        g = jnp.einsum("btd,df->btf", x, wg.astype(dt))
        u = jnp.einsum("btd,df->btf", x, wu.astype(dt))
        hdn = _constrain(nn.silu(g) * u, ("act_batch", "act_length", "act_mlp"))
        return jnp.einsum("btf,fd->btd", hdn, wd.astype(dt))


class MoE(nn.Module):
    """Routed SwiGLU experts (stacked [E, ...]) plus shared experts; no dropping, no aux loss."""

    config: ModelConfig

    @nn.compact
    def __call__(self, x):
        c = self.config
        dt, pdt = _dt(c.dtype), _dt(c.param_dtype)
        d, e, f = c.hidden_size, c.num_experts, c.moe_intermediate_size
        router = _param(self, "router", _KERNEL_INIT, (d, e), ("embed", "router_exp"), jnp.float32)
        # A buffer, not trained by gradient (REFERENCE §1); the optimizer masks it out.
        bias = _param(self, "expert_bias", nn.initializers.zeros, (e,), ("router_exp",), jnp.float32)
        wi_gate = _param(self, "wi_gate", _KERNEL_INIT, (e, d, f), ("exp", "embed", "expert_mlp"), pdt)
        wi_up = _param(self, "wi_up", _KERNEL_INIT, (e, d, f), ("exp", "embed", "expert_mlp"), pdt)
        wo = _param(self, "wo", _KERNEL_INIT, (e, f, d), ("exp", "expert_mlp", "embed"), pdt)

        # Quantized expert stacks (`model.quant`) are widened here, before routing, so that every
        # back end (and the expert-parallel shard_map) contracts plain arrays.
        wi_gate, wi_up, wo = (dequantize(w, dt) if isinstance(w, QArray) else w for w in (wi_gate, wi_up, wo))
        b, t, _ = x.shape
        impl = c.moe_impl
        if impl == "auto":  # not resolved ahead (launcher.setup / aot do): by the mesh in context
            from llada_jax.model import backends

            impl = backends.resolve(c).moe_impl
        if impl == "expert_parallel":  # routes per device inside shard_map (llada_jax/model/moe.py)
            from llada_jax.model.moe import expert_parallel

            y, idx, w, dropped = expert_parallel(x, router, bias, wi_gate, wi_up, wo, c)
            self.sow("intermediates", "moe_dropped", dropped)
        else:
            x2 = x.reshape(b * t, d)
            idx, w = route(x2, router, bias, c)
            extra = dict(tile=c.moe_tile) if impl == "tiled" else {}
            y = EXPERT_IMPLS[impl](x2, idx, w, wi_gate, wi_up, wo, dt, **extra).reshape(b, t, d)
        self.sow("intermediates", "router_idx", idx.reshape(b, t, -1))
        self.sow("intermediates", "router_weight", w.reshape(b, t, -1))
        if c.num_shared_experts:
            y = y + MLP(c, c.shared_intermediate_size, axis="mlp", name="shared")(x)
        return y


class DecoderLayer(nn.Module):
    config: ModelConfig
    moe: bool

    @nn.compact
    def __call__(self, x, positions, mask, cache, cache_index):
        c = self.config
        dt, pdt = _dt(c.dtype), _dt(c.param_dtype)
        norm = functools.partial(RMSNorm, eps=c.rms_norm_eps, dtype=dt, param_dtype=pdt)
        x = _constrain(x, ("act_batch", "act_length", "act_embed"))
        h, new_cache = Attention(c, name="attn")(norm(name="input_norm")(x), positions, mask, cache, cache_index)
        x = x + h
        hn = norm(name="post_attn_norm")(x)
        y = MoE(c, name="moe")(hn) if self.moe else MLP(c, c.intermediate_size, name="mlp")(hn)
        x = x + checkpoint_name(y, "mlp_out")
        return checkpoint_name(_constrain(x, ("act_batch", "act_length", "act_embed")), "layer_out"), new_cache


_REMAT = {
    "full": lambda c: jax.checkpoint_policies.nothing_saveable,
    "dots": lambda c: jax.checkpoint_policies.checkpoint_dots,
    "dots_with_no_batch_dims": lambda c: jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    # The activations named with `checkpoint_name` that the config can afford to keep.
    "names": lambda c: jax.checkpoint_policies.save_only_these_names(*c.remat_save),
}


def _stack(config: ModelConfig, moe: bool, length: int, name: str):
    """`length` identical layers under nn.scan: parameters stacked on a leading `layers` axis."""
    cls = DecoderLayer
    if config.remat_policy != "none":
        cls = nn.remat(cls, policy=_REMAT[config.remat_policy](config), prevent_cse=False)
    return nn.scan(
        cls,
        variable_axes={"params": 0, "intermediates": 0},
        split_rngs={"params": True},
        in_axes=(nn.broadcast, nn.broadcast, 0, nn.broadcast),
        length=length,
        metadata_params={nn.PARTITION_NAME: "layers"},
    )(config, moe, name=name)


class Transformer(nn.Module):
    """Token ids -> fp32 logits. Optional KV cache: {"dense"|"moe": {"k","v": [L, B, S, K, H]}}.

    With `hidden_only=True` it returns the last layer's hidden states before the final norm
    ([B, T, D]): the loss slices them and applies the norm and `lm_head` in chunks.
    """

    config: ModelConfig

    @nn.compact
    def __call__(self, tokens, positions, mask=None, cache=None, cache_index=None, hidden_only=False):
        c = self.config
        dt, pdt = _dt(c.dtype), _dt(c.param_dtype)
        emb = _param(self, "embed", nn.initializers.normal(stddev=0.02), (c.vocab_size, c.hidden_size),
                     ("vocab", "embed"), pdt)
        x = jnp.take(emb, tokens, axis=0).astype(dt)  # [B, T, D], no scaling
        if not isinstance(mask, AttentionMask):
            s_len = tokens.shape[1] if cache is None else jax.tree.leaves(cache)[0].shape[2]
            mask = as_mask(mask, tokens.shape[0], tokens.shape[1], s_len)
        new_cache = {}
        for group, moe, n in (("dense", False, c.num_dense_layers), ("moe", True, c.num_moe_layers)):
            if n == 0:
                continue
            layer_cache = None if cache is None else cache[group]
            x, new_cache[group] = _stack(c, moe, n, f"{group}_layers")(x, positions, mask, layer_cache, cache_index)
        if hidden_only:
            return x, (new_cache if cache is not None else None)
        x = RMSNorm(c.rms_norm_eps, dt, pdt, name="final_norm")(x)
        head = _param(self, "lm_head", _KERNEL_INIT, (c.hidden_size, c.vocab_size), ("embed", "vocab"), pdt)
        logits = jnp.einsum("btd,dv->btv", x, head.astype(dt), preferred_element_type=jnp.float32)
        logits = _constrain(logits, ("act_batch", "act_length", "act_vocab"))
        return logits, (new_cache if cache is not None else None)


def as_mask(mask, batch: int, q_len: int, k_len: Optional[int] = None) -> AttentionMask:
    """`None` (bidirectional), a boolean `[B|1, T, S]` / `[T, S]` array or an `AttentionMask` -> an
    `AttentionMask`; errors name the expected and the found shape."""
    k_len = q_len if k_len is None else k_len
    if isinstance(mask, AttentionMask):
        mask.check(batch, q_len, k_len)
        return mask
    if mask is None:
        return AttentionMask.bidirectional()
    mask = jnp.asarray(mask)
    if mask.ndim == 2:
        mask = mask[None]
    if mask.ndim != 3 or mask.shape[1:] != (q_len, k_len) or mask.shape[0] not in (1, batch):
        raise ValueError(f"mask: expected shape [B or 1, T, S] with B={batch}, T={q_len}, S={k_len}, "
                         f"found {mask.shape}")
    if mask.dtype != jnp.bool_:
        raise ValueError(f"mask: expected a boolean array (True = may attend), found dtype {mask.dtype}")
    return AttentionMask.from_dense(mask)


def _prepare(config: ModelConfig, tokens, positions, mask):
    tokens = jnp.asarray(tokens)
    if tokens.ndim != 2:
        raise ValueError(f"tokens: expected shape [B, T], found {tokens.shape}")
    b, t = tokens.shape
    if positions is None:
        positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    else:
        positions = jnp.asarray(positions)
        if positions.ndim == 1 and positions.shape == (t,):
            positions = jnp.broadcast_to(positions, (b, t))
        if positions.shape != (b, t):
            raise ValueError(f"positions: expected shape [T] or [B, T] = {(b, t)}, found {positions.shape}")
    return tokens, positions, as_mask(mask, b, t)


def forward(params, config: ModelConfig, tokens: Int[Array, "B T"],
            positions: Optional[Int[Array, "B T"]] = None,
            mask: Optional[Bool[Array, "B T T"] | AttentionMask] = None) -> Float[Array, "B T V"]:
    """Logits (fp32, [B, T, V]) of the denoiser. `mask[b, i, j]` True where query i may attend key j;
    `None` is bidirectional attention; a `kernels.AttentionMask` describes the mask so that
    `config.attention_impl` can skip what it forbids. `positions` default to `arange(T)`."""
    tokens, positions, mask = _prepare(config, tokens, positions, mask)
    logits, _ = Transformer(config).apply({"params": params}, tokens, positions, mask)
    return logits


def hidden_states(params, config: ModelConfig, tokens: Int[Array, "B T"],
                  positions: Optional[Int[Array, "B T"]] = None,
                  mask: Optional[Bool[Array, "B T T"] | AttentionMask] = None) -> Float[Array, "B T D"]:
    """The last layer's output before the final norm and `lm_head` (what `output_stats` consumes)."""
    tokens, positions, mask = _prepare(config, tokens, positions, mask)
    x, _ = Transformer(config).apply({"params": params}, tokens, positions, mask, hidden_only=True)
    return x


def hidden_states_with_router(params, config: ModelConfig, tokens, positions=None, mask=None):
    """`hidden_states`, plus the router's choices: (idx [L, B, T, k], weight [L, B, T, k])."""
    tokens, positions, mask = _prepare(config, tokens, positions, mask)
    (x, _), state = Transformer(config).apply({"params": params}, tokens, positions, mask, hidden_only=True,
                                              mutable=["intermediates"])
    inter = state["intermediates"]["moe_layers"]["moe"]
    return x, (inter["router_idx"][0], inter["router_weight"][0])


def logits_from_hidden(params, config: ModelConfig, hidden: Float[Array, "B T D"]) -> Float[Array, "B T V"]:
    """Final norm and `lm_head` on (a slice of) `hidden_states`: fp32 logits."""
    dt = _dt(config.dtype)
    x = rms_norm(hidden, params["final_norm"]["scale"], config.rms_norm_eps, dt)
    return jnp.einsum("btd,dv->btv", x, params["lm_head"].astype(dt), preferred_element_type=jnp.float32)


def output_stats(params, config: ModelConfig, hidden: Float[Array, "B T D"], targets: Int[Array, "B T"], *,
                 entropy: bool = False, exclude_id: Optional[int] = None, temperature: float = 1.0,
                 normaliser_exclude_id: Optional[int] = None) -> dict[str, Array]:
    """log p(target), argmax (and optionally entropy, draft argmax) from `hidden_states` in chunks of
    `config.logits_chunk` positions: no [B, T, V] tensor (see `kernels.logits`)."""
    return chunked_output_stats(hidden, params["final_norm"]["scale"], params["lm_head"], targets,
                                eps=config.rms_norm_eps, dtype=_dt(config.dtype), chunk=config.logits_chunk,
                                entropy=entropy, exclude_id=exclude_id, temperature=temperature,
                                normaliser_exclude_id=normaliser_exclude_id)


def forward_with_router(params, config: ModelConfig, tokens, positions=None, mask=None):
    """Like `forward`, plus the router's choices: {"moe_layers": (idx [L, B, T, k], weight [L, B, T, k])}."""
    tokens, positions, mask = _prepare(config, tokens, positions, mask)
    (logits, _), state = Transformer(config).apply({"params": params}, tokens, positions, mask,
                                                   mutable=["intermediates"])
    inter = state["intermediates"]["moe_layers"]["moe"]
    return logits, (inter["router_idx"][0], inter["router_weight"][0])


def init_params(config: ModelConfig, rng: jax.Array, *, boxed: bool = False):
    """Random parameters (normal 0.02, norms at one, expert_bias at zero). Unboxed unless `boxed`."""
    tokens = jnp.zeros((1, 8), jnp.int32)
    variables = Transformer(config).init(rng, tokens, jnp.zeros((1, 8), jnp.int32))
    params = variables["params"]
    return params if boxed else nn.meta.unbox(params)


def abstract_params(config: ModelConfig):
    """Shapes and dtypes of the parameters, boxed with logical axis names, allocating nothing."""
    return jax.eval_shape(lambda r: init_params(config, r, boxed=True), jax.random.key(0))


def compute_params(params, dtype):
    """A copy of `params` for a forward that computes in `dtype` (e.g. the bf16 rollouts of fp32
    training): every floating leaf cast to `dtype` except `FP32_PARAMS`. Every other weight is cast
    to the compute dtype where a forward reads it, so a forward of the copy under a config whose
    `dtype` is `dtype` equals that forward of `params` bit for bit, holding and reading half the
    bytes (bf16 from fp32) and casting nothing per forward. Jit it with the params' shardings to
    make the copy in place on a mesh (elementwise: each shard casts its own rows)."""
    dtype = jnp.dtype(dtype)

    def cast(path, x):
        if isinstance(x, QArray) or getattr(path[-1], "key", None) in FP32_PARAMS \
                or not jnp.issubdtype(x.dtype, jnp.floating):
            return x
        return x.astype(dtype)

    return jax.tree_util.tree_map_with_path(cast, params, is_leaf=lambda x: isinstance(x, QArray))


def init_cache(config: ModelConfig, batch: int, length: int, dtype=None):
    """An empty KV cache for `length` positions: {"dense"|"moe": {"k", "v": [L, B, S, K, H]}}."""
    dtype = jnp.dtype(dtype or config.dtype)
    cache = {}
    for group, n in (("dense", config.num_dense_layers), ("moe", config.num_moe_layers)):
        if n:
            shape = (n, batch, length, config.num_kv_heads, config.head_dim)
            cache[group] = {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)}
    return cache


def forward_cached(params, config: ModelConfig, tokens, positions, mask, cache, cache_index):
    """One chunk against a KV cache: writes the chunk's K/V at `cache_index` [B] and attends over
    the whole cache under `mask` [B|1, T, S]. Returns (logits [B, T, V] fp32, new cache)."""
    return Transformer(config).apply({"params": params}, tokens, positions, mask, cache, cache_index)


def init_sharded(config, mesh: jax.sharding.Mesh, rng: jax.Array, rules=sharding.DEFAULT_RULES):
    """Parameters initialised directly in their shards: `eval_shape` -> specs -> `jit(out_shardings)`.

    Returns `(params, shardings)`; no device ever holds the whole model.
    """
    shardings = sharding.param_shardings(abstract_params(config), mesh, rules)
    init = jax.jit(lambda r: init_params(config, r), out_shardings=shardings)
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        return init(rng), shardings
