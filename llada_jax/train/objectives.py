"""Block-diffusion training objectives of LLaDA2.x: noising and the one-forward loss (REFERENCE §2–4).

Three pieces, all pure functions of arrays, static configs and explicit keys:

* `noise` turns a batch of clean sequences into the denoiser's training input: M2T masking at a
  per-sequence level `t ~ U[t_min, t_max]` (prompt never masked), complementary masking (each
  example also with the inverse mask over its response, so every response token is predicted
  exactly once per pair) and the T2T perturbation (REFERENCE §4, project choice). Each example's
  noise comes from `fold_in(key, example_id)`, so it does not depend on where the example sits in
  the batch, and a resumed run that folds the same step into the same key sees the same noise.
* `loss_fn` scores one noised batch with ONE forward over the composite input `[x_t ; x_0]` under
  the BD3-LM mask of REFERENCE §3 (the "vectorized likelihood"), described as a
  `kernels.AttentionMask` so `ModelConfig.attention_impl` can skip masked tiles; only the first
  L hidden states reach the final norm and `lm_head`, which run in chunks of positions
  (`model.output_stats`: no `[N, L, V]` logits in the forward or the backward pass):
  `loss = m2t + lambda_t2t * t2t (+ lambda_mtf * mtf + cap_beta * cap)`. With one block as long
  as the sequence (MDLM) the clean half cannot be attended, so it is dropped.
* `BlockSizeSchedule` / `block_size_at`: the CPT warm-up / stable / decay schedule over block sizes.
* Multi-Block Editing SFT (`mbe_window`, its curriculum `mbe_window_schedule`): the composite
  mask gains cross-block links (`masks.composite_mbe`), so the model learns to revise a block
  while seeing the (noisy) blocks after it, what MBE decoding asks of it.

The block size shapes the attention mask, which must be static under `jit`; the trainer therefore
compiles one step per block size (`ObjectiveConfig` is a hashable static argument, and
`BlockSizeSchedule.sizes` lists the sizes a run will need). The RL code (EBPO, REFERENCE §6) reuses
`denoiser_logits` / `per_token_logprobs` / `per_block_sums` to get every block's ELBO term from
one forward per timestep.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Optional

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Bool, Float, Int, PRNGKeyArray

from llada_jax import model
from llada_jax.model import masks
from llada_jax.model.config import ConfigError, ModelConfig
from llada_jax.kernels import AttentionMask

WEIGHTINGS = ("elbo", "token_mean")


# ---------------------------------------------------------------------------------------- config
@dataclasses.dataclass(frozen=True)
class ObjectiveConfig:
    """Settings of the CPT / SFT objective (REFERENCE §4). Hashable: pass it to `jit` as static.

    Build it from the model with `ObjectiveConfig.for_model(model_config, **overrides)` so that the
    vocabulary and special ids agree; `loss_fn` checks that they do.
    """

    vocab_size: int
    mask_token_id: int
    eos_token_id: int
    pad_token_id: int
    # More ids that T2T must never sample (chat-role markers, <|startoftext|>, ...).
    extra_special_ids: tuple[int, ...] = ()
    block_size: int = 32
    mdlm: bool = False  # force MDLM (bidirectional over x_t only) whatever the block size
    t_min: float = 0.3  # mask-level band of the public SFT recipe
    t_max: float = 0.8
    weighting: str = "elbo"  # "elbo": sum -log p / t per response token; "token_mean": CE mean over masked
    complementary: bool = True
    p_edit: float = 0.1  # T2T: probability that a visible response token is replaced
    keep_weight: float = 0.0  # T2T weight of visible, unperturbed response tokens (target: themselves)
    lambda_t2t: float = 1.0
    mtf: bool = False  # second forward on the model's own draft (REFERENCE §4, project choice)
    lambda_mtf: float = 1.0
    cap: bool = False  # entropy penalty on already-correct masked predictions (LLaDA2.0 CAP)
    cap_beta: float = 2.0
    # Multi-Block Editing SFT (REFERENCE §5, "Beyond Block Boundaries"): window K of cross-block
    # links added to the composite mask (`masks.composite_mbe`); 0 = off (1 adds no link either).
    mbe_window: int = 0
    # The curriculum over K: `((num_steps, K), ...)` stages, the last K holding after them (e.g.
    # ((300, 2), (300, 3), (0, 4)) grows K from 2 to 4); () = `mbe_window` throughout.
    mbe_window_schedule: tuple[tuple[int, int], ...] = ()
    mbe_clean_sees_noisy: bool = True  # clean history blocks also see the window's noisy blocks

    def __post_init__(self):
        # ml_collections and JSON hand over lists; the config must stay hashable.
        object.__setattr__(self, "extra_special_ids", tuple(self.extra_special_ids))
        schedule = self.mbe_window_schedule
        if isinstance(schedule, (list, tuple)) and all(isinstance(st, (list, tuple)) for st in schedule):
            object.__setattr__(self, "mbe_window_schedule", tuple(tuple(st) for st in schedule))
        self.validate()

    @classmethod
    def for_model(cls, model_config: ModelConfig, **overrides) -> "ObjectiveConfig":
        """The objective for `model_config`'s vocabulary and special ids, with field overrides."""
        kw = dict(vocab_size=model_config.vocab_size, mask_token_id=model_config.mask_token_id,
                  eos_token_id=model_config.eos_token_id, pad_token_id=model_config.pad_token_id)
        kw.update(overrides)
        return cls(**kw)

    def replace(self, **kw) -> "ObjectiveConfig":
        return dataclasses.replace(self, **kw)

    @property
    def special_ids(self) -> tuple[int, ...]:
        """Sorted ids that T2T never samples: mask, EOS, PAD and `extra_special_ids`."""
        return tuple(sorted({self.mask_token_id, self.eos_token_id, self.pad_token_id,
                             *self.extra_special_ids}))

    def mbe_window_at(self, step: int) -> int:
        """The Multi-Block Editing window K in force at `step` (0-based): the curriculum's stage,
        else `mbe_window`. Pure host-side Python of the step, so a resumed run gets the same K."""
        if not self.mbe_window_schedule:
            return self.mbe_window
        return _stage_value(step, self.mbe_window_schedule)

    @property
    def mbe_windows(self) -> tuple[int, ...]:
        """The distinct windows a run will train with, in order of first use."""
        if not self.mbe_window_schedule:
            return (self.mbe_window,)
        return tuple(dict.fromkeys(k for _, k in self.mbe_window_schedule))

    @property
    def mask_links(self) -> dict:
        """The composite mask's Multi-Block Editing arguments for `mbe_window` (the current K)."""
        return dict(window=max(1, self.mbe_window), clean_sees_noisy=self.mbe_clean_sees_noisy)

    def is_mdlm(self, length: int) -> bool:
        """Whether sequences of `length` tokens train as MDLM (one block, clean half dropped)."""
        return self.mdlm or self.block_size >= length

    def validate(self) -> None:
        def fail(field, expected, found):
            raise ConfigError(f"ObjectiveConfig.{field}: expected {expected}, found {found!r}")

        for f in ("vocab_size", "block_size"):
            v = getattr(self, f)
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                fail(f, "a positive integer", v)
        for f in ("mask_token_id", "eos_token_id", "pad_token_id"):
            v = getattr(self, f)
            if not isinstance(v, int) or not 0 <= v < self.vocab_size:
                fail(f, f"a token id in [0, vocab_size={self.vocab_size})", v)
        for v in self.extra_special_ids:
            if not isinstance(v, int) or not 0 <= v < self.vocab_size:
                fail("extra_special_ids", f"token ids in [0, vocab_size={self.vocab_size})", self.extra_special_ids)
        if self.vocab_size - len(self.special_ids) < 2:
            fail("extra_special_ids", "at least two non-special ids left for T2T to sample from",
                 f"{len(self.special_ids)} specials in a vocabulary of {self.vocab_size}")
        # The complementary copy masks at rate 1 - t, so its ELBO weight 1/(1 - t) needs t < 1.
        hi_ok = self.t_max < 1.0 if self.complementary else self.t_max <= 1.0
        if not (0.0 < self.t_min <= self.t_max and hi_ok):
            band = "0 < t_min <= t_max < 1 (complementary masking)" if self.complementary else "0 < t_min <= t_max <= 1"
            fail("t_min/t_max", band, (self.t_min, self.t_max))
        if self.weighting not in WEIGHTINGS:
            fail("weighting", f"one of {WEIGHTINGS}", self.weighting)
        if not 0.0 <= self.p_edit < 1.0:
            fail("p_edit", "a probability in [0, 1)", self.p_edit)
        for f in ("keep_weight", "lambda_t2t", "lambda_mtf", "cap_beta"):
            if getattr(self, f) < 0:
                fail(f, "a non-negative number", getattr(self, f))
        if not isinstance(self.mbe_window, int) or isinstance(self.mbe_window, bool) or self.mbe_window < 0:
            fail("mbe_window", "an integer >= 0 (0 = off)", self.mbe_window)
        sched = self.mbe_window_schedule
        ok = isinstance(sched, tuple) and all(
            isinstance(st, tuple) and len(st) == 2 and all(isinstance(v, int) and not isinstance(v, bool) for v in st)
            and st[0] >= 0 and st[1] >= 0 for st in sched)
        if not ok:
            fail("mbe_window_schedule", "((num_steps >= 0, window >= 0), ...) stages", sched)
        if not isinstance(self.mbe_clean_sees_noisy, bool):
            fail("mbe_clean_sees_noisy", "true or false", self.mbe_clean_sees_noisy)

    def check_model(self, model_config: ModelConfig) -> None:
        """Raises `ConfigError` if this objective was built for another vocabulary or mask id."""
        for f in ("vocab_size", "mask_token_id"):
            if getattr(self, f) != getattr(model_config, f):
                raise ConfigError(f"ObjectiveConfig.{f}: expected the model's {getattr(model_config, f)!r}, "
                                  f"found {getattr(self, f)!r}")


