"""BLOOM in Flax Linen, computing what transformers' PyTorch `BloomForCausalLM` computes.

Shape letters in names: b batch, s query length, t key length, d hidden size, n heads, h head size,
f MLP size (4d), v vocabulary, l layers. So `x_bsd` is [batch, seq, hidden] and `kernel_dnh` is [d, n, h].

Every parameter carries logical axis names (`param_logical_axes`) and the activations between blocks are constrained
to logical names (`ACT_BSD`); the mesh rules that turn them into shardings live in `configs/`.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from bloom_jax import kernels as ops
from bloom_jax.cache import KVCache, write_layer
from bloom_jax.config import BloomConfig
from bloom_jax.errors import BloomJaxError
from bloom_jax.kernels import Kernels
from bloom_jax.kernels.attention import AttentionMask
from bloom_jax.lora import LoraConfig
from bloom_jax.weights import WeightFormat

Dtype = Any
# Logical axis names of the activations at block boundaries.
ACT_BSD = ("activation_batch", "activation_length", "activation_embed")

# jax.checkpoint policies by name; "none" means no rematerialisation at all.
REMAT_POLICIES: dict[str, Callable | None] = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.dots_saveable,
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def bloom_gelu(x: jax.Array) -> jax.Array:
    """GELU in BLOOM's tanh form, with Megatron's literal constants."""
    return x * 0.5 * (1.0 + jnp.tanh(0.79788456 * x * (1.0 + 0.044715 * x * x)))


class LayerNorm(nn.Module):
    """LayerNorm over the last axis with statistics in float32 whatever the activation dtype."""

    epsilon: float
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x_bsd: jax.Array) -> jax.Array:
        d = x_bsd.shape[-1]
        scale_d = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones, ("norm",)), (d,),
                             self.param_dtype)
        bias_d = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros, ("norm",)), (d,),
                            self.param_dtype)
        x = x_bsd.astype(jnp.float32)
        mean = jnp.mean(x, axis=-1, keepdims=True)
        var = jnp.mean(jnp.square(x - mean), axis=-1, keepdims=True)
        y = (x - mean) * lax.rsqrt(var + self.epsilon)
        return (y * scale_d.astype(jnp.float32) + bias_d.astype(jnp.float32)).astype(self.dtype)


class Linear(nn.Module):
    """y = x . kernel + bias, contracting the trailing `len(in_features)` axes of x.

    The kernel is [*in_features, *out_features] (a PyTorch weight transposed, then reshaped), the bias
    [*out_features]; `weights` says how the kernel is stored and multiplied (decode weights out-major, a frozen
    quantized base) and whether an adapter sits beside it (`bloom_jax.weights.WeightFormat`). `tp_slices > 1`
    reproduces transformers' `slow_but_exact` path for float kernels: the flattened input is cut into
    `tp_slices` column blocks whose partial products are added one by one, and no bias is added (decode weights
    ignore it).
    """

    in_features: tuple[int, ...]
    out_features: tuple[int, ...]
    axes: tuple[str, ...]  # logical names of the kernel axes, inputs then outputs
    kernel_init: Callable = nn.initializers.normal(0.02)
    tp_slices: int = 1
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    weights: WeightFormat = WeightFormat()
    kernels: Kernels = Kernels()
    deterministic: bool = True  # no adapter dropout

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        fmt = self.weights
        bias_axes = self.axes[len(self.in_features):]
        bias = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros, bias_axes), self.out_features,
                          self.param_dtype)
        stored = fmt.kernel(self, self.in_features, self.out_features, self.axes, self.kernel_init, self.param_dtype)
        if self.tp_slices > 1 and fmt.decode is None:
            if fmt.frozen is not None:
                raise BloomJaxError("frozen (quantized) weights do not reproduce slow_but_exact's tp slices")
            x = x.astype(self.dtype)
            y = self._tp_partial_sums(x, stored["kernel"].astype(self.dtype))
        else:
            y = fmt.multiply(self.kernels, x, stored, self.in_features, self.out_features, self.dtype)
            y = y + bias.astype(self.dtype)
        if fmt.adapts(self.name):
            y = y + fmt.adapter(self, x.astype(self.dtype), self.in_features, self.out_features, self.axes,
                                self.dtype, self.deterministic)
        return y

    def _tp_partial_sums(self, x: jax.Array, kernel: jax.Array) -> jax.Array:
        n_in, size_in = len(self.in_features), math.prod(self.in_features)
        x_flat = x.reshape(*x.shape[: x.ndim - n_in], size_in)
        kernel_io = kernel.reshape(size_in, -1)
        # Same (possibly uneven) boundaries as PyTorch's int(i * size / tp).
        bounds = [int(i * size_in / self.tp_slices) for i in range(self.tp_slices + 1)]
        y = jnp.zeros((*x_flat.shape[:-1], kernel_io.shape[1]), self.dtype)
        for lo, hi in zip(bounds[:-1], bounds[1:]):
            y = y + x_flat[..., lo:hi] @ kernel_io[lo:hi]
        return y.reshape(*y.shape[:-1], *self.out_features)


class Embed(nn.Module):
    """The word embedding [v, d], also the tied LM head (`attend`), stored as `weights` says (decode weights: in
    their dtype, int8 with a float32 `scale` [v] per row, the head through `kernels.decode_matmul`)."""

    vocab_size: int
    features: int
    embedding_init: Callable = nn.initializers.normal(0.02)
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    weights: WeightFormat = WeightFormat()
    kernels: Kernels = Kernels()

    def setup(self):
        self.embedding, self.scale = self.weights.embedding(self, self.vocab_size, self.features,
                                                            self.embedding_init, self.param_dtype)

    def __call__(self, ids_bs: jax.Array) -> jax.Array:
        """Embeddings [b, s, d] in the compute dtype."""
        rows_bsd = ops.gather(self.kernels, self.embedding, ids_bs)
        if self.scale is not None:
            rows_bsd = rows_bsd * jnp.take(self.scale, ids_bs, axis=0)[..., None]
        return rows_bsd.astype(self.dtype)

    def attend(self, x_bsd: jax.Array) -> jax.Array:
        """Logits float32 [b, s, v] = x . embedding^T, accumulated in float32."""
        return self.weights.logits(self.kernels, x_bsd, self.embedding, self.scale, self.dtype)


class Attention(nn.Module):
    """Multi-head self-attention with ALiBi and BLOOM's fused [n, 3, h] query-key-value projection; the attention
    itself is `kernels.attention`'s."""

    config: BloomConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    weights: WeightFormat = WeightFormat()
    kernels: Kernels = Kernels()

    @nn.compact
    def __call__(self, x_bsd: jax.Array, mask: AttentionMask, deterministic: bool,
                 kv_cache: tuple[jax.Array, jax.Array] | None = None):
        """Attention output [b, s, d]; with `kv_cache` (keys, values [b*n, T, h], batch-major) the new keys and
        values are written at `mask.query_start`, attention runs over all T cached positions, and the updated
        cache is returned as a second output."""
        cfg = self.config
        d, n, h = cfg.hidden_size, cfg.n_head, cfg.head_dim
        init = nn.initializers.normal(cfg.initializer_range)
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype, weights=self.weights, kernels=self.kernels,
                  deterministic=deterministic)
        qkv_bsn3h = Linear((d,), (n, 3, h), ("embed", "heads", "qkv", "head_dim"), init, name="query_key_value",
                           **kw)(x_bsd)
        # Head-major [3, b, n, s, h] before the batched matmuls: XLA:CPU runs them 2-3x faster than on the
        # [b, s, n, h] slices (measured at 1x128 and 8x128 for the bloom-560m shapes).
        qkv_3bnsh = jnp.transpose(qkv_bsn3h, (3, 0, 2, 1, 4))
        q_bnsh, k, v = qkv_3bnsh[0], qkv_3bnsh[1], qkv_3bnsh[2]
        if kv_cache is not None:  # the layer's cache, batch and heads merged (bloom_jax.cache)
            kv_cache = write_layer(*kv_cache, k, v, mask.query_start)
            # A server's cache may hold more rows than this batch (its first rows): attention reads only those.
            k, v = (c[: q_bnsh.shape[0] * n].astype(self.dtype) for c in kv_cache)
        dropout = None
        if cfg.attention_dropout > 0 and not deterministic:
            dropout = functools.partial(nn.Dropout(cfg.attention_dropout), deterministic=False)
        context_bnsh = ops.attend(self.kernels, q_bnsh, k, v, mask, self.dtype, dropout)
        context_bsnh = context_bnsh.transpose(0, 2, 1, 3)

        tp = cfg.pretraining_tp if cfg.slow_but_exact else 1
        out_bsd = Linear((n, h), (d,), ("heads", "head_dim", "embed"), init, tp_slices=tp, name="dense",
                         **kw)(context_bsnh)
        return out_bsd if kv_cache is None else (out_bsd, kv_cache)


