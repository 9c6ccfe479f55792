"""Low-rank adapters (LoRA) on the attention, MLP and expert projections, the base frozen.

A targeted weight `W` (layout `[*batch, *in, *out]` inside one layer) is used as
`W + A @ B` with `A: [*batch, *in, r]` and `B: [*batch, r, *out]`; `A` starts random, `B` at
zero, so a fresh adapter gives the base model's logits exactly. The scale `alpha / rank` and the
dropout are applied to the adapter tree before the forward (`prepare`), so the model itself only
adds `A @ B` (`merged_weight`), per layer inside the `nn.scan` body: the merged weight of one
layer exists at a time, every MoE back end (ragged, dense, expert-parallel inside `shard_map`),
the KV-cache forward and the chunked loss see an ordinary weight, and nothing else changes.

Adapter leaves sit in a tree shaped like the base parameters, beside the weight they adapt:
`params["moe_layers"]["attn"]["q_proj_lora_a"]`. `combine(base, adapters)` is the tree the
model consumes; `merge(base, adapters)` folds them into base-shaped weights (export, serving).

Design choices:
- Routed experts (stacked `[E, D, F]`) get one adapter per expert (`A: [E, D, r]`,
  `B: [E, r, F]`): a shared adapter would move every expert of a layer in the same direction,
  against what routing specialises them for, and the merged export must hold per-expert
  weights anyway. It costs E times the parameters of a shared one, still ~2% of the experts' at
  rank 8 on mini.
- Dropout is rank dropout: each of the r components of an adapter is dropped with probability
  `dropout` for the step (the same mask for every token; LyCORIS's `rank_dropout`) and the rest
  scaled by 1 / (1 - dropout). The input-dropout of the LoRA paper needs the factored form
  `x W + drop(x) A B`, i.e. a second ragged matmul pair per expert projection; merging the
  weight per layer keeps every back end untouched.
- Hand-written rather than qwix (0.1.8): qwix's `LoraProvider` intercepts `einsum` / `dot_general`
  and creates its parameters inside the calling module, but on linen `@nn.compact` modules its
  einsum path sets a debug attribute on the frozen module
  (`SetAttributeFrozenModuleError: Can't set q_proj_lora_einsum_str=...`), so no projection of
  this model can be adapted; it has no LoRA for `ragged_dot` (the routed experts' default back
  end) nor for weights sliced inside `shard_map` (expert parallelism), and no merge for export.

Adapters carry logical axis names (the base weight's, with `lora_rank` for r, replicated), so
`parallel.sharding.param_shardings` places them like their weights.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

# Target name -> (leading batch dims, input dims) of the weight inside one layer; the rest are
# output dims. q/k/v: [D | N, H]; o: [N, H | D]; dense MLP and shared experts: [D | F], [F | D];
# routed experts: [E | D | F], [E | F | D].
LAYOUTS: dict[str, tuple[int, int]] = {
    "q_proj": (0, 1), "k_proj": (0, 1), "v_proj": (0, 1), "o_proj": (0, 2),
    "gate_proj": (0, 1), "up_proj": (0, 1), "down_proj": (0, 1),
    "wi_gate": (1, 1), "wi_up": (1, 1), "wo": (1, 1),
}
TARGETS = tuple(LAYOUTS)
ATTENTION_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")
BASE_DTYPES = ("", "bfloat16", "float32")  # lora.base_dtype: "" = the model's param_dtype
_STACKS = ("dense_layers", "moe_layers")  # scanned layer stacks: a leading `layers` axis


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    """`rank` 0 = off. `targets`: names in `TARGETS` (every layer's projection of that name;
    `gate_proj` / `up_proj` / `down_proj` are the dense MLPs and the shared experts, `wi_gate` /
    `wi_up` / `wo` the routed experts). `dropout`: rank dropout (module docstring). `base_dtype`:
    the frozen base's storage dtype, cast once at the start ("" keeps the model's `param_dtype`);
    the adapters and their optimizer state are fp32 whatever it is."""

    rank: int = 0
    alpha: float = 16.0
    targets: tuple[str, ...] = TARGETS
    dropout: float = 0.0
    base_dtype: str = ""

    def __post_init__(self):
        if not isinstance(self.rank, int) or self.rank < 0:
            raise ValueError(f"lora.rank: expected an integer >= 0 (0 = off), found {self.rank!r}")
        if self.rank and not self.alpha > 0:
            raise ValueError(f"lora.alpha: expected a number > 0, found {self.alpha!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"lora.dropout: expected a probability in [0, 1), found {self.dropout!r}")
        targets = (self.targets,) if isinstance(self.targets, str) else tuple(self.targets)
        unknown = [t for t in targets if t not in LAYOUTS]
        if unknown:
            raise ValueError(f"lora.targets: expected names among {list(TARGETS)}, found {unknown[0]!r}")
        if self.rank and not targets:
            raise ValueError(f"lora.targets: expected at least one of {list(TARGETS)} with rank {self.rank}, found none")
        if self.base_dtype not in BASE_DTYPES:
            raise ValueError(f"lora.base_dtype: expected one of {list(BASE_DTYPES)} (\"\" = the model's param_dtype), "
                             f"found {self.base_dtype!r}")
        object.__setattr__(self, "targets", targets)

    @property
    def enabled(self) -> bool:
        return self.rank > 0

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def to_json(self) -> dict:
        return {"rank": self.rank, "alpha": self.alpha, "targets": list(self.targets), "dropout": self.dropout,
                "base_dtype": self.base_dtype}

    @classmethod
    def from_mapping(cls, section: Optional[Mapping[str, Any]]) -> "LoraConfig":
        """From a run config's `lora` section (a ConfigDict or dict); None / missing = off. A field
        that is not one of LoraConfig's is an error naming it."""
        if section is None:
            return cls()
        fields = {k: v for k, v in dict(section).items() if v is not None}
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(fields) - known)
        if unknown:
            raise ValueError(f"config.lora: unknown field {unknown[0]!r}; expected fields of LoraConfig: {sorted(known)}")
        if isinstance(fields.get("targets"), str):
            fields["targets"] = tuple(t.strip() for t in fields["targets"].split(",") if t.strip())
        return cls(**fields)


