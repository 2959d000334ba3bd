"""Parameter-efficient fine-tuning layers for the T5 of t5mix/model.py: adapters and LoRA.

Both are switched on by T5Config fields and created only when asked for, so a model without them
(and its checkpoints, and the HuggingFace import/export) is exactly what it was:

- `adapter_size > 0` — an adapter (Houlsby et al. 2019; T5 paper §3.5.2) after the feed-forward
  network of every encoder and decoder block, and with `adapter_after_attention` also after every
  attention (self- and cross-): `y + up(relu(down(y)))` applied to the sublayer's output `y` before
  it joins the residual stream. `up` starts at zero, so a fresh adapter is the identity and the
  model's outputs are unchanged until it trains. Params: `encoder.layers.0.mlp_adapter.down`
  [embed, adapter], `.up` [adapter, embed], `decoder.layers.1.self_attention_adapter.*`,
  `decoder.layers.1.cross_attention_adapter.*`.
- `lora_rank > 0` — LoRA (Hu et al. 2021) on the projections named by `lora_targets` (default
  `query,value`; `attention` = query,key,value,out; `mlp` = all feed-forward matrices; `all`):
  W + (alpha / rank) · A B with A [*in, rank] random and B [rank, *out] zero, so again nothing
  changes at step 0. Params: `encoder.layers.0.self_attention.query_lora.a` / `.b`,
  `decoder.layers.0.mlp.wi_0_lora.a` / `.b`. `merge_lora` folds them into the weights.

The adapted weight is computed as W + scale·AB inside the forward pass (one [in, out] product per
weight, negligible next to the activations), so LoRA applies everywhere the weight is used
(training, `project_kv` for the decoding cache, cross-attention keys) and the merged model is the
same computation.

The PEFT parameters are created by `attach` at the end of `T5.__init__`, after every base
parameter, so a model with adapters or LoRA draws exactly the same base initialisation as one
without for the same seed.
"""

from __future__ import annotations

import fnmatch
import math

import jax
import jax.numpy as jnp
from flax import nnx

ATTENTION_TARGETS = ("query", "key", "value", "out")
MLP_TARGETS = ("wi", "wi_0", "wi_1", "wo")
SHORTHANDS = {"attention": ATTENTION_TARGETS, "mlp": MLP_TARGETS, "all": ATTENTION_TARGETS + MLP_TARGETS}
# Names of PEFT modules in parameter paths: `fnmatch` patterns that select exactly the PEFT params.
ADAPTER_PATTERN = "*_adapter.*"
LORA_PATTERN = "*_lora.*"


def is_peft_path(path: str) -> bool:
  """Whether a dotted parameter path (`encoder.layers.0.mlp_adapter.wi`) is an adapter's or LoRA's."""
  return any(fnmatch.fnmatchcase(path, p) for p in (ADAPTER_PATTERN, LORA_PATTERN))


def lora_targets(spec: str, gated: bool) -> tuple[str, ...]:
  """`"query,value"` → ("query", "value"); shorthands expanded; MLP names filtered to the model's.

  Raises ValueError naming an unknown target.
  """
  model_mlp = ("wi_0", "wi_1", "wo") if gated else ("wi", "wo")
  names = []
  for item in (s.strip() for s in spec.split(",")):
    if not item:
      continue
    if item in SHORTHANDS:
      candidates = [n for n in SHORTHANDS[item] if n in ATTENTION_TARGETS or n in model_mlp]
    elif item in ATTENTION_TARGETS or item in model_mlp:
      candidates = [item]
    elif item in MLP_TARGETS:
      raise ValueError(f"LoRA target {item!r} does not exist in a {'gated-gelu' if gated else 'relu'} "
                       f"model (its MLP has {', '.join(model_mlp)})")
    else:
      raise ValueError(f"unknown LoRA target {item!r} (known: {', '.join(ATTENTION_TARGETS + MLP_TARGETS)}, "
                       f"or {', '.join(SHORTHANDS)})")
    names += [n for n in candidates if n not in names]
  if not names:
    raise ValueError("lora_targets names no projection")
  return tuple(names)


class Adapter(nnx.Module):
  """Bottleneck dense-ReLU-dense with a residual connection; identity at initialisation."""

  def __init__(self, d_model: int, size: int, dtype, *, key):
    self.dtype = dtype
    self.down = nnx.Param(d_model**-0.5 * jax.random.normal(key, (d_model, size), jnp.float32),
                          out_sharding=("embed", None), eager_sharding=False)
    self.up = nnx.Param(jnp.zeros((size, d_model), jnp.float32), out_sharding=(None, "embed"),
                        eager_sharding=False)

  def __call__(self, y):
    h = jax.nn.relu(jnp.einsum("bld,da->bla", y, self.down[...].astype(self.dtype)))
    return y + jnp.einsum("bla,ad->bld", h, self.up[...].astype(self.dtype)).astype(y.dtype)


