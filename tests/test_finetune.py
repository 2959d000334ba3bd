"""Fine-tuning strategies: freezing, gradual unfreezing, adapters, LoRA, adapter files, recipes."""

import dataclasses
import glob
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from flax import nnx

from t5mix import config as config_lib
from t5mix import adapters, checkpoints, definitions, finetune, optim, peft, train
from t5mix.errors import UserError
from t5mix.model import T5, T5Config, merge_lora_model, param_path

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["model=tiny", "data.mixture=demo_supervised", "data.batch_size=8", "data.inputs_length=64",
        "data.targets_length=16", "log_every=1", "optimizer.warmup_steps=0",
        "model_overrides={dropout_rate: 0.0}"]


@pytest.fixture(scope="module", autouse=True)
def builtin_definitions():
  definitions.load()


def tiny_config(**overrides):
  base = dict(vocab_size=96, d_model=32, d_kv=8, d_ff=64, num_heads=4, num_encoder_layers=3, num_decoder_layers=3,
              relative_attention_num_buckets=8, relative_attention_max_distance=16, dropout_rate=0.0)
  return T5Config(**{**base, **overrides})


def tiny_batch(seed=0, batch=2, length=7):
  rng = np.random.default_rng(seed)
  return {"encoder_input_tokens": jnp.asarray(rng.integers(1, 96, (batch, length)), jnp.int32),
          "decoder_input_tokens": jnp.asarray(rng.integers(1, 96, (batch, length - 2)), jnp.int32)}


def flat(params) -> dict[str, np.ndarray]:
  """Dotted path → array of an nnx.State (or a pure dict)."""
  return {param_path(path): np.asarray(x) for path, x in jax.tree_util.tree_flatten_with_path(params)[0]}


def checkpoint_params(workdir, step):
  """Dotted path → array of a checkpoint's params (saved from an nnx.State: each leaf under `value`)."""
  tree = ocp.StandardCheckpointer().restore(os.path.join(workdir, "checkpoints", str(step), "state"))["params"]
  out = {}
  for path, x in jax.tree_util.tree_flatten_with_path(tree)[0]:
    assert path[-1].key == "value"
    out[".".join(str(k.key) for k in path[:-1])] = np.asarray(x)
  return out


def run(workdir, *overrides, **kwargs):
  lines = []
  summary = train.train(config_lib.load(None, TINY + list(overrides)), str(workdir), log=lines.append, **kwargs)
  return summary, lines


@pytest.fixture(scope="module")
def base_workdir(tmp_path_factory):
  """A briefly trained tiny model: the base for fine-tuning."""
  workdir = tmp_path_factory.mktemp("base")
  run(workdir, "steps=3", "checkpoint_every=3")
  return workdir


# --- the plan: labels and stages -----------------------------------------------------------------------------


def test_gradual_unfreezing_schedule_is_top_down_in_both_stacks():
  c = config_lib.load(None, ["steps=30", "finetune.strategy=gradual_unfreezing", "finetune.steps_per_stage=10"])
  model = nnx.eval_shape(lambda: T5(tiny_config(num_encoder_layers=3, num_decoder_layers=2), rngs=nnx.Rngs(0)))
  plan = finetune.make_plan(c, nnx.state(model, nnx.Param))
  stage = plan.stage_of
  assert plan.num_stages == 3
  assert stage["encoder.layers.2.mlp.wi_0"] == 1 and stage["decoder.layers.1.cross_attention.out"] == 1
  assert stage["encoder.layers.1.self_attention.query"] == 2 and stage["decoder.layers.0.mlp_norm.scale"] == 2
  assert stage["encoder.layers.0.mlp.wo"] == 3 and stage["encoder.relpos_bias"] == 3
  assert stage["decoder.relpos_bias"] == 2  # with the decoder's block 0
  for always in ["embedding", "lm_head", "encoder.final_norm.scale", "decoder.final_norm.scale"]:
    assert stage[always] == 1
  assert [plan.stage_at(s) for s in (1, 10, 11, 20, 21, 30, 40)] == [1, 1, 2, 2, 3, 3, 3]
  assert plan.trainable_count(1) < plan.trainable_count(2) < plan.trainable_count(3) == sum(plan.sizes.values())
  # steps_per_stage 0: the run's steps split evenly.
  c = config_lib.load(None, ["steps=30", "finetune.strategy=gradual_unfreezing"])
  assert finetune.make_plan(c, nnx.state(model, nnx.Param)).stage_starts == (0, 10, 20)


