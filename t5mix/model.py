"""The T5 model (v1.0 and v1.1 / flan-t5 variants) in Flax NNX, encoder-decoder or decoder-only prefix-LM.

Architecture as in the T5 paper and HF `modeling_t5.py`: pre-norm RMSNorm (no bias, no mean subtraction), no
biases anywhere, no 1/sqrt(d) attention scaling (folded into the initialisation), a bucketed relative position
bias computed once per stack and shared by all its layers, and a token embedding shared by encoder and decoder.

Parameters are float32; activations use `config.dtype`; softmax, RMSNorm statistics and logits are float32.
Every parameter carries logical axis names (`out_sharding` metadata) for sharding; nothing is sharded eagerly,
so the model also runs on one device without a mesh.

Batches are seqio feature-converter outputs (`EncDecFeatureConverter` / `PrefixLMFeatureConverter`). With
packing, segment ids keep attention inside each example. The `*_positions` features are not needed: positions
within a segment are contiguous, and the bias depends only on (key position - query position), so a packed
example gets exactly the bias it gets alone.
"""

import dataclasses
import functools
import math
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import yaml
from flax import nnx

from t5mix import peft
from t5mix.errors import UserError

CONFIG_DIR = pathlib.Path(__file__).resolve().parent.parent / "configs" / "model"
NEG_INF = -1e10  # finite, so that fully masked rows (padding) give uniform weights instead of NaN
# What a layer keeps for the backward pass (jax.checkpoint policies); the rest is recomputed there.
REMAT_POLICIES = {
    "none": None,  # everything: no recomputation
    "dots_saveable": jax.checkpoint_policies.dots_saveable,  # matmul outputs; elementwise ops recomputed
    "full": jax.checkpoint_policies.nothing_saveable,  # only the layer's inputs; the whole layer recomputed
}


@dataclasses.dataclass(frozen=True)
class T5Config:
  vocab_size: int
  d_model: int
  d_kv: int
  d_ff: int
  num_heads: int
  num_encoder_layers: int
  num_decoder_layers: int
  relative_attention_num_buckets: int = 32
  relative_attention_max_distance: int = 128
  dropout_rate: float = 0.1
  layer_norm_epsilon: float = 1e-6
  feed_forward_proj: str = "gated-gelu"  # "relu" (T5 v1.0) or "gated-gelu" (v1.1, flan-t5)
  tie_word_embeddings: bool = False  # v1.0: True (and logits scaled by d_model**-0.5)
  architecture: str = "encoder_decoder"  # or "decoder_only" (prefix-LM; uses num_decoder_layers)
  dtype: str = "float32"  # compute dtype: "float32" or "bfloat16"
  # Activation memory (whole-sequence passes; decoding runs the layers one by one regardless):
  remat: str = "none"  # recompute each layer in the backward pass: none | dots_saveable | full (REMAT_POLICIES)
  scan_layers: bool = False  # one compiled layer scanned over the stacked layer parameters
  # Parameter-efficient fine-tuning (t5mix/peft.py); 0 = none, so existing checkpoints are unaffected.
  adapter_size: int = 0  # bottleneck adapter after each FFN (and attention, if adapter_after_attention)
  adapter_after_attention: bool = False
  lora_rank: int = 0  # LoRA on the lora_targets projections, scale lora_alpha / lora_rank
  lora_alpha: float = 8.0
  lora_targets: str = "query,value"  # comma-separated: query,key,value,out,wi(_0/_1),wo | attention | mlp | all

  def __post_init__(self):
    for f in dataclasses.fields(self):
      value = getattr(self, f.name)
      if f.type is float and type(value) in (int, str):
        # YAML reads `0` as an int and `1e-6` (no dot) as a string.
        try:
          object.__setattr__(self, f.name, float(value))
        except ValueError:
          raise UserError(f"model config: '{f.name}' must be a float, got {value!r}") from None
      elif type(value) is not f.type:
        raise UserError(f"model config: '{f.name}' must be a {f.type.__name__}, got {value!r}")
    choices = {
        "feed_forward_proj": ("relu", "gated-gelu"),
        "architecture": ("encoder_decoder", "decoder_only"),
        "dtype": ("float32", "bfloat16"),
        "remat": tuple(REMAT_POLICIES),
    }
    for name, allowed in choices.items():
      if getattr(self, name) not in allowed:
        raise UserError(f"model config: '{name}' must be one of {', '.join(allowed)}, got {getattr(self, name)!r}")
    if self.num_heads <= 0 or self.d_model <= 0 or self.vocab_size <= 0 or self.num_decoder_layers <= 0:
      raise UserError("model config: vocab_size, d_model, num_heads and num_decoder_layers must be positive")
    if self.architecture == "encoder_decoder" and self.num_encoder_layers <= 0:
      raise UserError("model config: an encoder_decoder model needs num_encoder_layers > 0")
    if self.adapter_size < 0 or self.lora_rank < 0:
      raise UserError("model config: adapter_size and lora_rank must be >= 0")
    if self.lora_rank:
      try:
        peft.lora_targets(self.lora_targets, self.feed_forward_proj == "gated-gelu")
      except ValueError as e:
        raise UserError(f"model config: 'lora_targets': {e}") from None

  @property
  def compute_dtype(self):
    return jnp.dtype(self.dtype)

  @classmethod
  def from_dict(cls, d: dict, source: str = "model config") -> "T5Config":
    names = {f.name for f in dataclasses.fields(cls)}
    for key in d:
      if key not in names:
        raise UserError(f"{source}: unknown key '{key}' (known: {', '.join(sorted(names))})")
    try:
      return cls(**d)
    except TypeError as e:  # a missing required key
      raise UserError(f"{source}: {e}") from None

  def to_dict(self) -> dict:
    return dataclasses.asdict(self)