class Mlp(nn.Module):
    """dense_h_to_4h, GELU, dense_4h_to_h."""

    config: BloomConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    weights: WeightFormat = WeightFormat()
    kernels: Kernels = Kernels()
    deterministic: bool = True

    @nn.compact
    def __call__(self, x_bsd: jax.Array) -> jax.Array:
        cfg = self.config
        d, f = cfg.hidden_size, cfg.mlp_dim
        init = nn.initializers.normal(cfg.initializer_range)
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype, weights=self.weights, kernels=self.kernels,
                  deterministic=self.deterministic)
        x_bsf = Linear((d,), (f,), ("embed", "mlp"), init, name="dense_h_to_4h", **kw)(x_bsd)
        x_bsf = bloom_gelu(x_bsf)
        tp = cfg.pretraining_tp if cfg.slow_but_exact else 1
        return Linear((f,), (d,), ("mlp", "embed"), init, tp_slices=tp, name="dense_4h_to_h", **kw)(x_bsf)


class Block(nn.Module):
    """One pre-LayerNorm transformer block; a scan body, so it returns `(carry, None)`."""

    config: BloomConfig
    deterministic: bool = True
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    weights: WeightFormat = WeightFormat()
    kernels: Kernels = Kernels()

    @nn.compact
    def __call__(self, x_bsd: jax.Array, mask: AttentionMask, kv_cache: tuple[jax.Array, jax.Array] | None = None):
        """(x_bsd, updated kv_cache or None)."""
        cfg = self.config
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        x_bsd = ops.gradient_barrier(self.kernels, nn.with_logical_constraint(x_bsd, ACT_BSD))

        ln_bsd = LayerNorm(cfg.layer_norm_epsilon, name="input_layernorm", **kw)(x_bsd)
        residual = ln_bsd if cfg.apply_residual_connection_post_layernorm else x_bsd
        attention = Attention(cfg, name="self_attention", weights=self.weights, kernels=self.kernels, **kw)
        attn_bsd = attention(ln_bsd, mask, self.deterministic, kv_cache)
        if kv_cache is not None:
            attn_bsd, kv_cache = attn_bsd
        x_bsd = residual + nn.Dropout(cfg.hidden_dropout)(attn_bsd, deterministic=self.deterministic)

        ln_bsd = LayerNorm(cfg.layer_norm_epsilon, name="post_attention_layernorm", **kw)(x_bsd)
        residual = ln_bsd if cfg.apply_residual_connection_post_layernorm else x_bsd
        mlp_bsd = Mlp(cfg, name="mlp", weights=self.weights, kernels=self.kernels, deterministic=self.deterministic,
                      **kw)(ln_bsd)
        x_bsd = residual + nn.Dropout(cfg.hidden_dropout)(mlp_bsd, deterministic=self.deterministic)
        return nn.with_logical_constraint(x_bsd, ACT_BSD), kv_cache