@pytest.mark.parametrize("accum", [1, 2])
def test_gradual_unfreezing_stages_split_the_whole_run(accum):
  """steps_per_stage 0: every stage gets its share of the run (whole optimizer updates, at most
  one update apart) and the last one ends with it, whatever the remainder."""
  params = nnx.state(nnx.eval_shape(lambda: T5(tiny_config(num_encoder_layers=4, num_decoder_layers=4),
                                               rngs=nnx.Rngs(0))), nnx.Param)
  for steps in range(4 * accum, 30 * accum + 1, accum):
    c = config_lib.load(None, [f"steps={steps}", "finetune.strategy=gradual_unfreezing",
                               f"optimizer.grad_accum_steps={accum}"])
    plan = finetune.make_plan(c, params)
    stages = [plan.stage_at(s) for s in range(1, steps + 1)]
    assert stages == sorted(stages) and stages[-1] == 4, (steps, stages)
    lengths = [stages.count(s) for s in range(1, 5)]
    assert min(lengths) >= accum and max(lengths) - min(lengths) <= accum, (steps, lengths)
    assert all(plan.start_step(s) % accum == 0 for s in range(1, 5)), (steps, plan.stage_starts)
  c = config_lib.load(None, [f"steps={3 * accum}", "finetune.strategy=gradual_unfreezing",
                             f"optimizer.grad_accum_steps={accum}"])
  with pytest.raises(UserError, match=rf"'steps' \({3 * accum}\) is too few for gradual unfreezing: "
                                      rf"this model has 4 stages .* at least {4 * accum} steps"):
    finetune.make_plan(c, params)


def test_gradual_unfreezing_names_the_blocks_each_stage_trains_and_freezes():
  """The issue's run: 10 steps, 3 stages (said to be "3 stages of 3 steps", i.e. 9 of the 10)."""
  params = nnx.state(nnx.eval_shape(lambda: T5(tiny_config(), rngs=nnx.Rngs(0))), nnx.Param)
  plan = finetune.make_plan(config_lib.load(None, ["steps=10", "finetune.strategy=gradual_unfreezing"]), params)
  total = sum(plan.sizes.values())
  lines = plan.describe().splitlines()
  assert lines[0] == "fine-tuning: gradual unfreezing in 3 stages (one compiled train step each):"
  count = lambda stage: f"{plan.trainable_count(stage):,} of {total:,} parameters"  # noqa: E731
  assert lines[1:] == [
      f"  stage 1/3, steps 1-3: training encoder block 2, decoder block 2 + embedding, lm_head, final norms "
      f"({count(1)}, {100 * plan.trainable_count(1) / total:.2f}%); frozen: encoder blocks 0-1, decoder blocks 0-1 "
      "+ relative position biases",
      f"  stage 2/3, steps 4-6: training encoder blocks 1-2, decoder blocks 1-2 + embedding, lm_head, final norms "
      f"({count(2)}, {100 * plan.trainable_count(2) / total:.2f}%); frozen: encoder block 0, decoder block 0 "
      "+ relative position biases",
      f"  stage 3/3, steps 7-10: training everything ({total:,} parameters)"]
  # `trainable` leaves the encoder out of every stage; a steps_per_stage longer than the run
  plan = finetune.make_plan(config_lib.load(None, [
      "steps=10", "finetune.strategy=gradual_unfreezing", "finetune.steps_per_stage=4",
      "finetune.trainable=[decoder, embedding, lm_head]"]), params)
  assert plan.describe_stage(3).startswith("stage 3/3, steps 9-10: training decoder + embedding, lm_head (")
  assert plan.describe_stage(3).endswith("; frozen: encoder")
  plan = finetune.make_plan(config_lib.load(None, [
      "steps=6", "finetune.strategy=gradual_unfreezing", "finetune.steps_per_stage=4"]), params)
  assert plan.describe_stage(2).startswith("stage 2/3, steps 5-6: ")
  assert plan.describe_stage(3).startswith("stage 3/3, from step 9, after this run's 6 steps: ")