def load_model_config(path_or_name: str) -> T5Config:
  """A config from a YAML file, or by name from `configs/model/<name>.yaml` (tiny, small, base, large)."""
  path = pathlib.Path(path_or_name)
  if not path.suffix:
    path = CONFIG_DIR / f"{path_or_name}.yaml"
    if not path.exists():
      known = ", ".join(sorted(p.stem for p in CONFIG_DIR.glob("*.yaml")))
      raise UserError(f"unknown model config '{path_or_name}' (known: {known})")
  if not path.exists():
    raise UserError(f"{path}: model config file not found")
  try:
    d = yaml.safe_load(path.read_text())
  except yaml.YAMLError as e:
    raise UserError(f"{path}: invalid YAML: {str(e).splitlines()[0]}") from None
  if not isinstance(d, dict):
    raise UserError(f"{path}: a model config must be a mapping of keys to values")
  return T5Config.from_dict(d, source=str(path))


# --- building blocks ---------------------------------------------------------------------------------------


def save_model_config(config: T5Config, path) -> None:
  """Writes the config as YAML that `load_model_config` reads back (a workdir's model.yaml)."""
  import yaml
  with open(path, "w") as f:
    yaml.safe_dump(dataclasses.asdict(config), f, sort_keys=False)


def _param(rngs, std, shape, axes):
  """A float32 normal(0, std) parameter annotated with logical axis names (HF / Mesh-TF T5 init)."""
  value = std * jax.random.normal(rngs.params(), shape, jnp.float32)
  return nnx.Param(value, out_sharding=axes, eager_sharding=False)


def _dense(x, w, in_dims: int = 1, out_dtype=None):
  """x [..., *in] times w [*in, *out] -> [..., *out], as one 2-D matmul.

  XLA:CPU runs the weight gradient of a 3-D einsum (two contracting dims) several times slower than
  the same product on flattened 2-D operands (benchmarks/RESULTS.md, "Performance"), so flatten.
  """
  lead, w_in, w_out = x.shape[:x.ndim - in_dims], w.shape[:in_dims], w.shape[in_dims:]
  y = jnp.matmul(x.reshape(math.prod(lead), math.prod(w_in)), w.reshape(math.prod(w_in), math.prod(w_out)),
                 preferred_element_type=out_dtype)
  return y.reshape(*lead, *w_out)