# ------------------------------------------------------------------------------ the model's side
def merged_weight(w: jax.Array, a: jax.Array, b: jax.Array) -> jax.Array:
    """`w + a @ b` over the rank axis, batch axes first: `w [*batch, *in, *out]`, `a [*batch, *in, r]`,
    `b [*batch, r, *out]`. fp32 (or wider) so that a small update is not lost in a bf16 base; the
    model casts it to its compute dtype like any weight. With `b == 0` it equals `w` exactly."""
    nb = a.ndim + b.ndim - 2 - w.ndim
    dims = (((a.ndim - 1,), (nb,)), (tuple(range(nb)), tuple(range(nb))))
    out = jnp.promote_types(jnp.promote_types(a.dtype, b.dtype), jnp.float32)
    delta = jax.lax.dot_general(a, b, dims, preferred_element_type=out)  # [*batch, *in, *out]
    return w.astype(out) + delta


def adapted_param(module: nn.Module, name: str, w: jax.Array) -> jax.Array:
    """`w`, or `w + A @ B` when the module's params hold `<name>_lora_a` / `<name>_lora_b`."""
    if module.has_variable("params", name + "_lora_a"):
        a = module.get_variable("params", name + "_lora_a")
        b = module.get_variable("params", name + "_lora_b")
        return merged_weight(w, a, b)
    return w


# ------------------------------------------------------------------------------ adapter trees
def _path_keys(path) -> tuple[str, ...]:
    return tuple(str(getattr(p, "key", p)) for p in path)