def test_trainable_globs_and_strategy_defaults():
  model = nnx.eval_shape(lambda: T5(tiny_config(adapter_size=4, lora_rank=2), rngs=nnx.Rngs(0)))
  params = nnx.state(model, nnx.Param)

  def trained(*overrides):
    plan = finetune.make_plan(config_lib.load(None, list(overrides)), params)
    return {p for p, s in plan.stage_of.items() if s is not None}

  assert trained("finetune.trainable=[decoder]") == {p for p in flat(params) if p.startswith("decoder.")}
  adapters = trained("finetune.strategy=adapters")
  assert adapters and all("_adapter." in p or "norm" in p for p in adapters)
  assert any(p.endswith("mlp_norm.scale") for p in adapters) and "decoder.final_norm.scale" in adapters
  lora = trained("finetune.strategy=lora")
  assert lora and all("_lora." in p for p in lora)
  with pytest.raises(UserError, match="'finetune.trainable': 'decoder.layer.*' matches no parameter"):
    trained("finetune.trainable=[decoder.layer.*]")


def test_config_errors():
  with pytest.raises(UserError, match="finetune.strategy"):
    config_lib.load(None, ["finetune.strategy=prefix_tuning"])
  with pytest.raises(UserError, match="finetune.adapter_size"):
    config_lib.load(None, ["finetune.strategy=adapters", "finetune.adapter_size=0"])
  with pytest.raises(UserError, match="finetune.lora_targets.*'qkv'"):
    config_lib.load(None, ["finetune.strategy=lora", "finetune.lora_targets=[qkv]"])
  with pytest.raises(UserError, match="unknown config key 'finetune.lora_rnak'"):
    config_lib.load(None, ["finetune.lora_rnak=4"])
  with pytest.raises(UserError, match="multiple of optimizer.grad_accum_steps"):
    config_lib.load(None, ["finetune.strategy=gradual_unfreezing", "finetune.steps_per_stage=3",
                           "optimizer.grad_accum_steps=2"])
  with pytest.raises(UserError, match="lora_targets.*'wi'.*gated"):
    tiny_config(lora_rank=2, lora_targets="wi")


# --- the optimizer: frozen means bit-identical, and no state ------------------------------------------------


OPTIMIZERS = {
    "adafactor+decay": ["optimizer.name=adafactor", "optimizer.weight_decay=0.1"],
    "adamw+decay": ["optimizer.name=adamw", "optimizer.weight_decay=0.1", "optimizer.learning_rate=1e-3"],
    "adamw+accum": ["optimizer.name=adamw", "optimizer.weight_decay=0.1", "optimizer.grad_accum_steps=2"],
}