@jax.custom_vjp
def _add_position_bias(logits, bias):
  """logits [B, H, Lq, Lk] + bias [1, H, Lq, Lk].

  Hand-written gradient: the bias cotangent is a sum over the batch, which XLA:CPU runs ~20x faster as a
  matmul with a ones vector than as the reduction autodiff emits (benchmarks/RESULTS.md, "Performance").
  """
  return logits + bias


def _add_position_bias_fwd(logits, bias):
  return logits + bias, None


def _add_position_bias_bwd(_, g):
  batch = g.shape[0]
  return g, (jnp.ones((batch,), g.dtype) @ g.reshape(batch, -1)).reshape(1, *g.shape[1:])


_add_position_bias.defvjp(_add_position_bias_fwd, _add_position_bias_bwd)


def _dropout(x, rate, deterministic, rngs):
  if deterministic or rate == 0.0:
    return x
  if rngs is None:
    raise ValueError("dropout needs rngs: call model(..., deterministic=False, rngs=nnx.Rngs(dropout=key))")
  keep = jax.random.bernoulli(rngs.dropout(), 1.0 - rate, x.shape)
  return jnp.where(keep, x / (1.0 - rate), 0).astype(x.dtype)


class RMSNorm(nnx.Module):
  """T5 LayerNorm: scale only, no mean subtraction, statistics in float32."""

  def __init__(self, config: T5Config):
    self.eps = config.layer_norm_epsilon
    self.scale = nnx.Param(jnp.ones((config.d_model,), jnp.float32), out_sharding=("embed",), eager_sharding=False)

  def __call__(self, x):
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
    return (y * self.scale[...]).astype(x.dtype)


class Attention(nnx.Module):
  """Multi-head attention; q/k/v are [embed, heads, kv] so heads can be sharded. No 1/sqrt(d_kv) scaling."""

  def __init__(self, config: T5Config, *, rngs: nnx.Rngs):
    d, h, k = config.d_model, config.num_heads, config.d_kv
    self.dtype, self.dropout_rate = config.compute_dtype, config.dropout_rate
    self.query = _param(rngs, (d * k) ** -0.5, (d, h, k), ("embed", "heads", "kv"))
    self.key = _param(rngs, d**-0.5, (d, h, k), ("embed", "heads", "kv"))
    self.value = _param(rngs, d**-0.5, (d, h, k), ("embed", "heads", "kv"))
    self.out = _param(rngs, (h * k) ** -0.5, (h, k, d), ("heads", "kv", "embed"))

  def project(self, x, names):
    """x [B, L, D] through the named projections (query/key/value): a tuple of [B, L, heads, kv].

    (One matmul on the stacked weights measured no faster on CPU, so they stay separate.)"""
    return tuple(_dense(x, peft.weight(self, name, self.dtype)) for name in names)

  def project_kv(self, x):
    """Keys and values [B, L, heads, kv]; separate from the queries so that decoding can cache them."""
    return self.project(x, ("key", "value"))

  def __call__(self, q, k, v, mask, bias, *, deterministic, rngs, heads_first=False):
    """Queries q [B, Lq, H, K] attend to k, v [B, Lk, H, K] ([B, H, Lk, K] if heads_first); mask bool
    and bias float32 broadcast to [B, H, Lq, Lk]. Returns [B, Lq, D].

    The decoding cache keeps keys and values heads-first, the layout the batched matmuls read, so
    each step does not transpose the whole cache again."""
    # Both products batched over (batch, heads) with heads-first operands: XLA:CPU runs those
    # batched matmuls faster than on [B, L, H, K] operands, transposes included (train step
    # 0.649 -> 0.631 s/step at the benchmark shape, benchmarks/RESULTS.md).
    q = q.transpose(0, 2, 1, 3)
    if not heads_first:
      k, v = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)
    logits = jnp.einsum("bhqk,bhsk->bhqs", q, k, preferred_element_type=jnp.float32)
    if bias is not None:
      logits = _add_position_bias(logits, bias)
    probs = jax.nn.softmax(jnp.where(mask, logits, NEG_INF), axis=-1)
    probs = _dropout(probs, self.dropout_rate, deterministic, rngs).astype(self.dtype)
    ctx = jnp.einsum("bhqs,bhsk->bhqk", probs, v).transpose(0, 2, 1, 3)
    return _dense(ctx, peft.weight(self, "out", self.dtype), in_dims=2)