# ---------------------------------------------------------------------------------------- noising
@flax.struct.dataclass
class NoisedBatch:
    """The denoiser's training input; N = 2B with complementary masking (originals, then complements).

    Every response position (`loss_mask`) is exactly one of `masked` (M2T target), `edited` (T2T
    target: a wrong visible token) or `kept` (visible and unperturbed).
    """

    x_0: Int[Array, "N L"]  # clean tokens: the targets
    x_t: Int[Array, "N L"]  # noisy input
    masked: Bool[Array, "N L"]
    edited: Bool[Array, "N L"]
    kept: Bool[Array, "N L"]
    loss_mask: Bool[Array, "N L"]
    t: Float[Array, " N"]  # the row's mask rate: t for an original, 1 - t for its complement
    doc_ids: Optional[Int[Array, "N L"]] = None


def _check_batch(batch: Mapping[str, Any]) -> tuple[Array, Array, Optional[Array], Array]:
    for k in ("tokens", "loss_mask"):
        if k not in batch:
            raise ValueError(f"batch: expected a {k!r} entry, found keys {sorted(batch)}")
    tokens, loss_mask = jnp.asarray(batch["tokens"]), jnp.asarray(batch["loss_mask"])
    if tokens.ndim != 2 or not jnp.issubdtype(tokens.dtype, jnp.integer):
        raise ValueError(f"batch['tokens']: expected an integer array [B, L], found {tokens.dtype}{tokens.shape}")
    if loss_mask.shape != tokens.shape or loss_mask.dtype != jnp.bool_:
        raise ValueError(f"batch['loss_mask']: expected bool{tokens.shape}, found {loss_mask.dtype}{loss_mask.shape}")
    doc_ids = batch.get("doc_ids")
    if doc_ids is not None:
        doc_ids = jnp.asarray(doc_ids)
        if doc_ids.shape != tokens.shape:
            raise ValueError(f"batch['doc_ids']: expected shape {tokens.shape}, found {doc_ids.shape}")
    example_ids = batch.get("example_ids")
    example_ids = jnp.arange(tokens.shape[0]) if example_ids is None else jnp.asarray(example_ids)
    if example_ids.shape != tokens.shape[:1]:
        raise ValueError(f"batch['example_ids']: expected shape {tokens.shape[:1]}, found {example_ids.shape}")
    return tokens, loss_mask, doc_ids, example_ids