@pytest.mark.parametrize("optimizer", OPTIMIZERS)
def test_gradual_unfreezing_frozen_params_bit_identical_until_their_stage(optimizer):
  accum = 2 if "accum" in optimizer else 1
  c = config_lib.load(None, ["steps=12", "finetune.strategy=gradual_unfreezing", f"finetune.steps_per_stage={4 * accum}",
                             "optimizer.clip_norm=0.5", "optimizer.warmup_steps=0", *OPTIMIZERS[optimizer],
                             f"steps={12 * accum}"])
  params = nnx.state(T5(tiny_config(), rngs=nnx.Rngs(0)), nnx.Param)
  plan = finetune.make_plan(c, params)
  assert plan.num_stages == 3
  opt = optim.make_optimizer(c, plan)

  @jax.jit
  def step(params, opt_state, key):
    grads = jax.tree.map(lambda p: jax.random.normal(key, p.shape), params)  # every param gets a gradient
    updates, opt_state = opt.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state

  initial = flat(params)
  opt_state = opt.init(params)
  previous = initial
  for s in range(1, 12 * accum + 1):
    params, opt_state = step(params, opt_state, jax.random.key(s))
    now, stage = flat(params), plan.stage_at(s)
    for name, value in now.items():
      if plan.stage_of[name] > stage:  # still frozen: not moved by decay, clipping or anything
        assert np.array_equal(value, initial[name]), (s, name)
      elif s % accum == 0:  # trains (with accumulation, only on the k-th micro-step)
        assert not np.array_equal(value, previous[name]), (s, name)
    previous = now
  assert step._cache_size() == 1  # the optimizer handles stage changes without recompiling


def test_frozen_params_get_no_optimizer_state():
  params = nnx.state(T5(tiny_config(), rngs=nnx.Rngs(0)), nnx.Param)
  c = config_lib.load(None, ["optimizer.name=adamw", "finetune.trainable=[decoder.layers.2]"])
  plan = finetune.make_plan(c, params)
  state = optim.make_optimizer(c, plan).init(params)
  state_size = sum(x.size for x in jax.tree.leaves(state))
  assert state_size <= 2 * plan.trainable_count() + 8  # Adam's two moments of the trainable params + counts
  assert plan.trainable_count() < sum(plan.sizes.values()) / 4
  # The full strategy keeps optim.base_optimizer's exact state structure (old checkpoints resume).
  adamw = config_lib.load(None, ["optimizer.name=adamw"])
  full = optim.make_optimizer(adamw, finetune.make_plan(adamw, params))
  reference = optim.base_optimizer(config_lib.load(None, ["optimizer.name=adamw"]).optimizer, 400)
  assert jax.tree.structure(full.init(params)) == jax.tree.structure(reference.init(params))


# --- adapters and LoRA in the model ---------------------------------------------------------------------------


@pytest.mark.parametrize("peft_config", [dict(adapter_size=8), dict(adapter_size=8, adapter_after_attention=True),
                                         dict(lora_rank=4, lora_targets="all"),
                                         dict(adapter_size=4, lora_rank=2, architecture="decoder_only")])
def test_fresh_adapters_and_lora_leave_outputs_unchanged(peft_config):
  arch = dict(architecture=peft_config.pop("architecture", "encoder_decoder"))
  base = T5(tiny_config(**arch), rngs=nnx.Rngs(0))
  adapted = T5(tiny_config(**arch, **peft_config), rngs=nnx.Rngs(0))
  base_params, adapted_params = flat(nnx.state(base, nnx.Param)), flat(nnx.state(adapted, nnx.Param))
  new = adapted_params.keys() - base_params.keys()
  assert new and all(peft.is_peft_path(p) for p in new)
  for name, value in base_params.items():  # same seed → same base initialisation
    np.testing.assert_array_equal(value, adapted_params[name])
  batch = tiny_batch()
  if arch["architecture"] == "decoder_only":
    batch = {"decoder_input_tokens": batch["decoder_input_tokens"]}
  np.testing.assert_array_equal(np.asarray(base(batch)), np.asarray(adapted(batch)))