class MLP(nnx.Module):
  """relu (v1.0) or gated tanh-gelu (v1.1: gelu(x wi_0) * (x wi_1)) feed-forward."""

  def __init__(self, config: T5Config, *, rngs: nnx.Rngs):
    d, f = config.d_model, config.d_ff
    self.dtype, self.dropout_rate = config.compute_dtype, config.dropout_rate
    self.gated = config.feed_forward_proj == "gated-gelu"
    if self.gated:
      self.wi_0 = _param(rngs, d**-0.5, (d, f), ("embed", "mlp"))
      self.wi_1 = _param(rngs, d**-0.5, (d, f), ("embed", "mlp"))
    else:
      self.wi = _param(rngs, d**-0.5, (d, f), ("embed", "mlp"))
    self.wo = _param(rngs, f**-0.5, (f, d), ("mlp", "embed"))

  def __call__(self, x, *, deterministic, rngs):
    dense = lambda w: _dense(x, peft.weight(self, w, self.dtype))
    if self.gated:
      h = jax.nn.gelu(dense("wi_0"), approximate=True) * dense("wi_1")  # HF gelu_new = tanh approx.
    else:
      h = jax.nn.relu(dense("wi"))
    h = _dropout(h, self.dropout_rate, deterministic, rngs)
    return _dense(h, peft.weight(self, "wo", self.dtype))


class Block(nnx.Module):
  """One pre-norm layer: self-attention, cross-attention (encoder-decoder decoder only), MLP."""

  def __init__(self, config: T5Config, *, cross_attention: bool, rngs: nnx.Rngs):
    self.dropout_rate = config.dropout_rate
    self.self_attention_norm = RMSNorm(config)
    self.self_attention = Attention(config, rngs=rngs)
    if cross_attention:
      self.cross_attention_norm = RMSNorm(config)
      self.cross_attention = Attention(config, rngs=rngs)
    else:
      self.cross_attention_norm = self.cross_attention = None
    self.mlp_norm = RMSNorm(config)
    self.mlp = MLP(config, rngs=rngs)

  def __call__(self, x, mask, bias, *, encoded, cross_mask, cache, index, deterministic, rngs):
    """cache: None (whole sequences) or this layer's decoding cache, written at `index`."""
    drop = lambda y: _dropout(y, self.dropout_rate, deterministic, rngs)
    h = self.self_attention_norm(x)
    q, k, v = self.self_attention.project(h, ("query", "key", "value"))
    cached = cache is not None
    if cached:  # the cache is heads-first: [B, H, max_length, K]
      k = jax.lax.dynamic_update_slice_in_dim(cache["k"], k.transpose(0, 2, 1, 3), index, axis=2)
      v = jax.lax.dynamic_update_slice_in_dim(cache["v"], v.transpose(0, 2, 1, 3), index, axis=2)
      cache = {**cache, "k": k, "v": v}
    x = x + drop(peft.adapt(self, "self_attention_adapter", self.self_attention(
        q, k, v, mask, bias, deterministic=deterministic, rngs=rngs, heads_first=cached)))
    if self.cross_attention is not None:
      h = self.cross_attention_norm(x)
      (q,) = self.cross_attention.project(h, ("query",))
      ck, cv = (cache["cross_k"], cache["cross_v"]) if cached else self.cross_attention.project_kv(encoded)
      # T5 cross-attention has no position bias.
      x = x + drop(peft.adapt(self, "cross_attention_adapter", self.cross_attention(
          q, ck, cv, cross_mask, None, deterministic=deterministic, rngs=rngs, heads_first=cached)))
    x = x + drop(peft.adapt(self, "mlp_adapter", self.mlp(self.mlp_norm(x), deterministic=deterministic, rngs=rngs)))
    return x, cache


