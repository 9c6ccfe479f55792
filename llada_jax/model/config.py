"""The architecture of a LLaDA2 MoE denoiser as one frozen dataclass (REFERENCE §1).

`ModelConfig` owns its Hugging Face conversion (`from_hf_config` / `to_hf_config`), its
presets (`tiny` for tests, `mini` and `flash` with the published shapes) and its
validation. Run settings (compute dtype, MoE back end, remat) live here too because the
model modules read them, but they are never written to an HF `config.json`.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Mapping

from llada_jax.kernels.attention import ATTENTION_IMPLS

MOE_IMPLS = ("ragged", "dense", "expert_parallel", "tiled", "auto")
REMAT_POLICIES = ("none", "full", "dots", "dots_with_no_batch_dims", "names")
# Activations named with `checkpoint_name` in model/transformer.py; remat_policy="names" saves `remat_save` of them.
REMAT_NAMES = ("qkv_proj", "attn_out", "mlp_out", "layer_out")
DTYPES = ("float32", "bfloat16", "float16")
# Parameters every forward uses in fp32 whatever the compute dtype: the router and its balancing
# bias (REFERENCE §1). Every other weight is cast to the compute dtype where it is used
# (`transformer.compute_params`, `hf` loading).
FP32_PARAMS = ("router", "expert_bias")


class ConfigError(ValueError):
    """A config value is invalid; the message names the field, the expected and the found value."""


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int  # dense SwiGLU width of the first `first_k_dense_replace` layers
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    num_experts: int
    num_experts_per_tok: int
    num_shared_experts: int
    moe_intermediate_size: int
    first_k_dense_replace: int = 1
    n_group: int = 8
    topk_group: int = 4
    routed_scaling_factor: float = 2.5
    rope_theta: float = 600000.0
    partial_rotary_factor: float = 0.5
    rms_norm_eps: float = 1e-6
    max_position_embeddings: int = 32768
    # Special ids (REFERENCE §1). Real checkpoints do not store them in config.json.
    mask_token_id: int = 156895
    eos_token_id: int = 156892
    pad_token_id: int = 156892
    # ---- run settings (not part of the HF config) ----
    dtype: str = "float32"  # compute dtype of activations and matmuls
    param_dtype: str = "float32"  # storage dtype of the parameters (master weights)
    moe_impl: str = "ragged"  # "ragged": sorted dropless jax.lax.ragged_dot; "dense": every expert on every token;
    # "expert_parallel": per-device routing and an exchange over the `expert` mesh axis (llada_jax/model/moe.py);
    # "tiled": sorted rows in whole tiles of `moe_tile` rows, one expert per tile, a batched matmul (any backend,
    # never densifies); "auto": by the mesh's platform and expert axis (llada_jax/model/backends.py)
    moe_tile: int = 128  # rows per tile of moe_impl="tiled" (each expert's rows padded to whole tiles)
    moe_capacity_factor: float = 0.0  # expert_parallel buffers: 0 worst case (dropless), c > 0 c x balanced (drops counted)
    remat_policy: str = "none"
    remat_save: tuple[str, ...] = ()  # with remat_policy="names": which of REMAT_NAMES to keep
    # "xla" (dense, the oracle), "blocked" (exact, only allowed tiles), "splash" (Pallas TPU),
    # "cudnn" (jax.nn.dot_product_attention), "auto" (by platform: llada_jax/model/backends.py, resolved by
    # launcher.setup and aot.plan): see llada_jax/kernels/attention.py
    attention_impl: str = "xla"
    logits_chunk: int = 256  # positions per row per step of the chunked lm_head + log-prob (objectives)

    def __post_init__(self):
        # ml_collections and JSON hand over lists; the config must stay hashable.
        object.__setattr__(self, "remat_save", tuple(self.remat_save))
        self.validate()

    # ------------------------------------------------------------------ derived
    @property
    def rotary_dim(self) -> int:
        return int(self.head_dim * self.partial_rotary_factor)

    @property
    def num_dense_layers(self) -> int:
        return min(self.first_k_dense_replace, self.num_layers)

    @property
    def num_moe_layers(self) -> int:
        return self.num_layers - self.num_dense_layers

    @property
    def shared_intermediate_size(self) -> int:
        return self.moe_intermediate_size * self.num_shared_experts

    def replace(self, **kw) -> "ModelConfig":
        return dataclasses.replace(self, **kw)

    # ------------------------------------------------------------------ validation
    def validate(self) -> None:
        def fail(field, expected, found):
            raise ConfigError(f"ModelConfig.{field}: expected {expected}, found {found!r}")

        for f in ("vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads", "head_dim",
                  "max_position_embeddings"):
            v = getattr(self, f)
            if not isinstance(v, int) or v <= 0:
                fail(f, "a positive integer", v)
        for f in ("intermediate_size", "num_experts", "num_experts_per_tok", "num_shared_experts",
                  "moe_intermediate_size", "first_k_dense_replace", "n_group", "topk_group"):
            v = getattr(self, f)
            if not isinstance(v, int) or v < 0:
                fail(f, "a non-negative integer", v)
        if self.num_heads % self.num_kv_heads:
            fail("num_heads", f"a multiple of num_kv_heads={self.num_kv_heads}", self.num_heads)
        if not 0.0 < self.partial_rotary_factor <= 1.0:
            fail("partial_rotary_factor", "a value in (0, 1]", self.partial_rotary_factor)
        exact = self.head_dim * self.partial_rotary_factor
        if self.rotary_dim % 2 or self.rotary_dim == 0 or abs(exact - self.rotary_dim) > 1e-9:
            fail("partial_rotary_factor",
                 f"a factor giving an even, non-zero rotary dim (head_dim={self.head_dim})",
                 f"{self.partial_rotary_factor} -> rotary_dim {self.rotary_dim}")
        if self.rope_theta <= 0:
            fail("rope_theta", "a positive number", self.rope_theta)
        if self.rms_norm_eps <= 0:
            fail("rms_norm_eps", "a positive number", self.rms_norm_eps)
        if self.num_dense_layers > 0 and self.intermediate_size <= 0:
            fail("intermediate_size", "a positive width for the dense layers", self.intermediate_size)
        if self.num_moe_layers > 0:
            if self.num_experts <= 0:
                fail("num_experts", "a positive integer (the model has MoE layers)", self.num_experts)
            if self.moe_intermediate_size <= 0:
                fail("moe_intermediate_size", "a positive integer", self.moe_intermediate_size)
            if self.n_group <= 0 or self.num_experts % self.n_group:
                fail("n_group", f"a positive divisor of num_experts={self.num_experts}", self.n_group)
            if not 1 <= self.topk_group <= self.n_group:
                fail("topk_group", f"an integer in [1, n_group={self.n_group}]", self.topk_group)
            per_group = self.num_experts // self.n_group
            if per_group < 2:
                fail("n_group", "at most num_experts/2 groups (a group score sums its top-2 experts)",
                     self.n_group)
            kept = per_group * self.topk_group
            if not 1 <= self.num_experts_per_tok <= kept:
                fail("num_experts_per_tok",
                     f"an integer in [1, experts in the kept groups={kept}]", self.num_experts_per_tok)
        for f in ("mask_token_id", "eos_token_id", "pad_token_id"):
            v = getattr(self, f)
            if not isinstance(v, int) or not 0 <= v < self.vocab_size:
                fail(f, f"a token id in [0, vocab_size={self.vocab_size})", v)
        for f in ("dtype", "param_dtype"):
            if getattr(self, f) not in DTYPES:
                fail(f, f"one of {DTYPES}", getattr(self, f))
        if self.moe_impl not in MOE_IMPLS:
            fail("moe_impl", f"one of {MOE_IMPLS}", self.moe_impl)
        if not isinstance(self.moe_tile, int) or self.moe_tile <= 0:
            fail("moe_tile", "a positive integer", self.moe_tile)
        if not isinstance(self.moe_capacity_factor, (int, float)) or self.moe_capacity_factor < 0:
            fail("moe_capacity_factor", "a number >= 0 (0: worst-case dropless buffers)", self.moe_capacity_factor)
        if self.remat_policy not in REMAT_POLICIES:
            fail("remat_policy", f"one of {REMAT_POLICIES}", self.remat_policy)
        unknown = [x for x in self.remat_save if x not in REMAT_NAMES]
        if unknown:
            fail("remat_save", f"names from {REMAT_NAMES}", self.remat_save)
        if self.attention_impl not in ATTENTION_IMPLS:
            fail("attention_impl", f"one of {ATTENTION_IMPLS}", self.attention_impl)
        if not isinstance(self.logits_chunk, int) or self.logits_chunk <= 0:
            fail("logits_chunk", "a positive integer", self.logits_chunk)

    # ------------------------------------------------------------------ HF conversion
    @classmethod
    def from_hf_config(cls, hf: Mapping[str, Any] | str | os.PathLike, **overrides) -> "ModelConfig":
        """Builds a config from an HF `config.json` (a dict, a file, or a directory holding one)."""
        if not isinstance(hf, Mapping):
            path = os.fspath(hf)
            if os.path.isdir(path):
                path = os.path.join(path, "config.json")
            if not os.path.exists(path):
                raise FileNotFoundError(f"HF config not found: {path}")
            with open(path) as f:
                hf = json.load(f)
        hf = dict(hf)
        required = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads")
        for k in required:
            if k not in hf:
                raise ConfigError(f"HF config: missing required key {k!r}")
        for key, want in (("score_function", "sigmoid"), ("hidden_act", "silu")):
            if key in hf and hf[key] != want:
                raise ConfigError(f"HF config.{key}: expected {want!r}, found {hf[key]!r}")
        for key in ("use_qkv_bias", "use_bias", "tie_word_embeddings", "norm_head"):
            if hf.get(key):
                raise ConfigError(f"HF config.{key}: expected false (unsupported), found {hf[key]!r}")
        if hf.get("use_qk_norm") is False:
            raise ConfigError("HF config.use_qk_norm: expected true, found False")
        if hf.get("rope_scaling"):
            raise ConfigError(f"HF config.rope_scaling: expected null, found {hf['rope_scaling']!r}")
        num_heads = hf["num_attention_heads"]
        kw = dict(
            vocab_size=hf["vocab_size"],
            hidden_size=hf["hidden_size"],
            intermediate_size=hf.get("intermediate_size", 0),
            num_layers=hf["num_hidden_layers"],
            num_heads=num_heads,
            num_kv_heads=hf.get("num_key_value_heads", num_heads),
            head_dim=hf.get("head_dim") or hf["hidden_size"] // num_heads,
            num_experts=hf.get("num_experts", 0),
            num_experts_per_tok=hf.get("num_experts_per_tok", 0),
            num_shared_experts=hf.get("num_shared_experts") or 0,
            moe_intermediate_size=hf.get("moe_intermediate_size", 0),
            first_k_dense_replace=hf.get("first_k_dense_replace", 0),
            n_group=hf.get("n_group") or 1,
            topk_group=hf.get("topk_group") or 1,
            routed_scaling_factor=float(hf.get("routed_scaling_factor", 1.0)),
            rope_theta=float(hf.get("rope_theta", 10000.0)),
            partial_rotary_factor=float(hf.get("partial_rotary_factor", 1.0)),
            rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
            max_position_embeddings=hf.get("max_position_embeddings", 32768),
        )
        v = kw["vocab_size"]
        # Real configs carry no mask id; the Ling tokenizer's ids apply when they fit the vocab.
        defaults = {"mask_token_id": 156895, "eos_token_id": 156892, "pad_token_id": 156892}
        for k, d in defaults.items():
            val = hf.get(k)
            if isinstance(val, list):
                val = val[0]
            kw[k] = val if val is not None else (d if d < v else v - 1)
        kw.update(overrides)
        return cls(**kw)

    def to_hf_config(self) -> dict:
        """The HF `config.json` dict the official PyTorch code reads."""
        return {
            "architectures": ["LLaDA2MoeModelLM"],
            "model_type": "llada2_moe",
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "hidden_act": "silu",
            "num_experts": self.num_experts,
            "num_experts_per_tok": self.num_experts_per_tok,
            "num_shared_experts": self.num_shared_experts,
            "moe_intermediate_size": self.moe_intermediate_size,
            "first_k_dense_replace": self.first_k_dense_replace,
            "n_group": self.n_group,
            "topk_group": self.topk_group,
            "routed_scaling_factor": self.routed_scaling_factor,
            "score_function": "sigmoid",
            "moe_router_enable_expert_bias": True,
            "norm_topk_prob": True,
            "router_dtype": "fp32",
            "rope_theta": self.rope_theta,
            "rope_scaling": None,
            "partial_rotary_factor": self.partial_rotary_factor,
            "use_qk_norm": True,
            "use_qkv_bias": False,
            "use_bias": False,
            "norm_head": False,
            "norm_softmax": False,
            "rms_norm_eps": self.rms_norm_eps,
            "tie_word_embeddings": False,
            "max_position_embeddings": self.max_position_embeddings,
            "pad_token_id": self.pad_token_id,
            "eos_token_id": self.eos_token_id,
            "mask_token_id": self.mask_token_id,
            "torch_dtype": {"float32": "float32", "bfloat16": "bfloat16", "float16": "float16"}[self.param_dtype],
        }

    # ------------------------------------------------------------------ sizes
    def param_counts(self) -> dict:
        """Total and active (per token) parameter counts, computed from shapes only."""
        d, v = self.hidden_size, self.vocab_size
        attn = d * (self.num_heads + 2 * self.num_kv_heads) * self.head_dim + self.num_heads * self.head_dim * d
        attn += 2 * d + 2 * self.head_dim  # input / post-attention norms, q / k norms
        dense_mlp = 3 * d * self.intermediate_size
        expert = 3 * d * self.moe_intermediate_size
        shared = 3 * d * self.shared_intermediate_size
        router = d * self.num_experts + self.num_experts  # weight + expert_bias
        embed = 2 * v * d + d
        total = (embed + self.num_layers * attn + self.num_dense_layers * dense_mlp
                 + self.num_moe_layers * (self.num_experts * expert + shared + router))
        active = (embed + self.num_layers * attn + self.num_dense_layers * dense_mlp
                  + self.num_moe_layers * (self.num_experts_per_tok * expert + shared + router))
        return {"total": total, "active": active}


PRESETS: dict[str, ModelConfig] = {
    # The shape of ../shared/fixtures/llada2_tiny: seconds on a CPU.
    "tiny": ModelConfig(
        vocab_size=512, hidden_size=64, intermediate_size=128, num_layers=3, num_heads=4, num_kv_heads=2,
        head_dim=16, num_experts=16, num_experts_per_tok=4, num_shared_experts=1, moe_intermediate_size=32,
        first_k_dense_replace=1, n_group=4, topk_group=2, routed_scaling_factor=2.5, rope_theta=600000.0,
        partial_rotary_factor=0.5, max_position_embeddings=4096, mask_token_id=511, eos_token_id=510,
        pad_token_id=510),
    # About 50M parameters: the CPU benchmark size.
    "small": ModelConfig(
        vocab_size=8192, hidden_size=384, intermediate_size=1024, num_layers=6, num_heads=6, num_kv_heads=2,
        head_dim=64, num_experts=64, num_experts_per_tok=4, num_shared_experts=1, moe_intermediate_size=96,
        first_k_dense_replace=1, n_group=8, topk_group=4, max_position_embeddings=8192,
        mask_token_id=8191, eos_token_id=8190, pad_token_id=8190),
    "mini": ModelConfig(
        vocab_size=157184, hidden_size=2048, intermediate_size=5120, num_layers=20, num_heads=16, num_kv_heads=4,
        head_dim=128, num_experts=256, num_experts_per_tok=8, num_shared_experts=1, moe_intermediate_size=512,
        first_k_dense_replace=1, n_group=8, topk_group=4),
    "flash": ModelConfig(
        vocab_size=157184, hidden_size=4096, intermediate_size=9216, num_layers=32, num_heads=32, num_kv_heads=4,
        head_dim=128, num_experts=256, num_experts_per_tok=8, num_shared_experts=1, moe_intermediate_size=1024,
        first_k_dense_replace=1, n_group=8, topk_group=4),
}


def get_config(name: str, **overrides) -> ModelConfig:
    """A preset by name (`tiny`, `small`, `mini`, `flash`), with field overrides."""
    if name not in PRESETS:
        raise ConfigError(f"preset: expected one of {sorted(PRESETS)}, found {name!r}")
    return PRESETS[name].replace(**overrides) if overrides else PRESETS[name]
