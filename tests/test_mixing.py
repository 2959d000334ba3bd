"""Mixing rates against T5's formula, sampled proportions against theory, determinism, resume."""

import collections
import itertools

import numpy as np
import pytest
import scipy.stats
import seqio
import tensorflow as tf

import t5mix
from t5mix import input_pipeline, mixing
from t5mix.errors import UserError

SIZES = {"tiny": 60, "small": 600, "medium": 3000, "large": 12000}  # two+ orders of magnitude
LENGTHS = {"inputs": 16, "targets": 8}
_counter = itertools.count()


def _unique(prefix):
  return f"{prefix}_{next(_counter)}"


@pytest.fixture(scope="module")
def tasks(tmp_path_factory):
  """Classification tasks of the sizes above, over TSV files; name → task name."""
  root = tmp_path_factory.mktemp("mixing")
  names = {}
  for key, n in SIZES.items():
    path = root / f"{key}.tsv"
    path.write_text("text\tlabel\n" + "".join(f"{key} {i}\t{i % 2}\n" for i in range(n)))
    names[key] = _unique(f"mix_{key}")
    t5mix.add_task(names[key], kind="classification", format="tsv",
                   splits={"train": str(path), "validation": str(path)},
                   label_words=["no", "yes"], vocabulary="byte")
  empty = root / "empty.tsv"
  empty.write_text("text\tlabel\n")
  names["empty"] = _unique("mix_empty")
  t5mix.add_task(names["empty"], kind="classification", format="tsv",
                 splits={"train": str(empty)}, label_words=["no", "yes"], vocabulary="byte")
  return names


def _mixture(tasks_, **kwargs):
  spec = t5mix.MixtureSpec.from_dict({"name": _unique("mixture"), "tasks": tasks_, **kwargs},
                                     origin="test")
  return t5mix.add_mixture(spec)


def _theory(sizes, temperature=1.0, maximum=None):
  r = np.array([min(n, maximum) if maximum else n for n in sizes], float) ** (1.0 / temperature)
  return r / r.sum()


def _sample_counts(name, n, seed=0):
  """Task name → how many of the first n sampled examples came from it."""
  ds = input_pipeline.get_dataset(name, "train", LENGTHS, seed=seed, pack=False)
  ids = ds.take(n).map(lambda ex: ex["task_ids"][0]).batch(4096)
  counts = collections.Counter()
  for batch in ids.as_numpy_iterator():
    counts.update(batch.tolist())
  names = [t.name for t in input_pipeline.leaf_tasks(name)]
  return collections.Counter({names[i - 1]: c for i, c in counts.items()})


@pytest.mark.parametrize("temperature", [1.0, 2.0, 8.0])
def test_sampled_shares_match_theory(tasks, temperature):
  keys = ["tiny", "small", "medium", "large"]
  maximum = 6000  # the cap K, below the largest task
  rate = "proportional" if temperature == 1.0 else "temperature"
  extra = {"temperature": temperature} if temperature != 1.0 else {}
  mixture = _mixture([tasks[k] for k in keys], rate=rate, maximum=maximum, **extra)
  expected = _theory([SIZES[k] for k in keys], temperature, maximum)
  # The table agrees with the formula ...
  table = {row.task: row for row in mixing.rate_table(mixture)}
  np.testing.assert_allclose([table[tasks[k]].rate for k in keys], expected, rtol=1e-9)
  assert [table[tasks[k]].capped for k in keys] == [min(SIZES[k], maximum) for k in keys]
  # ... and so does sampling: each share within ±1 point, chi-square not rejected at p=0.001.
  n = 20_000
  counts = _sample_counts(mixture.name, n)
  observed = np.array([counts[tasks[k]] for k in keys])
  assert observed.sum() == n
  np.testing.assert_array_less(np.abs(observed / n - expected), 0.01)
  assert scipy.stats.chisquare(observed, n * expected).pvalue > 0.001


def test_equal_and_explicit_rates(tasks):
  equal = _mixture([tasks["tiny"], tasks["large"]], rate="equal")
  assert [r.rate for r in mixing.rate_table(equal)] == [0.5, 0.5]
  explicit = _mixture([{"name": tasks["tiny"], "rate": 3}, {"name": tasks["large"], "rate": 1}],
                      rate="explicit")
  assert mixing.leaf_rates(explicit) == {tasks["tiny"]: 0.75, tasks["large"]: 0.25}
  counts = _sample_counts(explicit.name, 4000)
  assert abs(counts[tasks["tiny"]] / 4000 - 0.75) < 0.03