def sample_non_special(key: PRNGKeyArray, original: Int[Array, " L"], special_ids: tuple[int, ...],
                       vocab_size: int) -> Int[Array, " L"]:
    """A token per position drawn uniformly from the non-special ids other than `original`.

    Excluding the original makes every T2T perturbation a real error. No [V] table: with the
    specials sorted, `s_j - j` non-special ids lie below `s_j`, so the r-th non-special id is
    `r + #{j : s_j - j <= r}` (one `searchsorted`).
    """
    specials = np.asarray(sorted(special_ids), dtype=np.int32)
    below = jnp.asarray(specials - np.arange(len(specials), dtype=np.int32))  # non-special ids below s_j
    specials = jnp.asarray(specials)
    idx = jnp.searchsorted(specials, original, side="left")  # specials below the original
    is_special = specials[jnp.minimum(idx, len(special_ids) - 1)] == original
    rank = original - idx  # the original's index among the non-special ids
    r = jax.random.randint(key, original.shape, 0, vocab_size - len(special_ids) - (~is_special).astype(jnp.int32))
    r = r + (~is_special & (r >= rank)).astype(r.dtype)  # skip the original's own slot
    return (r + jnp.searchsorted(below, r, side="right")).astype(original.dtype)


def noise(batch: Mapping[str, Any], key: PRNGKeyArray, config: ObjectiveConfig) -> NoisedBatch:
    """M2T masking, complementary masking and T2T perturbation of a clean batch (REFERENCE §4).

    `batch`: `tokens [B, L]` int, `loss_mask [B, L]` bool (True on response tokens that may be
    noised; prompt and padding False), optional `doc_ids [B, L]` (packed CPT) and optional
    `example_ids [B]` (the example's global index; defaults to its batch row). Pass a key already
    folded with the step, e.g. `fold_in(rng, step)`.

    An example's uniforms are shared by its two complementary copies: a response position is
    visible in exactly one copy, and only there may its T2T draw perturb it.
    """
    tokens, loss_mask, doc_ids, example_ids = _check_batch(batch)
    _, length = tokens.shape
    specials = config.special_ids

    def draw(example_id, x_0):
        k_t, k_mask, k_edit, k_tok = jax.random.split(jax.random.fold_in(key, example_id), 4)
        t = jax.random.uniform(k_t, (), minval=config.t_min, maxval=config.t_max)
        u_mask = jax.random.uniform(k_mask, (length,))
        if config.p_edit > 0:
            edit = jax.random.uniform(k_edit, (length,)) < config.p_edit
            replacement = sample_non_special(k_tok, x_0, specials, config.vocab_size)
        else:
            edit, replacement = jnp.zeros((length,), bool), x_0
        return t, u_mask, edit, replacement

    t, u_mask, edit, replacement = jax.vmap(draw)(example_ids, tokens)

    def corrupt(masked, rate):
        visible = loss_mask & ~masked
        edited = visible & edit
        x_t = jnp.where(masked, config.mask_token_id, jnp.where(edited, replacement, tokens))
        return NoisedBatch(x_0=tokens, x_t=x_t, masked=masked, edited=edited, kept=visible & ~edited,
                           loss_mask=loss_mask, t=rate, doc_ids=doc_ids)

    masked = loss_mask & (u_mask < t[:, None])
    noised = corrupt(masked, t)
    if not config.complementary:
        return noised
    complement = corrupt(loss_mask & ~masked, 1.0 - t)
    return jax.tree.map(lambda a, b: jnp.concatenate([a, b], axis=0), noised, complement)