class BloomForCausalLM(nn.Module):
    """BLOOM with its tied LM head: `apply({"params": p}, input_ids, attention_mask=mask)` -> float32 logits.

    Attributes:
      config: the architecture.
      dtype: compute dtype of activations and matmuls (LayerNorm statistics, softmax and logits stay float32).
      param_dtype: storage dtype of the parameters.
      scan_layers: run the blocks under `nn.scan` (one compiled block whatever the depth; every block
        parameter is stacked under `h` with a leading `layers` axis). False unrolls them as separate modules
        `h_0` .. `h_{L-1}`: longer compiles, but no per-layer slicing of stacked weights, which is 25% faster
        at 1 x 128 tokens on a 2-core CPU. `stack_layers` / `unstack_layers` convert between the layouts.
      remat_policy: a key of `REMAT_POLICIES`, the activation checkpointing of each block in training.
      decode_weights: None, or a key of `bloom_jax.weights.DECODE_WEIGHTS`: the inference-only weight formats
        that `bloom_jax.weights.to_decode_weights` makes (out-major kernels in float32, bfloat16 or int8), read
        at memory speed in matrix-vector products. LayerNorms and biases stay in `param_dtype`.
      kernels: the implementations of attention, the decode matmul, the gradient barrier and the embedding
        gather (`bloom_jax.kernels.Kernels`); None: `Kernels.create()` for JAX's default backend.
      lora: low-rank adapters on the linear layers it names (`bloom_jax.lora.LoraConfig`): parameters `lora_a`
        and `lora_b` beside each targeted kernel.
      frozen_weights: None, or a key of `bloom_jax.quantize.FROZEN_FORMATS`: the linear layers' kernels stored
        quantized (a QLoRA base made by `bloom_jax.quantize.quantize_base`, for training adapters beside it).
        The three are one `bloom_jax.weights.WeightFormat` for the layers (`weight_format`).
    """

    config: BloomConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    scan_layers: bool = True
    remat_policy: str = "none"
    decode_weights: str | None = None
    kernels: Kernels | None = None
    lora: LoraConfig | None = None
    frozen_weights: str | None = None

    @nn.compact
    def __call__(self, input_ids: jax.Array, attention_mask: jax.Array | None = None, deterministic: bool = True,
                 cache: KVCache | None = None, last_only: bool = False, return_hidden: bool = False,
                 segment_ids: jax.Array | None = None):
        """Logits float32 [b, s, v] (or [b, 1, v] with `last_only`) of token ids int [b, s].

        `attention_mask` [b, s] is 1 for tokens and 0 for padding (left or right). `segment_ids` [b, s], for rows
        that pack several examples (without a cache): k >= 1 for the tokens of the row's k-th example (each
        example's together), 0 for padding; each token attends only to its own example, whose ALiBi positions
        start at 0, so each example's logits are those it gets alone. With a `cache`
        (`bloom_jax.cache.KVCache`) the ids are the next positions after those cached: returns
        `(logits, updated cache)`; a cache with a write position per row may have more rows than the ids (a
        server's slots): the ids are its first rows, the others are left as they are. `return_hidden`: the final
        hidden states [b, s, d] (after `ln_f`) instead of the logits, for a loss that applies the tied head itself
        (`bloom_jax.losses`).
        """
        cfg = self.config
        kernels = self.resolved_kernels
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        ids_bs = input_ids
        mask_bs = jnp.ones(ids_bs.shape, jnp.int32) if attention_mask is None else attention_mask
        if segment_ids is not None:
            if cache is not None:
                raise ValueError("segment_ids are for packed rows without a cache")
            mask_bs = mask_bs * (segment_ids > 0).astype(mask_bs.dtype)

        embed = self.word_embeddings(name="word_embeddings")
        x_bsd = LayerNorm(cfg.layer_norm_epsilon, name="word_embeddings_layernorm", **kw)(embed(ids_bs))

        # The dense ALiBi bias and visibility are built once here, for every layer, only for the reference.
        s = ids_bs.shape[1]
        if cache is None:
            mask = AttentionMask.create(mask_bs, cfg.n_head, s, 0, kernels.attention_at(s, s) == "reference",
                                        segment_ids=segment_ids)
            for blocks in self._blocks(deterministic, kernels):
                x_bsd, _ = blocks(x_bsd, mask)
        else:
            mask_bt = cache.with_new_tokens(mask_bs)
            dense = kernels.attention_at(s, mask_bt.shape[1]) == "reference"
            rows = ids_bs.shape[0]  # the cache's first rows (all of them but for a server's idle slots)
            query_start = cache.index[:rows] if cache.per_row else cache.index
            mask = AttentionMask.create(mask_bt[:rows], cfg.n_head, s, query_start, dense)
            x_bsd, keys, values = self._cached_blocks(deterministic, kernels, x_bsd, mask, cache)
            cache = cache.advance(keys, values, mask_bt, s)

        if last_only:
            x_bsd = x_bsd[:, -1:]
        x_bsd = LayerNorm(cfg.layer_norm_epsilon, name="ln_f", **kw)(x_bsd)
        if return_hidden:
            return x_bsd if cache is None else (x_bsd, cache)
        logits_bsv = embed.attend(x_bsd)
        logits_bsv = nn.with_logical_constraint(
            logits_bsv, ("activation_batch", "activation_length", "activation_vocab"))
        return logits_bsv if cache is None else (logits_bsv, cache)

    def word_embeddings(self, **where) -> Embed:
        """The word embedding, which is also the tied LM head (`Embed.attend`), in this model's dtypes, weight
        format and kernels; `where`: its `name` inside the model, or `parent=None` for one of its own."""
        cfg = self.config
        return Embed(cfg.vocab_size, cfg.hidden_size, nn.initializers.normal(cfg.initializer_range),
                     dtype=self.dtype, param_dtype=self.param_dtype, weights=self.weight_format,
                     kernels=self.resolved_kernels, **where)

    @property
    def weight_format(self) -> WeightFormat:
        """`decode_weights`, `frozen_weights` and `lora` as the one object every layer asks."""
        return WeightFormat(self.decode_weights, self.frozen_weights, self.lora)

    @property
    def resolved_kernels(self) -> Kernels:
        """`kernels`, or the default backend's when None."""
        return self.kernels if self.kernels is not None else Kernels.create()

    def _cached_blocks(self, deterministic, kernels, x_bsd, mask: AttentionMask, cache: KVCache):
        """The blocks over the cache: (x_bsd, updated keys, updated values), stacked or one per layer."""
        blocks = self._blocks(deterministic, kernels, with_cache=True)
        if self.scan_layers:
            if cache.per_layer:
                raise BloomJaxError("a scanned model needs a stacked KV cache (KVCache.init(per_layer=False))")
            x_bsd, (keys, values) = blocks[0](x_bsd, mask, (cache.keys, cache.values))
            return x_bsd, keys, values
        keys, values = [], []
        for i, block in enumerate(blocks):
            x_bsd, (k, v) = block(x_bsd, mask, cache.layer(i))
            keys.append(k)
            values.append(v)
        return x_bsd, keys, values

    def _blocks(self, deterministic: bool, kernels: Kernels, with_cache: bool = False) -> list[nn.Module]:
        """The n_layer blocks: one `nn.scan` over stacked parameters, or n_layer separate modules."""
        if self.remat_policy not in REMAT_POLICIES:
            raise BloomJaxError(
                f"unknown remat policy {self.remat_policy!r} (choose from {', '.join(REMAT_POLICIES)})"
            )
        block_cls = Block
        if self.remat_policy != "none":
            block_cls = nn.remat(Block, policy=REMAT_POLICIES[self.remat_policy], prevent_cse=not self.scan_layers)
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype, weights=self.weight_format, kernels=kernels)
        if not self.scan_layers:
            return [block_cls(self.config, deterministic, **kw, name=f"h_{i}") for i in range(self.config.n_layer)]
        scanned = nn.scan(
            block_cls,
            variable_axes={"params": 0},
            split_rngs={"params": True, "dropout": True},
            in_axes=(nn.broadcast, 0) if with_cache else (nn.broadcast,),
            length=self.config.n_layer,
            metadata_params={nn.PARTITION_NAME: "layers"},
        )
        return [scanned(self.config, deterministic, **kw, name="h")]


