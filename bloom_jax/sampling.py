"""How the next token is chosen from the logits, once for `bloom_jax.generate` and the server's decode slots
(`bloom_jax.serving.batch`): transformers' logits processors in its order (repetition penalty, temperature, top-k,
top-p), greedy argmax or a Gumbel-max draw, and the seen-token marks the penalty reads.

Each setting is one number for every row (a `Sampling`: `generate`'s call) or an array [b] with each row's own (a
`RowSampling`: a server's slots, each with its own request). The static `Features` say which steps any row needs:
each combination is its own compiled program, and one without `sample` or `penalty` is the argmax alone.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from bloom_jax import kernels as ops
from bloom_jax.errors import BloomJaxError
from bloom_jax.kernels import Kernels


class Features(NamedTuple):
    """What any row needs (static: the steps that no row needs are left out of the compiled program, the sorts of
    top-k and top-p above all)."""

    sample: bool = False  # a row samples (temperature > 0); the others are greedy
    top_k: bool = False  # a sampling row keeps only its k best tokens
    top_p: bool = False  # a sampling row keeps only its nucleus
    penalty: bool = False  # a row has a repetition penalty


@dataclasses.dataclass(frozen=True)
class Sampling:
    """One sampling setting for every row. temperature 0 is greedy (top-k and top-p then do nothing); otherwise
    sampling after transformers' processors in its order: repetition penalty, temperature, top-k, top-p."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    repetition_penalty: float = 1.0

    def __post_init__(self):
        if not self.temperature >= 0:
            raise BloomJaxError(f"temperature must be >= 0 (0 is greedy), got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise BloomJaxError(f"top-p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise BloomJaxError(f"top-k must be >= 0 (0 keeps every token), got {self.top_k}")
        if not self.repetition_penalty > 0:
            raise BloomJaxError(f"repetition penalty must be > 0 (1 is none), got {self.repetition_penalty}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def features(self) -> Features:
        """The steps these settings need."""
        sample = not self.greedy
        return Features(sample, sample and self.top_k > 0, sample and self.top_p < 1.0, self.repetition_penalty != 1.0)


def seed_key(seed: int) -> jax.Array:
    """The PRNG key (threefry) of a seed anywhere in the 64-bit range, signed or unsigned (a negative seed as its
    two's complement): its high and low 32 bits are the key's data, as `jax.random.key` makes it with 64-bit
    integers enabled. Without them `jax.random.key` keeps only the low 32 bits (2**32 would draw as 0); for
    0 <= seed < 2**31 both give the same key."""
    if not -2**63 <= seed < 2**64:
        raise BloomJaxError(f"a seed must be a 64-bit integer, got {seed}")
    seed %= 2**64
    return jax.random.wrap_key_data(np.asarray([seed >> 32, seed & 0xFFFFFFFF], np.uint32), impl="threefry2x32")


class RowSampling(NamedTuple):
    """Each row's own sampling settings, each [b]: temperature (0: greedy), top-k (0: all), top-p, repetition
    penalty (1: none), the row's key data (uint32 [b, 2], `jax.random.key_data`) and the index of the token it
    draws."""

    temperature: jax.Array
    top_k: jax.Array
    top_p: jax.Array
    repetition_penalty: jax.Array
    key_data: jax.Array
    token_index: jax.Array

    def keys(self) -> jax.Array:
        """Each row's key for this token [b]: its own key folded with the token's index, so that a row draws the
        same tokens whatever else shares the batch."""
        return jax.vmap(jax.random.fold_in)(jax.random.wrap_key_data(self.key_data), self.token_index)


def _per_row(setting):
    """A setting against logits [b, v]: a number as it is (its arithmetic stays Python's, as transformers' does), an
    array [b] as a column [b, 1]."""
    return setting[:, None] if jnp.ndim(setting) == 1 else setting


def penalised(logits_bv: jax.Array, seen_bv: jax.Array, repetition_penalty) -> jax.Array:
    """transformers' repetition penalty: the seen tokens' positive logits divided by the penalty, negative ones
    multiplied (a number, or one per row [b])."""
    p = _per_row(repetition_penalty)
    return jnp.where(seen_bv, jnp.where(logits_bv > 0, logits_bv / p, logits_bv * p), logits_bv)


def truncated(logits_bv: jax.Array, top_k, top_p, features: Features) -> jax.Array:
    """Top-k (k a number or one per row [b]; 0: none) then top-p (p likewise; 1: none), as `features` asks:
    removed tokens get -inf."""
    v = logits_bv.shape[-1]
    if features.top_k:
        k_b1 = _per_row(top_k)
        ascending_bv = jnp.sort(logits_bv, axis=-1)
        kth_b1 = jnp.take_along_axis(ascending_bv, jnp.broadcast_to(v - jnp.clip(k_b1, 1, v), (len(logits_bv), 1)),
                                     axis=-1)
        logits_bv = jnp.where((k_b1 > 0) & (logits_bv < kth_b1), -jnp.inf, logits_bv)
    if features.top_p:
        order_bv = jnp.argsort(logits_bv, axis=-1)  # ascending, as transformers sorts
        sorted_bv = jnp.take_along_axis(logits_bv, order_bv, axis=-1)
        cumulative_bv = jnp.cumsum(jax.nn.softmax(sorted_bv, axis=-1), axis=-1)
        # 1 - p before any broadcast: for a number, in double precision as transformers computes it.
        remove_sorted_bv = (cumulative_bv <= _per_row(1.0 - top_p)) & (_per_row(top_p) < 1.0)
        remove_sorted_bv = remove_sorted_bv.at[:, -1].set(False)  # always keep the top token
        remove_bv = jnp.zeros_like(remove_sorted_bv).at[jnp.arange(logits_bv.shape[0])[:, None], order_bv].set(
            remove_sorted_bv)
        logits_bv = jnp.where(remove_bv, -jnp.inf, logits_bv)
    return logits_bv


def _warped(logits_bv: jax.Array, settings: Sampling | RowSampling, features: Features) -> jax.Array:
    """The sampling rows' temperature (greedy rows' 0 taken as 1), top-k and top-p."""
    logits_bv = logits_bv / _per_row(jnp.where(settings.temperature == 0.0, 1.0, settings.temperature))
    return truncated(logits_bv, settings.top_k, settings.top_p, features)


def _penalised_float32(logits_bv: jax.Array, seen_bv: jax.Array | None, settings: Sampling | RowSampling,
                       features: Features) -> jax.Array:
    logits_bv = logits_bv.astype(jnp.float32)
    return penalised(logits_bv, seen_bv, settings.repetition_penalty) if features.penalty else logits_bv


def process_logits(logits_bv: jax.Array, seen_bv: jax.Array | None, settings: Sampling | RowSampling,
                   features: Features | None = None) -> jax.Array:
    """Next-token logits float32 [b, v] after transformers' processors, in its order: repetition penalty (on the
    tokens that `seen_bv` [b, v] marks), then, where a row samples, temperature, top-k and top-p. Removed tokens
    get -inf. `features` None: what `settings` (a `Sampling`) needs."""
    features = settings.features if features is None else features
    logits_bv = _penalised_float32(logits_bv, seen_bv, settings, features)
    return _warped(logits_bv, settings, features) if features.sample else logits_bv


def gumbel_noise(key: jax.Array, shape: tuple[int, int], dtype=jnp.float32) -> jax.Array:
    """Gumbel noise [b, v] from one key for the whole batch (`jax.random.categorical`'s draw), or from one key per
    row [b] (`RowSampling.keys`)."""
    if key.ndim == 0:
        return jax.random.gumbel(key, shape, dtype)
    return jax.vmap(lambda row_key: jax.random.gumbel(row_key, shape[1:], dtype))(key)


def choose(kernels: Kernels, logits_bv: jax.Array, seen_bv: jax.Array | None, settings: Sampling | RowSampling,
           features: Features, key: jax.Array | None = None) -> jax.Array:
    """Each row's next token int32 [b] under its settings: the argmax of its (penalised) logits where it is greedy,
    else a Gumbel-max draw from `process_logits` with `key` (see `gumbel_noise`; None when no row samples), which
    takes the tokens `jax.random.categorical` takes for the same key, with the kernels' argmax."""
    x_bv = _penalised_float32(logits_bv, seen_bv, settings, features)
    token_b = ops.argmax(kernels, x_bv)
    if features.sample:
        y_bv = _warped(x_bv, settings, features)
        drawn_b = ops.argmax(kernels, y_bv + gumbel_noise(key, y_bv.shape, y_bv.dtype))
        token_b = jnp.where(settings.temperature == 0.0, token_b, drawn_b)
    return token_b


def seen_tokens(ids_bs: jax.Array, vocab_size: int) -> jax.Array:
    """The seen-token marks bool [b, v] of rows that have seen these ids [b, s] (a prompt's, padding included:
    transformers counts every id of the prompt rows)."""
    return mark_seen(jnp.zeros((ids_bs.shape[0], vocab_size), jnp.bool_), ids_bs)


def mark_seen(seen_bv: jax.Array | None, ids_bs: jax.Array, rows_b: jax.Array | None = None) -> jax.Array | None:
    """The seen-token marks with new ids [b, s] marked in rows `rows_b` [b] (None: the first b). None, where no
    repetition penalty reads them, stays None."""
    if seen_bv is None:
        return None
    rows_b = jnp.arange(ids_bs.shape[0]) if rows_b is None else rows_b
    return seen_bv.at[rows_b[:, None], ids_bs].set(True)


__all__ = ["Features", "RowSampling", "Sampling", "choose", "gumbel_noise", "mark_seen", "penalised",
           "process_logits", "seed_key", "seen_tokens", "truncated"]
