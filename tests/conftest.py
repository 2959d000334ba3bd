"""Shared fixtures: the built-in definitions, registry cleanup, unique task names, the CLI."""

import atexit
import itertools
import os
import pathlib
import re
import shutil
import tempfile

import pytest
import yaml

FIXTURES = pathlib.Path(__file__).parent / "fixtures"

# Most tests train or decode the same tiny models, in this process and in the CLI subprocesses they
# start; compiling those programs is most of their time. JAX's persistent compilation cache (keyed
# by the program, options and versions) lets every identical program after the first load instead
# of compile (tests/test_train.py: 231 s -> 127 s; the whole suite ~10% faster, as most programs
# differ). Set before JAX is imported; subprocesses inherit it.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  _cache = tempfile.mkdtemp(prefix="t5mix-tests-jax-cache-")
  atexit.register(shutil.rmtree, _cache, ignore_errors=True)
  os.environ.update(JAX_COMPILATION_CACHE_DIR=_cache, JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
                    JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")


@pytest.fixture(scope="session")
def fixtures_dir() -> pathlib.Path:
  return FIXTURES


@pytest.fixture(scope="session")
def builtins():
  """Registers the built-in tasks and mixtures (tasks/, mixtures/) once per process."""
  from t5mix import definitions
  definitions.load()


@pytest.fixture
def clean_registry(builtins):
  """Removes the tasks and mixtures a test registers (seqio's registries are global)."""
  import seqio
  tasks, mixtures = set(seqio.TaskRegistry.names()), set(seqio.MixtureRegistry.names())
  yield
  for name in set(seqio.MixtureRegistry.names()) - mixtures:
    seqio.MixtureRegistry.remove(name)
  for name in set(seqio.TaskRegistry.names()) - tasks:
    seqio.TaskRegistry.remove(name)


@pytest.fixture
def unique_name(request):
  """unique_name("prefix") → a task name unique to this test (and call)."""
  base = re.sub(r"\W+", "_", request.node.name).strip("_")
  counter = itertools.count()
  return lambda prefix="t": f"{prefix}_{base}_{next(counter)}"


@pytest.fixture
def write_yaml(tmp_path):
  """write_yaml(doc, name="defs.yaml") → path of a YAML definitions file in tmp_path."""
  def write(doc, name="defs.yaml"):
    path = tmp_path / name
    path.write_text(doc if isinstance(doc, str) else yaml.safe_dump(doc, sort_keys=False),
                    encoding="utf-8")
    return path
  return write


@pytest.fixture
def cli(capsys, monkeypatch, builtins):
  """cli(*argv) → (exit code, stdout, stderr) of `t5mix.cli.main(argv)`, run in-process.

  Settings the CLI changes globally (--tfds-data-dir, --vocab and a workdir's vocabulary) are restored after the test.
  """
  from t5mix import cli as cli_lib
  from t5mix import registry
  monkeypatch.setattr(registry, "TFDS_DATA_DIR", registry.TFDS_DATA_DIR)
  monkeypatch.setattr(registry, "DEFAULT_VOCABULARY", registry.DEFAULT_VOCABULARY)
  monkeypatch.setattr(registry, "RUN_VOCABULARY", registry.RUN_VOCABULARY)

  def run(*argv):
    capsys.readouterr()
    rc = cli_lib.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err
  return run


def assert_one_error(rc, err, *fragments):
  """Exit code 2 and exactly one stderr line `t5mix: error: ...` containing every fragment."""
  assert "Traceback" not in err, err
  lines = err.strip().splitlines()
  assert len(lines) == 1, err
  assert lines[0].startswith("t5mix: error: "), lines[0]
  for fragment in fragments:
    assert str(fragment) in lines[0], (fragment, lines[0])
  assert rc == 2
  return lines[0]


@pytest.fixture
def expect_error():
  return assert_one_error