def stack_layers(params: dict, n_layer: int) -> dict:
    """Parameters of an unrolled model (`h_0` .. `h_{L-1}`) in the scanned layout (`h`, leading layers axis)."""
    out = {k: v for k, v in params.items() if not k.startswith("h_")}
    out["h"] = jax.tree.map(lambda *layers: jnp.stack(layers), *[params[f"h_{i}"] for i in range(n_layer)])
    return out


def unstack_layers(params: dict) -> dict:
    """Parameters of a scanned model (`h`, leading layers axis) in the unrolled layout (`h_0` .. `h_{L-1}`)."""
    out = {k: v for k, v in params.items() if k != "h"}
    n_layer = jax.tree.leaves(params["h"])[0].shape[0]
    for i in range(n_layer):
        out[f"h_{i}"] = jax.tree.map(lambda a: a[i], params["h"])
    return out


@functools.lru_cache(maxsize=64)
def abstract_params(model: BloomForCausalLM) -> Any:
    """Parameter shapes and dtypes (`jax.ShapeDtypeStruct` leaves, logical-axis boxes kept), no memory used.

    Traced once per model (1-3 s for a deep one) and shared by every caller: treat the result as read-only.
    """
    with nn.logical_axis_rules(()):  # the same shapes whatever mesh context the first caller is in
        return jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 1), jnp.int32))["params"]