def test_lora_merge_gives_the_same_logits():
  config = tiny_config(lora_rank=4, lora_alpha=16.0, lora_targets="attention,mlp")
  model = T5(config, rngs=nnx.Rngs(0))
  state = nnx.state(model, nnx.Param)
  key = iter(jax.random.split(jax.random.key(1), 1000))
  state = jax.tree_util.tree_map_with_path(  # trained-looking LoRA: B no longer zero
      lambda p, x: x + 0.05 * jax.random.normal(next(key), x.shape) if "_lora" in param_path(p) else x, state)
  nnx.update(model, state)
  batch = tiny_batch()
  logits = np.asarray(model(batch))
  merged_params = peft.merge_lora(nnx.to_pure_dict(nnx.state(model, nnx.Param)), config)
  merged = T5.from_params(dataclasses.replace(config, lora_rank=0), merged_params)
  assert not any("_lora" in p for p in flat(nnx.state(merged, nnx.Param)))
  np.testing.assert_allclose(np.asarray(merged(batch)), logits, atol=1e-5)
  assert np.abs(logits - np.asarray(T5(tiny_config(), rngs=nnx.Rngs(0))(batch))).max() > 1e-3  # LoRA mattered
  np.testing.assert_allclose(np.asarray(merge_lora_model(model)(batch)), logits, atol=1e-5)


# --- end to end: training, adapter files, merging, resume --------------------------------------------------


def test_adapters_train_only_adapters_and_norms(base_workdir, tmp_path):
  workdir = tmp_path / "adapters"
  _, lines = run(workdir, "steps=3", "checkpoint_every=1", "finetune.strategy=adapters",
                 "finetune.adapter_size=8", "finetune.adapter_after_attention=true", init_from=str(base_workdir))
  assert any("adapter/LoRA parameter arrays are not in" in line for line in lines)
  assert any(line.startswith("fine-tuning (adapters): training") for line in lines)
  base = checkpoint_params(base_workdir, 3)
  for step in (1, 3):
    tuned = checkpoint_params(workdir, step)
    changed = {p for p in base if not np.array_equal(base[p], tuned[p])}
    assert changed and all("norm" in p for p in changed), changed
  changed_adapters = {p for p in tuned if "_adapter." in p and p.endswith(".up") and np.abs(tuned[p]).max() > 0}
  assert len(changed_adapters) == 2 * 2 + 2 * 3  # tiny: 2+2 blocks; after FFN and each attention
  # The adapter file holds exactly the trained params and merges with the base into the same model.
  from safetensors.numpy import load_file
  saved = load_file(str(workdir / adapters.ADAPTERS_FILE))
  assert set(saved) == {p for p in tuned if "_adapter." in p or "norm" in p}
  merged = tmp_path / "merged"
  adapters.merge_adapters(str(base_workdir), str(workdir / adapters.ADAPTERS_FILE), str(merged))
  assert_same_logits(workdir, merged)


def assert_same_logits(workdir_a, workdir_b, atol=1e-5):
  batch = tiny_batch()
  logits = []
  for w in (workdir_a, workdir_b):
    _, model = checkpoints.load_workdir_params(str(w))
    batch = {k: v % model.config.vocab_size for k, v in batch.items()}
    logits.append(np.asarray(model(batch)))
  np.testing.assert_allclose(logits[0], logits[1], atol=atol)