def _targeted(base: Any, config: LoraConfig):
    """[(module keys, name, leaf)] of the base leaves that get an adapter, in tree order."""
    out = []
    for path, leaf in jax.tree_util.tree_flatten_with_path(base, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))[0]:
        keys = _path_keys(path)
        if keys[-1] in config.targets:
            out.append((keys[:-1], keys[-1], leaf))
    return out


def _set(tree: dict, keys: Sequence[str], value) -> None:
    for k in keys[:-1]:
        tree = tree.setdefault(k, {})
    tree[keys[-1]] = value


def _get(tree, keys: Sequence[str]):
    for k in keys:
        tree = tree[k]
    return tree


def _shapes(keys, name, shape, rank):
    """(lead, batch, in dims count, A shape, B shape) of a base leaf of `shape` at `keys`."""
    lead = 1 if keys and keys[0] in _STACKS else 0
    nb, ni = LAYOUTS[name]
    cut = lead + nb
    a_shape = tuple(shape[:cut + ni]) + (rank,)
    b_shape = tuple(shape[:cut]) + (rank,) + tuple(shape[cut + ni:])
    return lead, nb, ni, a_shape, b_shape


def abstract_adapters(abstract_boxed_base: Any, config: LoraConfig) -> dict:
    """Shapes of the adapters, boxed with logical axis names (the weight's, `lora_rank` for r), for
    `sharding.param_shardings` and checkpoint restores. Nothing allocated."""
    out: dict = {}
    for keys, name, leaf in _targeted(abstract_boxed_base, config):
        if not isinstance(leaf, nn.LogicallyPartitioned):
            raise TypeError(f"lora.abstract_adapters: expected boxed params (model.abstract_params), found "
                            f"{type(leaf).__name__} at {'/'.join(keys + (name,))}")
        value, names = leaf.value, tuple(leaf.names)
        lead, nb, ni, a_shape, b_shape = _shapes(keys, name, value.shape, config.rank)
        cut = lead + nb
        a_names = names[:cut + ni] + ("lora_rank",)
        b_names = names[:cut] + ("lora_rank",) + names[cut + ni:]
        _set(out, keys + (name + "_lora_a",), nn.LogicallyPartitioned(jax.ShapeDtypeStruct(a_shape, jnp.float32), a_names))
        _set(out, keys + (name + "_lora_b",), nn.LogicallyPartitioned(jax.ShapeDtypeStruct(b_shape, jnp.float32), b_names))
    if not out:
        raise ValueError(f"lora.targets: {list(config.targets)} match no weight of this model")
    return out


def init_adapters(base: Any, config: LoraConfig, rng: jax.Array) -> dict:
    """Fresh adapters (fp32) for `base` (params, or their abstract / boxed shapes): `A` normal with
    std 1/sqrt(fan-in of the weight's input), `B` zero, so `combine(base, adapters)` computes
    exactly the base model. Each leaf's key is folded from its path, so adding a target leaves
    the others' initial values unchanged."""
    out: dict = {}
    for keys, name, leaf in _targeted(base, config):
        shape = (leaf.value if isinstance(leaf, nn.LogicallyPartitioned) else leaf).shape
        lead, nb, ni, a_shape, b_shape = _shapes(keys, name, shape, config.rank)
        fan_in = 1
        for d in shape[lead + nb:lead + nb + ni]:
            fan_in *= d
        key = jax.random.fold_in(rng, _path_hash(keys + (name,)))
        _set(out, keys + (name + "_lora_a",), jax.random.normal(key, a_shape, jnp.float32) / jnp.sqrt(fan_in))
        _set(out, keys + (name + "_lora_b",), jnp.zeros(b_shape, jnp.float32))
    if not out:
        raise ValueError(f"lora.targets: {list(config.targets)} match no weight of this model")
    return out


def _path_hash(keys: Sequence[str]) -> int:
    import zlib

    return zlib.crc32("/".join(keys).encode()) & 0x7FFFFFFF