def tied_head(model: BloomForCausalLM, params: Any, hidden_bsd: jax.Array) -> jax.Array:
    """Logits float32 [b, s, v] of final hidden states [b, s, d] (`model.apply(..., return_hidden=True)`), through
    the model's own tied head: its `Embed.attend` over `params["word_embeddings"]`, in the model's weight format
    (float, or decode weights in bfloat16 or int8 with their scale), as `BloomForCausalLM.__call__` computes them.
    For scoring positions a block at a time instead of materialising [b, s, v] for a whole sequence."""
    logits_bsv = model.word_embeddings(parent=None).apply({"params": params["word_embeddings"]}, hidden_bsd, method=Embed.attend)
    return nn.with_logical_constraint(logits_bsv, ("activation_batch", "activation_length", "activation_vocab"))


def param_logical_axes(model: BloomForCausalLM) -> Any:
    """The logical axis names of every parameter, a pytree of `PartitionSpec`s."""
    return nn.get_partition_spec(abstract_params(model))


def count_params(params: Any) -> int:
    """Number of scalars in a parameter pytree (arrays or abstract shapes, boxed or not)."""
    return sum(math.prod(x.shape) for x in jax.tree.leaves(nn.unbox(params)))


def forward_flops(config: BloomConfig, batch: int, seq: int) -> float:
    """FLOPs of one forward pass over [batch, seq] tokens: every matmul (the tied head included, attention over
    the full s x s square as computed). A training step is about 3x this."""
    d, f, v, n_layer = config.hidden_size, config.mlp_dim, config.vocab_size, config.n_layer
    dense_per_token = n_layer * (3 * d * d + d * d + 2 * d * f) + v * d
    attention = n_layer * 2 * seq * seq * d  # q.k^T and probs.v
    return 2.0 * batch * (seq * dense_per_token + attention)