def test_lora_run_freezes_base_and_merges_for_export(base_workdir, tmp_path):
  workdir = tmp_path / "lora"
  run(workdir, "steps=2", "checkpoint_every=2", "finetune.strategy=lora", "finetune.lora_rank=4",
      "finetune.lora_targets=[query,value,wo]", "optimizer.learning_rate=0.05", init_from=str(base_workdir))
  base, tuned = checkpoint_params(base_workdir, 3), checkpoint_params(workdir, 2)
  assert all(np.array_equal(base[p], tuned[p]) for p in base)
  assert any(p.endswith("_lora.b") and np.abs(v).max() > 0 for p, v in tuned.items())
  # export → merge (LoRA folded) = the fine-tuned model; export-hf folds LoRA too.
  out = tmp_path / "lora.safetensors"
  count, _ = adapters.export_adapters(str(workdir), str(out))
  assert count == sum("_lora." in p for p in tuned)
  merged = tmp_path / "merged"
  adapters.merge_adapters(str(base_workdir), str(out), str(merged))
  assert "lora_rank: 0" in (merged / "model.yaml").read_text()
  assert_same_logits(workdir, merged)
  from t5mix import convert
  convert.export_hf(str(workdir), str(tmp_path / "hf"))
  assert (tmp_path / "hf" / "model.safetensors").exists()
  # A file that does not fit the base (another model size): one clear error.
  from safetensors.numpy import load_file, save_file
  from safetensors import safe_open
  tensors = load_file(str(out))
  with safe_open(str(out), framework="numpy") as f:
    metadata = f.metadata()
  tensors["encoder.layers.9.self_attention.query_lora.a"] = tensors.pop(next(iter(tensors)))
  save_file(tensors, str(tmp_path / "bad.safetensors"), metadata=metadata)
  with pytest.raises(UserError, match="not a parameter of the base model"):
    adapters.merge_adapters(str(base_workdir), str(tmp_path / "bad.safetensors"), str(tmp_path / "bad"))


@pytest.mark.slow
@pytest.mark.parametrize("strategy", [["finetune.strategy=gradual_unfreezing", "finetune.steps_per_stage=2"],
                                      ["finetune.strategy=lora", "finetune.lora_targets=[attention]"],
                                      ["finetune.strategy=adapters", "finetune.adapter_size=8"]],
                         ids=["gradual_unfreezing", "lora", "adapters"])
def test_resume_equals_uninterrupted_and_evaluates(base_workdir, tmp_path, strategy):
  args = ["steps=6", "checkpoint_every=3", *strategy]
  full = tmp_path / "full"
  summary, lines = run(full, *args, init_from=str(base_workdir))
  if "gradual" in strategy[0]:
    stages = [line.rsplit("stage ", 1)[1] for line in lines if line.startswith("step")]
    assert stages == ["1/2", "1/2", "2/2", "2/2", "2/2", "2/2"]
    import tensorflow as tf
    logged = {}
    for path in glob.glob(str(full / "tensorboard" / "events.*")):
      for event in tf.compat.v1.train.summary_iterator(path):
        for value in event.summary.value:
          if value.tag == "finetune/stage":
            logged[event.step] = int(tf.make_ndarray(value.tensor))
    assert logged == {1: 1, 2: 1, 3: 2, 4: 2, 5: 2, 6: 2}
    # Stage 1's compiled step cuts stage 2's blocks from the backward pass; stage 2's step must
    # train them: by step 6 every parameter has moved from the base.
    base, end = checkpoint_params(base_workdir, 3), checkpoint_params(full, 6)
    assert [n for n in base if np.array_equal(base[n], end[n])] == []
  interrupted = tmp_path / "interrupted"
  shutil.copytree(full, interrupted)
  shutil.rmtree(interrupted / "checkpoints" / "6")
  run(interrupted, *args, init_from=str(base_workdir))
  a, b = checkpoint_params(full, 6), checkpoint_params(interrupted, 6)
  assert a.keys() == b.keys()
  for name in a:
    np.testing.assert_allclose(a[name], b[name], rtol=0, atol=1e-6, err_msg=name)
  evaluate = pytest.importorskip("t5mix.evaluate")
  if hasattr(evaluate, "run_eval"):
    results = evaluate.run_eval(str(full), evaluate.EvalOptions(max_examples=8, batch_size=8),
                                log=lambda *a: None)
    assert os.path.exists(full / "eval" / "results.json") and results
  else:  # at least restore + forward
    assert_same_logits(full, full)


# --- recipes -------------------------------------------------------------------------------------------------


RECIPES = ["finetune_full", "finetune_gradual_unfreezing", "finetune_adapters", "finetune_lora",
           "multitask_then_finetune"]