def test_nested_mixture_effective_rates(tasks):
  inner = _mixture([tasks["tiny"], tasks["small"]], rate="proportional")  # 60 : 600
  outer = _mixture([{"name": inner.name, "rate": 1.0}, {"name": tasks["large"], "rate": 3.0}],
                   rate="explicit")
  rates = mixing.leaf_rates(outer)
  assert rates[tasks["tiny"]] == pytest.approx(0.25 * 60 / 660)
  assert rates[tasks["small"]] == pytest.approx(0.25 * 600 / 660)
  assert rates[tasks["large"]] == pytest.approx(0.75)
  # A sub-mixture under a size-based rate enters with its total size (660).
  sized = _mixture([inner.name, tasks["medium"]], rate="temperature", temperature=2.0)
  rates = mixing.leaf_rates(sized)
  share_inner = 660 ** 0.5 / (660 ** 0.5 + 3000 ** 0.5)
  assert rates[tasks["tiny"]] + rates[tasks["small"]] == pytest.approx(share_inner)
  assert rates[tasks["tiny"]] / rates[tasks["small"]] == pytest.approx(0.1)
  counts = _sample_counts(sized.name, 4000)
  assert abs((counts[tasks["tiny"]] + counts[tasks["small"]]) / 4000 - share_inner) < 0.03


def test_empty_task_is_a_clear_error(tasks):
  mixture = _mixture([tasks["small"], tasks["empty"]], rate="proportional")
  with pytest.raises(UserError, match=r"has 0 examples"):
    mixing.rate_table(mixture)


def test_bad_mixture_specs(tasks):
  with pytest.raises(UserError, match="unknown key 'temprature'.*did you mean 'temperature'"):
    t5mix.MixtureSpec.from_dict({"name": "x", "tasks": [tasks["tiny"]], "temprature": 2}, "f.yaml")
  with pytest.raises(UserError, match="explicit needs a rate"):
    t5mix.MixtureSpec.from_dict({"name": "x", "tasks": [tasks["tiny"]], "rate": "explicit"}, "f")
  with pytest.raises(UserError, match="listed twice"):
    t5mix.MixtureSpec.from_dict({"name": "x", "tasks": [tasks["tiny"], tasks["tiny"]]}, "f")
  with pytest.raises(UserError, match="unknown task or mixture 'no_such_task'"):
    _mixture(["no_such_task"])
  specs = {"a": t5mix.MixtureSpec.from_dict({"name": "a", "tasks": ["b"]}, "f.yaml"),
           "b": t5mix.MixtureSpec.from_dict({"name": "b", "tasks": ["a"]}, "f.yaml")}
  with pytest.raises(UserError, match="mixture cycle: a -> b -> a"):
    mixing.check_no_cycles(specs)


def _first_inputs(name, n, seed, shard_info=None):
  ds = input_pipeline.get_dataset(name, "train", LENGTHS, seed=seed, pack=False,
                                  shard_info=shard_info)
  return [tuple(ex["encoder_input_tokens"]) for ex in ds.take(n).as_numpy_iterator()]


def test_sampling_is_deterministic_for_a_seed(tasks):
  mixture = _mixture([tasks["tiny"], tasks["small"], tasks["medium"]], rate="temperature",
                     temperature=2.0)
  first = _first_inputs(mixture.name, 100, seed=1)
  assert first == _first_inputs(mixture.name, 100, seed=1)
  assert first != _first_inputs(mixture.name, 100, seed=2)


def test_host_shards_do_not_overlap(tasks):
  def seen(index):
    ds = input_pipeline.get_dataset(tasks["small"], "train", {"inputs": 64, "targets": 8}, seed=0,
                                    pack=False, num_epochs=1, shard_info=seqio.ShardInfo(index, 2))
    return {tuple(ex["encoder_input_tokens"]) for ex in ds.as_numpy_iterator()}
  a, b = seen(0), seen(1)
  assert a and b and not a & b
  assert len(a) + len(b) == SIZES["small"]