# ---------------------------------------------------------------------------------------- forward
def denoiser_hidden(params, model_config: ModelConfig, x_t: Int[Array, "N L"], x_0: Int[Array, "N L"],
                    block_size: int, doc_ids: Optional[Int[Array, "N L"]] = None,
                    mdlm: bool = False, with_load: bool = False, mask_links: Optional[dict] = None
                    ) -> Float[Array, "N L D"]:
    """The noisy half's last hidden states (before the final norm) from ONE forward.

    Block diffusion (REFERENCE §3): the input is `[x_t ; x_0]` (length 2L) under the composite
    mask, described (`AttentionMask.composite`) so that `model_config.attention_impl` can skip
    what it forbids, and the first L positions are kept: the clean half never reaches the final
    norm or `lm_head`. With `mdlm` or `block_size >= L` the noisy half attends nothing of the
    clean half, so the forward runs bidirectionally over x_t alone (half the tokens). `doc_ids`
    (packed data) additionally restricts attention to the same document (segment ids) and
    restarts the RoPE positions at each document (`masks.document_positions`), so every packed
    document is rotated as it would be alone (with one id per row these are `arange(L)`).
    With `with_load`, returns `(hidden, load)`: the rows each routed expert received in this
    forward, `[MoE layers, E]` float32 (every routed token of the forward counts). `mask_links`
    (`ObjectiveConfig.mask_links`: `window`, `clean_sees_noisy`) adds Multi-Block Editing's
    cross-block links to the composite mask.
    """
    length = x_t.shape[1]
    positions = None if doc_ids is None else masks.document_positions(doc_ids)
    if mdlm or block_size >= length:
        hidden, load = _hidden(params, model_config, x_t, positions,
                               AttentionMask.bidirectional(segment_ids=doc_ids), with_load)
        return (hidden, load) if with_load else hidden
    segments = None if doc_ids is None else jnp.concatenate([doc_ids, doc_ids], axis=1)
    positions = (jnp.concatenate([jnp.arange(length), jnp.arange(length)]) if positions is None
                 else jnp.concatenate([positions, positions], axis=1))
    hidden, load = _hidden(params, model_config, jnp.concatenate([x_t, x_0], axis=1), positions,
                           AttentionMask.composite(block_size, segment_ids=segments, **(mask_links or {})),
                           with_load)
    return (hidden[:, :length], load) if with_load else hidden[:, :length]


