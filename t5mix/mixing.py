"""Mixtures: T5's mixing rates on seqio's Mixture.

Rates (T5 paper §3.5.2), for a task with n training examples:

  proportional   r ∝ min(n, K)                 (examples-proportional with an artificial cap K)
  temperature    r ∝ min(n, K) ** (1 / T)      (T = 1 is proportional; T → ∞ approaches equal)
  equal          r ∝ 1
  explicit       r = the number given per task

seqio computes the first two (`seqio.mixing_rate_num_examples`); t5mix checks that every size is
known and non-zero first, since a silent fallback would skew the mixture. A mixture may contain
mixtures: a sub-mixture enters its parent with one rate (computed from its total size, or given)
and shares it among its own tasks by its own rates, so a leaf task's effective rate is the product
along the path (seqio's `Mixture.get_rate`).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Mapping

import seqio

from t5mix.errors import UserError, check_keys, did_you_mean, key_origin
from t5mix.registry import get_task_or_mixture

RATES = ("proportional", "temperature", "equal", "explicit")


@dataclasses.dataclass
class MixtureSpec:
  """A mixture definition. Field names are the keys of a mixture YAML entry."""
  name: str
  tasks: list                      # task/mixture names, or {name: ..., rate: ...} entries
  rate: str = "proportional"       # proportional | temperature | equal | explicit
  temperature: float = 1.0
  maximum: int | None = None       # the cap K
  description: str = ""
  origin: str = "<python>"         # where it was defined (`file:line`), for error messages
  # Where each key was written (`file:line`), by key path as in `tasks[2]`; see registry.TaskSpec.
  key_origins: dict[str, str] = dataclasses.field(default_factory=dict)

  @classmethod
  def from_dict(cls, d: Mapping[str, Any], origin: str,
                key_origins: Mapping[str, str] | None = None) -> "MixtureSpec":
    if not isinstance(d, Mapping):
      raise UserError(f"{origin}: a mixture must be a mapping, found {type(d).__name__}")
    key_origins = dict(key_origins or {})
    name = d.get("name")
    mixture = f": mixture {name!r}" if isinstance(name, str) else ""
    known = {f.name for f in dataclasses.fields(cls)} - {"origin", "key_origins"}
    check_keys(d, known, lambda key: f"{key_origins.get(key, origin)}{mixture}")
    for key in ("name", "tasks"):
      if key not in d:
        raise UserError(f"{origin}{mixture}: missing required key {key!r}")
    spec = cls(**d, origin=origin, key_origins=key_origins)
    spec.validate()
    return spec

  def where(self, key: str | None = None) -> str:
    """`file:line: mixture 'NAME'` for error messages, at the line of `key` (a key path such as
    `tasks[2]`, else its closest enclosing key written in the file), else the mixture's."""
    return f"{key_origin(self.key_origins, key, self.origin)}: mixture {self.name!r}"

  def validate(self) -> None:
    if self.rate not in RATES:
      raise UserError(f"{self.where('rate')}: key 'rate': {self.rate!r} is not one of "
                      f"{', '.join(RATES)}{did_you_mean(self.rate, RATES)}")
    if not isinstance(self.temperature, (int, float)) or self.temperature <= 0:
      raise UserError(f"{self.where('temperature')}: key 'temperature' must be a positive number, "
                      f"got {self.temperature!r}")
    if self.rate != "temperature" and self.temperature != 1.0:
      raise UserError(f"{self.where('temperature')}: key 'temperature' needs rate: temperature")
    if self.maximum is not None and (not isinstance(self.maximum, int) or self.maximum <= 0):
      raise UserError(f"{self.where('maximum')}: key 'maximum' must be a positive integer, "
                      f"got {self.maximum!r}")
    if not isinstance(self.tasks, list) or not self.tasks:
      raise UserError(f"{self.where('tasks')}: key 'tasks' must be a non-empty list")
    seen = set()
    for i, entry in enumerate(self.tasks):
      where = self.where(f"tasks[{i}]")
      name, rate = _entry(entry, where)
      if name in seen:
        raise UserError(f"{where}: task {name!r} is listed twice")
      seen.add(name)
      if self.rate == "explicit" and rate is None:
        raise UserError(f"{where}: rate: explicit needs a rate for every task ({name!r} has none)")


def _entry(entry, where: str) -> tuple[str, float | None]:
  if isinstance(entry, str):
    return entry, None
  if isinstance(entry, Mapping) and set(entry) <= {"name", "rate"} and "name" in entry:
    rate = entry.get("rate")
    if rate is not None and (not isinstance(rate, (int, float)) or rate < 0):
      raise UserError(f"{where}: task {entry['name']!r}: rate must be a number >= 0, got {rate!r}")
    return str(entry["name"]), rate
  raise UserError(f"{where}: each task must be a name or {{name: NAME, rate: NUMBER}}, got {entry!r}")