def test_recipes_load_and_name_their_commands():
  for name in ["pretrain_span_corruption"] + RECIPES:
    path = os.path.join(ROOT, "configs", f"{name}.yaml")
    text = open(path).read()
    assert text.startswith("#") and "t5mix train" in text, name
    config_lib.load(path)


@pytest.mark.slow
def test_recipes_run_end_to_end_from_the_cli(tmp_path, cli):
  # In-process (`t5mix.cli.main`): the same commands as the console script, without paying a
  # TensorFlow + JAX start-up per command (tests/test_cli.py covers the console script itself).
  small = ["--set", "model=tiny", "--set", "data.batch_size=4", "--set", "data.inputs_length=64",
           "--set", "data.targets_length=16", "--set", "log_every=2", "--set", "checkpoint_every=4"]

  def run(*argv):
    rc, out, err = cli(*argv)
    assert rc == 0, out + err
    return out

  pretrain = tmp_path / "pretrain"
  run("train", "--config", os.path.join(ROOT, "configs", "pretrain_span_corruption.yaml"), "--workdir", pretrain, "--set", "steps=4", *small)
  for name in RECIPES:
    extra = ["--set", "finetune.steps_per_stage=2"] if "gradual" in name else []
    out = run("train", "--config", os.path.join(ROOT, "configs", f"{name}.yaml"), "--workdir", tmp_path / name, "--init-from", pretrain,
              "--set", "steps=4", *small, *extra)
    assert "done: step 4" in out, out
  assert (tmp_path / "finetune_adapters" / "adapters.safetensors").exists()
  assert (tmp_path / "finetune_lora" / "adapters.safetensors").exists()
  out = run("adapters", "merge", "--base", pretrain, "--adapters", tmp_path / "finetune_lora" / "adapters.safetensors",
            "--out", tmp_path / "merged")
  assert "wrote" in out
  assert glob.glob(str(tmp_path / "merged" / "checkpoints" / "0"))


@pytest.mark.parametrize("strategy", ["adapters", "lora", "gradual_unfreezing"])
def test_frozen_parameters_get_no_gradient_computation(strategy):
  """Parameters that do not train (never: adapters/LoRA's base; not yet: gradual unfreezing's stage 1)
  are stop_gradient'ed in the step: the same update, fewer FLOPs."""
  c = config_lib.load(None, TINY + [f"finetune.strategy={strategy}"])
  model_config = finetune.apply_to_model_config(c.finetune, tiny_config(vocab_size=128, d_model=64, d_ff=256))
  graphdef, params = nnx.split(T5(model_config, rngs=nnx.Rngs(0)), nnx.Param)
  plan = finetune.make_plan(c, params)
  optimizer = optim.make_optimizer(c, plan)
  state = train.TrainState(jnp.zeros((), jnp.int32), params, optimizer.init(params))
  rng = np.random.default_rng(0)
  tokens = lambda n: jnp.asarray(rng.integers(2, 128, (4, n)), jnp.int32)  # noqa: E731
  batch = {"encoder_input_tokens": tokens(32), "decoder_input_tokens": tokens(8),
           "decoder_target_tokens": tokens(8), "decoder_loss_weights": jnp.ones((4, 8)),
           "task_ids": jnp.ones((4, 8), jnp.int32)}
  key = jax.random.key(0)
  results, flops = [], []
  for frozen in (None, plan.frozen_in(params, 1)):
    step = jax.jit(train.make_train_step(graphdef, optimizer, c, 1, frozen))
    cost = step.lower(state, batch, key).compile().cost_analysis()
    flops.append((cost[0] if isinstance(cost, list) else cost)["flops"])
    results.append(step(state, batch, key)[0].params)
  for a, b in zip(jax.tree.leaves(results[0]), jax.tree.leaves(results[1])):
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
  assert flops[1] < 0.85 * flops[0], flops