def _hidden(params, model_config: ModelConfig, tokens, positions, mask, with_load: bool = True):
    """`model.hidden_states`, and with `with_load` the routed rows per expert of each MoE layer."""
    if not with_load:
        return model.hidden_states(params, model_config, tokens, positions, mask), None
    if model_config.num_moe_layers == 0:
        return (model.hidden_states(params, model_config, tokens, positions, mask),
                jnp.zeros((0, model_config.num_experts), jnp.float32))
    hidden, (idx, _) = model.hidden_states_with_router(params, model_config, tokens, positions, mask)
    load = jax.vmap(lambda i: jnp.bincount(i.reshape(-1), length=model_config.num_experts))(idx)
    return hidden, load.astype(jnp.float32)


def denoiser_logits(params, model_config: ModelConfig, x_t: Int[Array, "N L"], x_0: Int[Array, "N L"],
                    block_size: int, doc_ids: Optional[Int[Array, "N L"]] = None,
                    mdlm: bool = False) -> Float[Array, "N L V"]:
    """Logits `[N, L, V]` of p(x_0 | x_t, clean earlier blocks) at every position, from ONE forward
    (`denoiser_hidden`, then the final norm and `lm_head` on the noisy half only). The losses do
    not call this: they read `model.output_stats` in chunks and never hold `[N, L, V]`."""
    hidden = denoiser_hidden(params, model_config, x_t, x_0, block_size, doc_ids, mdlm)
    return model.logits_from_hidden(params, model_config, hidden)


def token_logprobs(logits: Float[Array, "N L V"], targets: Int[Array, "N L"]) -> Float[Array, "N L"]:
    """log softmax(logits)[target] at every position (fp32)."""
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    return jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]


def per_token_logprobs(params, model_config: ModelConfig, x_t: Int[Array, "N L"], x_0: Int[Array, "N L"],
                       block_size: int, doc_ids: Optional[Int[Array, "N L"]] = None,
                       mdlm: bool = False, mask_links: Optional[dict] = None) -> Float[Array, "N L"]:
    """log p(x_0[i] | x_t, clean blocks before i's block) for every i: the vectorized likelihood.

    One forward gives every block's terms at once (REFERENCE §3, §6); EBPO sums them per block
    with `per_block_sums(jnp.where(masked, logp / t, 0), block_size)`. The lm_head and the
    log-softmax run in chunks of `model_config.logits_chunk` positions (no `[N, L, V]`).
    """
    hidden = denoiser_hidden(params, model_config, x_t, x_0, block_size, doc_ids, mdlm, mask_links=mask_links)
    return model.output_stats(params, model_config, hidden, x_0)["logp"]