def num_train_examples(provider, split: str = "train") -> int:
  """Exact training-set size of a task (or the sum over a mixture's tasks); never a guess."""
  if isinstance(provider, seqio.Mixture):
    return sum(num_train_examples(t, split) for t in provider.tasks)
  n = provider.num_input_examples(split)
  if n is None:
    raise UserError(f"task {provider.name!r}: size of split {split!r} is unknown; "
                    "give the mixture an explicit rate for it")
  if n == 0:
    raise UserError(f"task {provider.name!r}: split {split!r} has 0 examples; "
                    "a mixture cannot sample from it")
  return n


def examples_rate(task, maximum: int | None = None, temperature: float = 1.0) -> float:
  """T5's rate min(n, K) ** (1/T), by seqio, after checking n is known and positive.

  A sub-mixture counts as one task whose size is the sum of its tasks' sizes.
  """
  n = num_train_examples(task)
  if isinstance(task, seqio.Mixture):
    return _rate_from_size(n, maximum, temperature)
  return seqio.mixing_rate_num_examples(task, maximum=maximum, temperature=temperature)


class _Mixture(seqio.Mixture):
  """seqio.Mixture whose sub-mixtures may have rate functions too (seqio wants a number).

  Computing a sub-mixture's rate lazily keeps definitions loadable when a dataset's size is not
  known yet (e.g. a TFDS dataset that is not prepared); the size is read when rates are needed.
  """

  def _get_submixture_rate(self, mix):
    rate = self.rate_per_task_name[mix.name]
    return float(rate(mix) if callable(rate) else rate)


def add_mixture(name: str | MixtureSpec | None = None, *, spec: MixtureSpec | None = None,
                **kwargs) -> seqio.Mixture:
  """Registers a mixture; its tasks (and sub-mixtures) must already be registered.

  The Python-module way to add one:

      t5mix.add_mixture("my_mix", tasks=["my_sst2", "my_rte"], rate="temperature", temperature=2)
  """
  if isinstance(name, MixtureSpec):
    spec = name
  if spec is None:
    origin = kwargs.pop("origin", "<python>")
    spec = MixtureSpec.from_dict({"name": name, **kwargs}, origin=origin)
  if spec.name in seqio.MixtureRegistry.names() or spec.name in seqio.TaskRegistry.names():
    raise UserError(f"{spec.where('name')}: the name is already defined; pick another name")
  if spec.rate == "equal":
    default = lambda task: 1.0  # noqa: E731
  else:  # proportional, temperature (explicit gives every rate)
    default = functools.partial(examples_rate, maximum=spec.maximum, temperature=spec.temperature)
  entries = []
  for i, entry in enumerate(spec.tasks):
    where = spec.where(f"tasks[{i}]")
    name, rate = _entry(entry, where)
    try:
      get_task_or_mixture(name)
    except UserError as e:
      raise UserError(f"{where}: {e}") from None
    entries.append((name, rate if rate is not None else default))
  mixture = _Mixture(spec.name, entries)
  mixture.t5mix_spec = spec
  seqio.MixtureRegistry.add_provider(spec.name, mixture)
  return mixture


def _rate_from_size(n: int, maximum: int | None, temperature: float) -> float:
  # The same arithmetic as seqio.mixing_rate_num_examples, for a size that is not one Task's.
  n = min(n, maximum) if maximum else n
  return float(n) ** (1.0 / temperature)


def leaf_rates(mixture_or_task) -> dict[str, float]:
  """Effective normalised rate of every leaf task (sums to 1)."""
  if isinstance(mixture_or_task, seqio.Task):
    return {mixture_or_task.name: 1.0}
  total = mixture_or_task.total_rate
  if total <= 0:
    raise UserError(f"mixture {mixture_or_task.name!r}: all rates are zero")
  return {t.name: mixture_or_task.get_rate(t) / total for t in mixture_or_task.tasks}


@dataclasses.dataclass
class RateRow:
  task: str
  examples: int | None
  capped: int | None
  rate: float          # normalised, 0..1
  per_1000: float


def rate_table(mixture_or_task) -> list[RateRow]:
  """What `t5mix show MIXTURE` prints: one row per leaf task."""
  rates = leaf_rates(mixture_or_task)
  tasks = ([mixture_or_task] if isinstance(mixture_or_task, seqio.Task)
           else mixture_or_task.tasks)
  spec = getattr(mixture_or_task, "t5mix_spec", None)
  cap = spec.maximum if isinstance(spec, MixtureSpec) else None
  rows = []
  for task in tasks:
    n = task.num_input_examples("train") if "train" in task.splits else None
    capped = min(n, cap) if (n is not None and cap) else n
    rows.append(RateRow(task.name, n, capped, rates[task.name], 1000 * rates[task.name]))
  return rows


def check_no_cycles(specs: Mapping[str, MixtureSpec]) -> None:
  """Mixtures may nest but not contain themselves; names the cycle if they do."""
  def visit(name, path):
    if name in path:
      cycle = " -> ".join(path[path.index(name):] + [name])
      raise UserError(f"{specs[name].origin}: mixture cycle: {cycle}")
    for entry in specs[name].tasks:
      child, _ = _entry(entry, name)
      if child in specs:
        visit(child, path + [name])
  for name in specs:
    visit(name, [])