def relative_position_bucket(relative_position, *, bidirectional, num_buckets, max_distance):
  """Mesh-TF / HF T5 bucketing of (key - query): exact below num_buckets/2 (per direction), log-spaced above.

  numpy on the host, in float32 like HF, so the buckets are identical on every backend.
  """
  n = np.asarray(relative_position)
  ret = 0
  if bidirectional:
    num_buckets //= 2
    ret = (n > 0).astype(np.int32) * num_buckets
    n = np.abs(n)
  else:
    n = np.maximum(-n, 0)  # the future all falls in bucket 0
  max_exact = num_buckets // 2
  log_ratio = np.log(np.maximum(n, max_exact).astype(np.float32) / np.float32(max_exact))
  log_ratio = log_ratio / np.float32(math.log(max_distance / max_exact))
  large = np.minimum(max_exact + (log_ratio * np.float32(num_buckets - max_exact)).astype(np.int32), num_buckets - 1)
  return (ret + np.where(n < max_exact, n, large)).astype(np.int32)


class Stack(nnx.Module):
  """Encoder or decoder: the relative position bias table, the layers and a final norm."""

  def __init__(self, config: T5Config, num_layers: int, *, causal: bool, cross_attention: bool, rngs: nnx.Rngs):
    self.config, self.causal = config, causal
    shape = (config.relative_attention_num_buckets, config.num_heads)
    self.relpos_bias = _param(rngs, config.d_model**-0.5, shape, ("relpos_buckets", "heads"))
    self.layers = nnx.List([Block(config, cross_attention=cross_attention, rngs=rngs) for _ in range(num_layers)])
    self.final_norm = RMSNorm(config)

  def position_bias(self, q_pos, k_pos):
    """float32 [1, H, Lq, Lk]; computed once per stack and shared by all layers.

    k_pos = arange(Lk); q_pos may be traced (decoding), so we look buckets up in a static table of all offsets.
    """
    num_keys = k_pos.shape[0]
    table = relative_position_bucket(
        np.arange(-num_keys + 1, num_keys),
        bidirectional=not self.causal,
        num_buckets=self.config.relative_attention_num_buckets,
        max_distance=self.config.relative_attention_max_distance)
    buckets = jnp.asarray(table)[k_pos[None, :] - q_pos[:, None] + num_keys - 1]
    return jnp.take(self.relpos_bias[...], buckets, axis=0).transpose(2, 0, 1)[None]

  def __call__(self, x, mask, bias, *, encoded=None, cross_mask=None, cache=None, index=None,
               deterministic=True, rngs=None):
    x = _dropout(x, self.config.dropout_rate, deterministic, rngs)
    new_cache = None
    if cache is None:
      x = self._whole_sequences(x, mask, bias, encoded, cross_mask, deterministic, rngs)
    else:  # decoding: each layer with its own cache
      new_cache = []
      for layer, layer_cache in zip(self.layers, cache):
        x, c = layer(x, mask, bias, encoded=encoded, cross_mask=cross_mask, cache=layer_cache, index=index,
                     deterministic=deterministic, rngs=rngs)
        new_cache.append(c)
    x = _dropout(self.final_norm(x), self.config.dropout_rate, deterministic, rngs)
    return x, new_cache

  def _whole_sequences(self, x, mask, bias, encoded, cross_mask, deterministic, rngs):
    """The layers over whole sequences, each under `config.remat`'s checkpoint policy; with
    `config.scan_layers`, as one layer scanned over their parameters stacked here (the model and its
    checkpoints keep one module per layer, so nothing else sees the stacked layout). The dropout
    stream is carried through the scan, so it draws the masks the unscanned loop draws.

    XLA:CPU drops jax.checkpoint's optimization barriers before its CSE pass, which then merges the
    recomputation of unscanned layers back into the forward pass: on CPU, remat saves memory only
    with scan_layers (benchmarks/RESULTS.md, "Activation memory")."""
    def run(layer, x, rngs):
      return layer(x, mask, bias, encoded=encoded, cross_mask=cross_mask, cache=None, index=None,
                   deterministic=deterministic, rngs=rngs)[0]
    policy = REMAT_POLICIES[self.config.remat]
    if policy is not None:  # (inside a scan, the loop already keeps XLA from merging the recomputation)
      run = nnx.remat(run, policy=policy, prevent_cse=not self.config.scan_layers)
    if not self.config.scan_layers:
      for layer in self.layers:
        x = run(layer, x, rngs)
      return x
    graphdef = nnx.graphdef(self.layers[0])
    stacked = nnx.merge(graphdef, jax.tree.map(lambda *xs: jnp.stack(xs), *map(nnx.state, self.layers)))

    @nnx.scan(in_axes=(0, nnx.Carry), out_axes=nnx.Carry)
    def scanned(layer, carry):
      x, rngs = carry
      return run(layer, x, rngs), rngs

    x, _ = scanned(stacked, (x, rngs))
    return x