class LoRA(nnx.Module):
  """A low-rank update scale · A B of a weight shaped [*in_shape, *out_shape]; zero at initialisation."""

  def __init__(self, weight: nnx.Param, num_in: int, rank: int, alpha: float, *, key):
    shape = weight.shape
    axes = weight.get_metadata().get("out_sharding") or (None,) * len(shape)
    self.num_in, self.scale = num_in, alpha / rank
    fan_in = math.prod(shape[:num_in])
    self.a = nnx.Param(fan_in**-0.5 * jax.random.normal(key, (*shape[:num_in], rank), jnp.float32),
                       out_sharding=(*axes[:num_in], None), eager_sharding=False)
    self.b = nnx.Param(jnp.zeros((rank, *shape[num_in:]), jnp.float32),
                       out_sharding=(None, *axes[num_in:]), eager_sharding=False)

  def delta(self):
    return lora_delta(self.a[...], self.b[...], self.num_in, self.scale)


def lora_delta(a, b, num_in: int, scale: float):
  """scale · A B reshaped to the weight's shape (float32)."""
  in_shape, out_shape = a.shape[:num_in], b.shape[1:]
  ab = a.reshape(-1, a.shape[-1]) @ b.reshape(b.shape[0], -1)
  return (scale * ab).reshape(*in_shape, *out_shape)


# Number of leading "input" axes of each adaptable weight.
_NUM_IN = {"query": 1, "key": 1, "value": 1, "out": 2, "wi": 1, "wi_0": 1, "wi_1": 1, "wo": 1}


def weight(module, name: str, dtype):
  """The weight `name` of an Attention or MLP module, with its LoRA update if it has one."""
  w = getattr(module, name)[...]
  lora = getattr(module, f"{name}_lora", None)
  if lora is not None:
    w = w + lora.delta()
  return w.astype(dtype)


def adapt(block, name: str, y):
  """y through the block's adapter `name` (e.g. "mlp_adapter") if it has one."""
  adapter = getattr(block, name, None)
  return y if adapter is None else adapter(y)


def attach(model, config, rngs: nnx.Rngs) -> None:
  """Adds the adapters and LoRA modules that `config` asks for to a freshly built T5 (in place).

  Keys come from one `rngs.params()` draw folded with a counter, so the base parameters (drawn
  before) are the same with or without PEFT.
  """
  if not config.adapter_size and not config.lora_rank:
    return
  base_key = rngs.params()
  counter = iter(range(1 << 30))
  next_key = lambda: jax.random.fold_in(base_key, next(counter))  # noqa: E731
  targets = lora_targets(config.lora_targets, config.feed_forward_proj == "gated-gelu") if config.lora_rank else ()
  for stack in (model.encoder, model.decoder):
    if stack is None:
      continue
    for block in stack.layers:
      attentions = ["self_attention"] + (["cross_attention"] if block.cross_attention is not None else [])
      if config.adapter_size:
        if config.adapter_after_attention:
          for name in attentions:
            setattr(block, f"{name}_adapter",
                    Adapter(config.d_model, config.adapter_size, config.compute_dtype, key=next_key()))
        block.mlp_adapter = Adapter(config.d_model, config.adapter_size, config.compute_dtype, key=next_key())
      for module in [getattr(block, n) for n in attentions] + [block.mlp]:
        for target in targets:
          param = getattr(module, target, None)
          if isinstance(param, nnx.Param):
            setattr(module, f"{target}_lora",
                    LoRA(param, _NUM_IN[target], config.lora_rank, config.lora_alpha, key=next_key()))


# --- merging -------------------------------------------------------------------------------------------------


def merge_lora(params: dict, config) -> dict:
  """Params (a nested pure dict, as `nnx.to_pure_dict(nnx.state(model, nnx.Param))`) with every LoRA
  update folded into its weight and the LoRA params removed: the params of
  `dataclasses.replace(config, lora_rank=0)`, giving the same outputs.
  """
  scale = config.lora_alpha / config.lora_rank if config.lora_rank else 1.0

  def merge(tree):
    if not isinstance(tree, dict):
      return tree
    out = {k: merge(v) for k, v in tree.items() if not (isinstance(k, str) and k.endswith("_lora"))}
    for k, v in tree.items():
      if isinstance(k, str) and k.endswith("_lora"):
        name = k[: -len("_lora")]
        w = jnp.asarray(out[name], jnp.float32)
        out[name] = w + lora_delta(jnp.asarray(v["a"], jnp.float32), jnp.asarray(v["b"], jnp.float32),
                                   _NUM_IN[name], scale)
    return out

  return merge(params)