def _adapter_leaves(adapters: dict):
    """[(module keys, target name, A, B)] of an adapter tree."""
    out = []
    for path, a in jax.tree_util.tree_flatten_with_path(adapters)[0]:
        keys = _path_keys(path)
        if keys[-1].endswith("_lora_a"):
            name = keys[-1][: -len("_lora_a")]
            out.append((keys[:-1], name, a, _get(adapters, keys[:-1] + (name + "_lora_b",))))
    return out


def prepare(adapters: dict, config: LoraConfig, key: Optional[jax.Array] = None) -> dict:
    """The adapters as the forward uses them: `B` times `alpha / rank`, and with `key` and
    `dropout > 0` each rank component of each adapter dropped with probability `dropout` (one
    mask per layer and expert for the whole step) and the kept ones scaled by 1 / (1 - dropout).
    Differentiable: the trainer takes gradients through it to the stored adapters."""
    out: dict = {}
    for keys, name, a, b in _adapter_leaves(adapters):
        scale = config.scale
        if key is not None and config.dropout > 0:
            lead = 1 if keys and keys[0] in _STACKS else 0
            nb, ni = LAYOUTS[name]
            mask_shape = a.shape[:lead + nb] + (1,) * ni + (a.shape[-1],)
            keep = jax.random.bernoulli(jax.random.fold_in(key, _path_hash(keys + (name,))), 1.0 - config.dropout,
                                        mask_shape)
            a = a * keep.astype(a.dtype)
            scale = scale / (1.0 - config.dropout)
        _set(out, keys + (name + "_lora_a",), a)
        _set(out, keys + (name + "_lora_b",), b * jnp.asarray(scale, b.dtype))
    return out


def combine(base: Any, adapters: dict) -> Any:
    """The parameter tree the model consumes: `base` with the (prepared) adapter leaves added beside
    their weights. No array is copied."""
    def join(b, a):
        if not isinstance(a, Mapping):
            return a
        out = dict(b)
        for k, v in a.items():
            out[k] = join(b.get(k, {}), v) if isinstance(v, Mapping) else v
        return out

    return join(base, adapters)


def merge(base: Any, adapters: dict, config: LoraConfig, dtype: Any = None) -> Any:
    """Base-shaped parameters with `W + (alpha / rank) A @ B` folded into every adapted weight, each
    in its base dtype, or in `dtype` when given (a bf16 base's merged weights kept in fp32, as the
    training forward forms them). Every other leaf is the base's. Dropout is off."""
    prepared = prepare(adapters, config)
    out = jax.tree_util.tree_map(lambda x: x, base)  # a fresh container; leaves shared
    for keys, name, a, b in _adapter_leaves(prepared):
        w = _get(base, keys + (name,))
        lead = 1 if keys and keys[0] in _STACKS else 0
        fn = merged_weight
        for _ in range(lead):
            fn = jax.vmap(fn)
        _set(out, keys + (name,), fn(w, a, b).astype(w.dtype if dtype is None else dtype))
    return out


def cast_base(base: Any, abstract: Any, shardings: Any) -> Any:
    """`base` with each leaf cast to its `abstract` leaf's dtype (`lora.base_dtype`) in its shards,
    one leaf at a time so the widest copy of the model never exists twice at once. A leaf already
    in its dtype is placed as is."""
    def one(x, a, s):
        x = jax.device_put(x, s)  # host arrays onto their shards first (every process holds its slices)
        return x if x.dtype == a.dtype else jax.jit(lambda v: v.astype(a.dtype), out_shardings=s)(x)

    return jax.tree_util.tree_map(one, base, abstract, shardings)


def count(tree: Any) -> int:
    """Number of parameters in a tree (e.g. the trainable adapters)."""
    return sum(int(x.size) for x in jax.tree_util.tree_leaves(tree))