def _segment_mask(q_segments, k_segments):
  """[B, 1, Lq, Lk]: same segment, and the key is not padding (segment 0)."""
  return ((q_segments[:, :, None] == k_segments[:, None, :]) & (k_segments[:, None, :] != 0))[:, None]


# --- the model ---------------------------------------------------------------------------------------------


class T5(nnx.Module):
  """T5 encoder-decoder, or (architecture="decoder_only") a single prefix-LM decoder stack.

  Params: `embedding` [vocab, embed], `lm_head` [embed, vocab] (untied only), `encoder.*`, `decoder.*`, e.g.
  `encoder.relpos_bias`, `encoder.layers.0.self_attention.query`, `decoder.layers.1.cross_attention.out`,
  `decoder.layers.1.mlp.wi_0`, `decoder.final_norm.scale`.
  """

  def __init__(self, config: T5Config, *, rngs: nnx.Rngs):
    self.config = config
    self.embedding = _param(rngs, 1.0, (config.vocab_size, config.d_model), ("vocab", "embed"))
    encoder_decoder = config.architecture == "encoder_decoder"
    if encoder_decoder:
      self.encoder = Stack(config, config.num_encoder_layers, causal=False, cross_attention=False, rngs=rngs)
    else:
      self.encoder = None
    self.decoder = Stack(config, config.num_decoder_layers, causal=True, cross_attention=encoder_decoder, rngs=rngs)
    # HF initialises an untied lm_head with std 1.0; we follow t5x (fan-in, d_model**-0.5) so that
    # initial logits are O(1) when training from scratch. Imported checkpoints overwrite it anyway.
    self.lm_head = None if config.tie_word_embeddings else _param(
        rngs, config.d_model**-0.5, (config.d_model, config.vocab_size), ("embed", "vocab"))
    peft.attach(self, config, rngs)  # adapters / LoRA, when the config asks for them (after all base params)

  @classmethod
  def from_params(cls, config: T5Config, params: dict) -> "T5":
    """A model holding `params`, a nested dict shaped like `nnx.to_pure_dict(nnx.state(model, nnx.Param))`."""
    graphdef, state = nnx.split(nnx.eval_shape(lambda: cls(config, rngs=nnx.Rngs(0))))
    expected = {path: v.shape for path, v in nnx.to_flat_state(state)}
    given = {path: v for path, v in nnx.to_flat_state(nnx.State(params))}
    for path in expected.keys() - given.keys():
      raise UserError(f"parameter {'.'.join(map(str, path))} is missing")
    for path in given.keys() - expected.keys():
      raise UserError(f"unexpected parameter {'.'.join(map(str, path))}")
    for path, shape in expected.items():
      if tuple(given[path].shape) != tuple(shape):
        raise UserError(f"parameter {'.'.join(map(str, path))} has shape {tuple(given[path].shape)}, "
                        f"expected {tuple(shape)}")
    nnx.replace_by_pure_dict(state, jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), params))
    return nnx.merge(graphdef, state)

  def _embed(self, tokens):
    return jnp.take(self.embedding[...], tokens, axis=0).astype(self.config.compute_dtype)

  def _logits(self, x):
    """float32 logits (accumulated in float32 whatever the compute dtype)."""
    if self.config.tie_word_embeddings:  # v1.0 rescales before the tied output projection
      w = self.embedding[...].T
      x = x * self.config.d_model**-0.5
    else:
      w = self.lm_head[...]
    return _dense(x, w.astype(x.dtype), out_dtype=jnp.float32)

  def encode(self, tokens, segment_ids=None, *, deterministic=True, rngs=None):
    """Encoder output [B, L, D] (compute dtype). segment_ids default to (tokens != 0)."""
    if segment_ids is None:
      segment_ids = (tokens != 0).astype(jnp.int32)
    pos = jnp.arange(tokens.shape[1])
    mask, bias = _segment_mask(segment_ids, segment_ids), self.encoder.position_bias(pos, pos)
    x, _ = self.encoder(self._embed(tokens), mask, bias, deterministic=deterministic, rngs=rngs)
    return x

  def decode(self, tokens, encoded=None, encoder_segment_ids=None, *, segment_ids=None, causal_attention=None,
             deterministic=True, rngs=None):
    """Teacher-forced decoder logits [B, L, vocab] float32.

    Encoder-decoder: `encoded` from `encode` and its `encoder_segment_ids` (for unpacked inputs,
    encoder_input_tokens != 0). Decoder-only: `causal_attention` [B, L] marks the fully visible prefix.
    """
    length = tokens.shape[1]
    pos = jnp.arange(length)
    segments = jnp.ones_like(tokens) if segment_ids is None else segment_ids
    visible = pos[None, None, :] <= pos[None, :, None]  # [1, Lq, Lk] causal
    if causal_attention is not None:
      prefix = causal_attention.astype(bool)
      visible = visible | (prefix[:, :, None] & prefix[:, None, :])
    mask = visible[:, None] & (segments[:, :, None] == segments[:, None, :])[:, None]
    if (encoded is None) != (self.encoder is None) or (encoded is not None and encoder_segment_ids is None):
      raise ValueError("decode() takes encoded and encoder_segment_ids for encoder-decoder models, neither otherwise")
    cross_mask = None if encoded is None else _segment_mask(segments, encoder_segment_ids)
    x, _ = self.decoder(self._embed(tokens), mask, self.decoder.position_bias(pos, pos), encoded=encoded,
                        cross_mask=cross_mask, deterministic=deterministic, rngs=rngs)
    return self._logits(x)

  def __call__(self, batch: dict, *, deterministic: bool = True, rngs: nnx.Rngs | None = None):
    """Logits [B, L, vocab] float32 for a seqio EncDec or PrefixLM feature-converter batch."""
    if self.encoder is None:
      return self.decode(batch["decoder_input_tokens"], segment_ids=batch.get("decoder_segment_ids"),
                         causal_attention=batch.get("decoder_causal_attention"),
                         deterministic=deterministic, rngs=rngs)
    enc_tokens = batch["encoder_input_tokens"]
    enc_segments = batch.get("encoder_segment_ids")
    if enc_segments is None:
      enc_segments = (enc_tokens != 0).astype(jnp.int32)
    encoded = self.encode(enc_tokens, enc_segments, deterministic=deterministic, rngs=rngs)
    return self.decode(batch["decoder_input_tokens"], encoded, enc_segments,
                       segment_ids=batch.get("decoder_segment_ids"), deterministic=deterministic, rngs=rngs)

  # --- incremental decoding (see t5mix/decode.py) ---

  def init_cache(self, batch_size: int, max_length: int, encoded=None, encoder_segment_ids=None) -> dict:
    """An empty decoding cache for `max_length` decoder positions: a pytree whose leaves all have batch dim 0.

    For encoder-decoder models pass `encoded` and `encoder_segment_ids`: the cross-attention keys and values
    are computed here once.
    """
    c = self.config
    zeros = jnp.zeros((batch_size, c.num_heads, max_length, c.d_kv), c.compute_dtype)  # heads-first
    layers = []
    for layer in self.decoder.layers:
      entry = {"k": zeros, "v": zeros}
      if layer.cross_attention is not None:
        ck, cv = layer.cross_attention.project_kv(encoded)
        entry["cross_k"], entry["cross_v"] = ck.transpose(0, 2, 1, 3), cv.transpose(0, 2, 1, 3)
      layers.append(entry)
    cache = {
        "index": jnp.zeros((batch_size,), jnp.int32),  # next position to write; equal across the batch
        "valid": jnp.zeros((batch_size, max_length), bool),  # written, non-padding positions
        "layers": layers,
    }
    if self.encoder is not None:
      cache["encoder_valid"] = encoder_segment_ids != 0
    return cache

  def decode_step(self, tokens, cache: dict, *, valid=None, prefix: bool = False):
    """Feeds tokens [B, T] at cache["index"]; returns (logits [B, T, vocab] float32, new cache).

    valid [B, T]: False marks padding (left padding of prompts). prefix=True makes the T tokens see each
    other fully (prefix-LM prompt); otherwise attention is causal.
    """
    batch, length = tokens.shape
    index = cache["index"][0]
    if valid is None:
      valid = jnp.ones((batch, length), bool)
    key_valid = jax.lax.dynamic_update_slice_in_dim(cache["valid"], valid.astype(bool), index, axis=1)
    q_pos = index + jnp.arange(length)
    k_pos = jnp.arange(key_valid.shape[1])
    visible = k_pos[None, :] <= q_pos[:, None]
    if prefix:
      visible = visible | (k_pos[None, :] < index + length)
    mask = visible[None, None] & key_valid[:, None, None, :]
    cross_mask = cache["encoder_valid"][:, None, None, :] if self.encoder is not None else None
    x, layers = self.decoder(self._embed(tokens), mask, self.decoder.position_bias(q_pos, k_pos),
                             cross_mask=cross_mask, cache=cache["layers"], index=index)
    new_cache = {**cache, "index": cache["index"] + length, "valid": key_valid, "layers": layers}
    return self._logits(x), new_cache