def test_host_shards_draw_their_own_task_sequence(tasks):
  mixture = _mixture([tasks["small"], tasks["medium"]], rate="equal")

  def task_sequence(index):
    ds = input_pipeline.get_dataset(mixture.name, "train", LENGTHS, seed=0, pack=False,
                                    shard_info=seqio.ShardInfo(index, 2))
    return [int(ex["task_ids"][0]) for ex in ds.take(200).as_numpy_iterator()]
  a, b = task_sequence(0), task_sequence(1)
  assert a != b  # one shared seed would give both shards the same sequence of tasks
  assert 0.35 < a.count(1) / len(a) < 0.65 and 0.35 < b.count(1) / len(b) < 0.65


def test_stream_position_restores_after_restart(tasks, tmp_path):
  mixture = _mixture([tasks["tiny"], tasks["medium"]], rate="temperature", temperature=2.0)

  def batches():
    ds = input_pipeline.get_dataset(mixture.name, "train", LENGTHS, seed=3, pack=True)
    return iter(ds.batch(4))

  it = batches()
  for _ in range(7):
    next(it)
  path = tf.train.Checkpoint(iterator=it).write(str(tmp_path / "data"))
  expected = [next(it)["encoder_input_tokens"].numpy() for _ in range(5)]
  resumed = batches()  # a fresh pipeline, as after a restart
  tf.train.Checkpoint(iterator=resumed).read(path).assert_consumed()
  got = [next(resumed)["encoder_input_tokens"].numpy() for _ in range(5)]
  for a, b in zip(expected, got):
    np.testing.assert_array_equal(a, b)


def test_fused_maps_leave_the_stream_unchanged():
  """get_dataset turns on tf.data map fusion for speed: the packed demo mixture (span corruption
  included) must be the same batches as without it."""
  from t5mix import definitions
  definitions.load()

  def rows(fuse):
    ds = input_pipeline.get_dataset("demo", "train", {"inputs": 64, "targets": 16}, seed=5, pack=True)
    options = tf.data.Options()
    options.experimental_optimization.map_fusion = fuse  # the later setting wins
    ds = ds.with_options(options)
    assert ds.options().experimental_optimization.map_fusion is fuse
    return list(ds.take(30).as_numpy_iterator())

  fused, plain = rows(True), rows(False)
  for a, b in zip(fused, plain, strict=True):
    assert a.keys() == b.keys()
    for k in a:
      np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def test_packed_task_ids_follow_segments(tasks):
  mixture = _mixture([tasks["tiny"], tasks["large"]], rate="equal")
  ds = input_pipeline.get_dataset(mixture.name, "train", {"inputs": 64, "targets": 16}, seed=0,
                                  pack=True)
  for ex in ds.take(20).as_numpy_iterator():
    segments, ids = ex["decoder_segment_ids"], ex["task_ids"]
    assert ((segments == 0) == (ids == 0)).all()  # padding has no task
    for s in set(segments[segments > 0].tolist()):
      assert len(set(ids[segments == s].tolist())) == 1  # one task per packed example


def test_demo_mixture_table():
  from t5mix import definitions
  definitions.load()
  rows = {r.task: r for r in mixing.rate_table(seqio.get_mixture_or_task("demo"))}
  sizes = {name: rows[name].examples for name in rows}
  expected = _theory(list(sizes.values()), temperature=2.0)
  np.testing.assert_allclose([rows[n].rate for n in sizes], expected)
  assert sum(r.per_1000 for r in rows.values()) == pytest.approx(1000)


def test_mixture_from_a_python_module(tasks, tmp_path, capsys):
  from t5mix import cli
  name = _unique("module_mix")
  module = tmp_path / "my_mixtures.py"
  module.write_text(f"import t5mix\n"
                    f"t5mix.add_mixture({name!r}, tasks=[{tasks['tiny']!r}, {tasks['large']!r}],\n"
                    f"                  rate='temperature', temperature=4.0, maximum=1000)\n")
  assert cli.main(["show", name, "--module", str(module), "--plot", str(tmp_path / "r.png")]) == 0
  out = capsys.readouterr().out
  expected = _theory([SIZES["tiny"], SIZES["large"]], temperature=4.0, maximum=1000)
  assert f"{100 * expected[0]:.2f}" in out and f"{100 * expected[1]:.2f}" in out
  assert (tmp_path / "r.png").stat().st_size > 1000