def init_params(model: BloomForCausalLM, rng: jax.Array) -> Any:
    """Random parameters (transformers' init: normal(initializer_range), zero biases, unit LayerNorm scales)."""
    ids = jnp.zeros((1, 1), jnp.int32)
    return nn.unbox(jax.jit(model.init)(rng, ids)["params"])


def make_model(config: BloomConfig, dtype: Dtype = jnp.float32, param_dtype: Dtype | None = None,
               kernels: Kernels | str = "auto", attention: str = "auto", **kwargs) -> BloomForCausalLM:
    """The model for `config`; `param_dtype` defaults to `dtype`. `kernels` and `attention`: a `Kernels`, or the
    names `Kernels.create` takes, resolved now for JAX's default backend."""
    if not isinstance(kernels, Kernels):
        kernels = Kernels.create(kernels, attention)
    return BloomForCausalLM(config, dtype=jnp.dtype(dtype),
                            param_dtype=jnp.dtype(param_dtype if param_dtype is not None else dtype),
                            kernels=kernels, **kwargs)


__all__: Sequence[str] = (
    "BloomForCausalLM", "Block", "Embed", "Attention", "Mlp", "Linear", "LayerNorm", "bloom_gelu",
    "abstract_params", "param_logical_axes", "count_params", "init_params", "make_model", "stack_layers",
    "unstack_layers", "REMAT_POLICIES", "ACT_BSD", "forward_flops", "tied_head",
)