def per_block_sums(values: Float[Array, "N L"], block_size: int) -> Float[Array, "N NB"]:
    """Sums `values` over each block of `block_size` positions (the last block may be partial)."""
    n, length = values.shape
    num_blocks = -(-length // block_size)
    padded = jnp.pad(values, ((0, 0), (0, num_blocks * block_size - length)))
    return padded.reshape(n, num_blocks, block_size).sum(-1)


# ---------------------------------------------------------------------------------------- losses
def _safe_div(num, den):
    return num / jnp.where(den > 0, den, 1)


def m2t_loss(logp: Float[Array, "N L"], masked: Bool[Array, "N L"], t: Float[Array, " N"],
             loss_mask: Bool[Array, "N L"], weighting: str, denominator=None) -> Float[Array, ""]:
    """Mask-to-token loss (REFERENCE §4).

    "elbo": `sum_masked(-log p / t) / #response tokens`, an unbiased estimate of the per-token
    negative ELBO (E[#masked / t] = #response tokens). "token_mean": cross-entropy averaged over
    the masked tokens. `denominator` replaces the count of this batch (gradient accumulation
    passes the whole step's, see `loss_denominators`).
    """
    nll = jnp.where(masked, -logp, 0.0)
    if weighting == "elbo":
        return _safe_div(jnp.sum(nll / t[:, None]), jnp.sum(loss_mask) if denominator is None else denominator)
    if weighting == "token_mean":
        return _safe_div(jnp.sum(nll), jnp.sum(masked) if denominator is None else denominator)
    raise ConfigError(f"weighting: expected one of {WEIGHTINGS}, found {weighting!r}")


def t2t_loss(logp: Float[Array, "N L"], edited: Bool[Array, "N L"], kept: Bool[Array, "N L"],
             keep_weight: float, denominator=None) -> Float[Array, ""]:
    """Token-to-token loss: weighted CE mean over edited positions (weight 1) and kept ones (`keep_weight`)."""
    w = _t2t_weight(edited, kept, keep_weight)
    return _safe_div(jnp.sum(-logp * w), jnp.sum(w) if denominator is None else denominator)


def _t2t_weight(edited, kept, keep_weight):
    return edited.astype(jnp.float32) + keep_weight * kept.astype(jnp.float32)


def cap_loss(logp_all: Float[Array, "N L V"], targets: Int[Array, "N L"],
             masked: Bool[Array, "N L"], denominator=None) -> Float[Array, ""]:
    """CAP confidence loss (LLaDA2.0): mean predictive entropy over the masked positions whose
    argmax already equals the target; sharpening right answers lets more tokens pass the decoder's
    confidence threshold per step."""
    entropy = -jnp.sum(jnp.exp(logp_all) * logp_all, axis=-1)  # [N, L]
    return cap_loss_from_entropy(entropy, jnp.argmax(logp_all, axis=-1) == targets, masked, denominator)


def cap_loss_from_entropy(entropy: Float[Array, "N L"], correct: Bool[Array, "N L"],
                          masked: Bool[Array, "N L"], denominator=None) -> Float[Array, ""]:
    """`cap_loss` from per-token entropies and argmax hits (what the chunked head computes)."""
    confident = masked & correct
    return _safe_div(jnp.sum(jnp.where(confident, entropy, 0.0)),
                     jnp.sum(confident) if denominator is None else denominator)


def _output_stats(params, model_config: ModelConfig, hidden, nb: "NoisedBatch", obj_config: "ObjectiveConfig"):
    """Chunked lm_head statistics of the noisy half: log p(x_0), argmax, MTF's draft (never
    <|mask|>), CAP's entropy; no [N, L, V] tensor."""
    return model.output_stats(params, model_config, hidden, nb.x_0, entropy=obj_config.cap,
                              exclude_id=obj_config.mask_token_id if obj_config.mtf else None)


def _noise_counts(nb: "NoisedBatch", obj_config: "ObjectiveConfig") -> dict[str, Array]:
    return {"response": jnp.sum(nb.loss_mask), "masked": jnp.sum(nb.masked), "edited": jnp.sum(nb.edited),
            "t2t_weight": jnp.sum(_t2t_weight(nb.edited, nb.kept, obj_config.keep_weight))}


def _forward_counts(stats, nb: "NoisedBatch", obj_config: "ObjectiveConfig") -> dict[str, Array]:
    out = {}
    if obj_config.mtf:
        out["draft_wrong"] = jnp.sum(nb.masked & (stats["draft"] != nb.x_0))
    if obj_config.cap:
        out["confident"] = jnp.sum(nb.masked & (stats["argmax"] == nb.x_0))
    return out


def loss_denominators(params, model_config: ModelConfig, obj_config: "ObjectiveConfig", batch: Mapping[str, Any],
                      rng: PRNGKeyArray) -> dict[str, Array]:
    """The counts that normalise `loss_fn`'s terms, over `batch` (no gradient).

    Gradient accumulation sums these over the micro-batches of a step and hands the totals to
    every micro-batch's `loss_fn(..., denominators=...)`: each micro-batch then contributes its
    share of the whole step's loss, and the summed loss and gradient equal the unaccumulated
    step's. The noise-only counts need no forward; MTF's wrong-draft count and CAP's confident
    count depend on the model's argmax and cost one forward (without gradient) per micro-batch.
    """
    nb = noise(batch, rng, obj_config)
    counts = _noise_counts(nb, obj_config)
    if obj_config.mtf or obj_config.cap:
        mdlm = obj_config.is_mdlm(nb.x_0.shape[1])
        p = jax.lax.stop_gradient(params)
        hidden = denoiser_hidden(p, model_config, nb.x_t, nb.x_0, obj_config.block_size, nb.doc_ids, mdlm,
                                 mask_links=obj_config.mask_links)
        counts.update(_forward_counts(_output_stats(p, model_config, hidden, nb, obj_config), nb, obj_config))
    return counts


def loss_fn(params, model_config: ModelConfig, obj_config: ObjectiveConfig, batch: Mapping[str, Any],
            rng: PRNGKeyArray, denominators: Optional[Mapping[str, Array]] = None
            ) -> tuple[Float[Array, ""], dict[str, Array]]:
    """The block-diffusion training loss of one batch: `(loss, metrics)`; differentiable in `params`.

    `rng` is the noise key (fold the step into it); `model_config` and `obj_config` are static
    under `jit`. M2T and T2T share one forward (a position is masked, edited or kept); MTF adds a
    second forward on the stop-gradient argmax draft; CAP adds `cap_beta * mean entropy` over
    masked positions already predicted correctly.

    `metrics["expert_load"]` ([MoE layers, E], the first forward's rows per expert) feeds the
    trainer's load metrics and the aux-loss-free `expert_bias` update.

    `denominators` (from `loss_denominators`, summed over a step's micro-batches) replace this
    batch's own counts in every mean, loss and metric alike; the loss and every metric are then
    additive over micro-batches (gradient accumulation sums them).
    """
    obj_config.check_model(model_config)
    nb = noise(batch, rng, obj_config)
    mdlm = obj_config.is_mdlm(nb.x_0.shape[1])

    # Hidden states of the noisy half only; lm_head, log-softmax, argmax and (CAP) entropy run in
    # chunks of positions, so no [N, L, V] tensor exists in the forward or the backward pass.
    hidden, load = denoiser_hidden(params, model_config, nb.x_t, nb.x_0, obj_config.block_size, nb.doc_ids, mdlm,
                                   with_load=True, mask_links=obj_config.mask_links)
    stats = _output_stats(params, model_config, hidden, nb, obj_config)
    den = _noise_counts(nb, obj_config) | _forward_counts(stats, nb, obj_config)
    if denominators is not None:
        missing = sorted(set(den) - set(denominators))
        if missing:
            raise ValueError(f"loss_fn.denominators: expected the keys {sorted(den)}, missing {missing}")
        den = {k: denominators[k] for k in den}
    logp = stats["logp"]
    correct = stats["argmax"] == nb.x_0

    m2t = m2t_loss(logp, nb.masked, nb.t, nb.loss_mask, obj_config.weighting,
                   den["response"] if obj_config.weighting == "elbo" else den["masked"])
    t2t = t2t_loss(logp, nb.edited, nb.kept, obj_config.keep_weight, den["t2t_weight"])
    total = m2t + obj_config.lambda_t2t * t2t
    metrics = {
        "m2t_loss": m2t, "t2t_loss": t2t,
        "masked_acc": _safe_div(jnp.sum(correct & nb.masked), den["masked"]),
        "edit_acc": _safe_div(jnp.sum(correct & nb.edited), den["edited"]),
        "num_masked": jnp.sum(nb.masked), "num_edited": jnp.sum(nb.edited), "num_kept": jnp.sum(nb.kept),
        "num_loss_tokens": jnp.sum(nb.loss_mask),
        "expert_load": jax.lax.stop_gradient(load),  # [MoE layers, E]: rows per expert (train.expert_load_metrics)
    }

    if obj_config.mtf:
        # The draft never proposes <|mask|>: a masked draft position would just be M2T again.
        draft = jax.lax.stop_gradient(stats["draft"]).astype(nb.x_t.dtype)
        x_draft = jnp.where(nb.masked, draft, nb.x_t)
        wrong = nb.masked & (draft != nb.x_0)
        logp2 = per_token_logprobs(params, model_config, x_draft, nb.x_0, obj_config.block_size, nb.doc_ids, mdlm,
                                   mask_links=obj_config.mask_links)
        mtf = _safe_div(jnp.sum(jnp.where(wrong, -logp2, 0.0)), den["draft_wrong"])
        total = total + obj_config.lambda_mtf * mtf
        metrics.update(mtf_loss=mtf, num_draft_wrong=jnp.sum(wrong))

    if obj_config.cap:
        cap = cap_loss_from_entropy(stats["entropy"], correct, nb.masked, den["confident"])
        total = total + obj_config.cap_beta * cap
        metrics["cap_loss"] = cap

    metrics["loss"] = total
    return total, metrics


# ---------------------------------------------------------------------------------------- schedule
@dataclasses.dataclass(frozen=True)
class BlockSizeSchedule:
    """Piecewise-constant block size over steps: `stages[i] = (num_steps, block_size)`.

    After the last stage its block size holds. Pure host-side Python: the block size is a static
    shape of the attention mask, so the trainer reads it per step and keeps one compiled step per
    size in `sizes`.
    """

    stages: tuple[tuple[int, int], ...]

    def __post_init__(self):
        object.__setattr__(self, "stages", tuple((int(n), int(b)) for n, b in self.stages))
        if not self.stages:
            raise ConfigError("BlockSizeSchedule.stages: expected at least one (num_steps, block_size), found ()")
        for n, b in self.stages:
            if n < 0 or b <= 0:
                raise ConfigError("BlockSizeSchedule.stages: expected (num_steps >= 0, block_size > 0) pairs, "
                                  f"found {(n, b)}")

    @property
    def sizes(self) -> tuple[int, ...]:
        """The distinct block sizes in order of first use."""
        return tuple(dict.fromkeys(b for _, b in self.stages))


def block_size_at(step: int, schedule: BlockSizeSchedule) -> int:
    """The block size in force at `step` (0-based)."""
    return _stage_value(step, schedule.stages)


def _stage_value(step: int, stages) -> int:
    """The value of `((num_steps, value), ...)` stages at `step`; the last value holds after them."""
    end = 0
    for num_steps, value in stages:
        end += num_steps
        if step < end:
            return value
    return stages[-1][1]


def wsd_block_schedule(seq_len: int, warmup_steps: int, stable_steps: int, decay_steps: int,
                       warmup_sizes: tuple[int, ...] = (1, 4, 32), final_size: int = 32) -> BlockSizeSchedule:
    """CPT's warm-up / stable / decay schedule over block sizes (REFERENCE §4, LLaDA2.0 WSD).

    Warm-up walks `warmup_sizes` then doubles up to (excluding) `seq_len`; the stable phase trains
    with one block of `seq_len` (MDLM); the decay halves from `seq_len // 2` down to `final_size`.
    Each phase's steps are shared evenly by its sizes (the remainder goes to the last one), and
    the final size holds after the schedule. E.g. seq_len 256: 1, 4, 32, 64, 128 | 256 | 128, 64, 32.
    """
    if not all(a < b for a, b in zip((0,) + warmup_sizes, warmup_sizes + (seq_len,))):
        raise ConfigError(f"wsd_block_schedule.warmup_sizes: expected increasing sizes below seq_len={seq_len}, "
                          f"found {warmup_sizes}")
    if not 0 < final_size < seq_len:
        raise ConfigError(f"wsd_block_schedule.final_size: expected a size in (0, seq_len={seq_len}), "
                          f"found {final_size}")
    for name, v in (("warmup_steps", warmup_steps), ("stable_steps", stable_steps), ("decay_steps", decay_steps)):
        if v < 0:
            raise ConfigError(f"wsd_block_schedule.{name}: expected a non-negative integer, found {v}")
    warm = list(warmup_sizes)
    while warm[-1] * 2 < seq_len:
        warm.append(warm[-1] * 2)
    decay, size = [], seq_len // 2
    while size > final_size:
        decay.append(size)
        size //= 2
    decay.append(final_size)

    def split(total, sizes):
        base, rem = divmod(total, len(sizes))
        return [(base + (rem if i == len(sizes) - 1 else 0), b) for i, b in enumerate(sizes)]

    stages = split(warmup_steps, warm) + [(stable_steps, seq_len)] + split(decay_steps, decay)
    return BlockSizeSchedule(tuple((n, b) for n, b in stages if n > 0) or ((0, final_size),))