def with_dtype(model: T5, dtype: str) -> T5:
  """The model computing in `dtype` with every parameter cast to it. A bfloat16 copy for decoding reads
  half the weight bytes per step and runs bfloat16 matmuls: faster where those are native (GPUs,
  TPUs), no faster on a CPU without bfloat16 instructions; its greedy tokens differ slightly from
  float32's (benchmarks/RESULTS.md, "Decoding in bfloat16")."""
  if dtype == model.config.dtype and all(x.dtype == dtype for x in jax.tree.leaves(nnx.state(model))):
    return model
  graphdef = _graphdef(dataclasses.replace(model.config, dtype=dtype))
  return nnx.merge(graphdef, jax.tree.map(lambda x: x.astype(dtype), nnx.state(model)))


@functools.lru_cache(maxsize=8)
def _graphdef(config: T5Config):
  return nnx.graphdef(nnx.eval_shape(lambda: T5(config, rngs=nnx.Rngs(0))))


def merge_lora_model(model: T5) -> T5:
  """(model with LoRA) → an equivalent model without it (same object if it has none)."""
  config = model.config
  if not config.lora_rank:
    return model
  params = peft.merge_lora(nnx.to_pure_dict(nnx.state(model, nnx.Param)), config)
  return T5.from_params(dataclasses.replace(config, lora_rank=0), params)


def key_names(keypath) -> tuple[str, ...]:
  """A jax key path's names: ('encoder', 'layers', '0', 'mlp', 'wi_0', 'value')."""
  def name(k):
    for attr in ("key", "name", "idx"):  # DictKey / FlattenedIndexKey, GetAttrKey, SequenceKey
      if hasattr(k, attr):
        return str(getattr(k, attr))
    return str(k)
  return tuple(name(k) for k in keypath)


def param_path(keypath) -> str:
  """A jax key path → `encoder.layers.0.mlp.wi_0` (an nnx Variable's trailing `.value` dropped)."""
  keys = list(keypath)
  if keys and isinstance(keys[-1], jax.tree_util.GetAttrKey):
    keys = keys[:-1]
  return ".".join(key_names(keys))
