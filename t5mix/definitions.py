"""Loading task and mixture definitions: YAML files and Python modules.

Built-in definitions live in the project's `tasks/` and `mixtures/` directories; users add their
own without editing t5mix, by `--tasks-dir DIR_OR_FILE` (YAML) or `--module NAME_OR_FILE.py`.

A definitions YAML file holds any of these top-level keys:

    vocabulary: spm.model      # default vocabulary of the tasks below ("demo", "byte" or a path)
    tasks:    [ {name: ..., kind: ..., ...}, ... ]      # see registry.TaskSpec
    mixtures: [ {name: ..., tasks: [...], ...}, ... ]   # see mixing.MixtureSpec

Relative paths inside a file resolve against that file's directory. YAML is read as
`yaml.safe_load` reads it (no code runs), keeping the line of every key, so that a mistake in a
definition is reported as `file:line: task 'NAME': key 'KEY': ...`.
"""

from __future__ import annotations

import glob
import importlib
import importlib.util
import os
import sys
from typing import Any

import yaml

from t5mix import mixing, registry
from t5mix import vocab as vocab_lib
from t5mix.errors import UserError, check_keys, where

PROJECT_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BUILTIN_DIRS = (os.path.join(PROJECT_ROOT, "tasks"), os.path.join(PROJECT_ROOT, "mixtures"))
FILE_KEYS = ("vocabulary", "tasks", "mixtures")

_loaded: set[str] = set()


def read_yaml(path: str):
  """The document of a YAML file, as `yaml.safe_load` reads it; errors name the line."""
  return read_yaml_with_lines(path)[0]


def read_yaml_with_lines(path: str) -> tuple[Any, dict[str, int]]:
  """(document, {key path: line}) of a YAML file; see `_key_lines` for the key paths."""
  if not os.path.exists(path):
    raise UserError(f"{path}: file does not exist")
  if os.path.isdir(path):
    raise UserError(f"{path}: is a directory, expected a YAML file")
  with open(path, "rb") as f:
    data = f.read()
  if data.startswith(b"\xef\xbb\xbf"):
    data = data[3:]
  if b"\x00" in data:
    line = data[:data.index(b"\x00")].count(b"\n") + 1
    raise UserError(f"{path}:{line}: binary data (NUL byte); expected a YAML text file")
  try:
    text = data.decode("utf-8")
  except UnicodeDecodeError as e:
    line = data[:e.start].count(b"\n") + 1
    raise UserError(f"{path}:{line}: not valid UTF-8 ({e.reason} at byte {e.start})") from None
  # What yaml.safe_load does (SafeLoader.get_single_data), keeping the composed node tree, whose
  # start marks say where each key is.
  loader = None
  try:
    loader = yaml.SafeLoader(text)  # checks for unprintable characters already
    node = loader.get_single_node()
    doc = loader.construct_document(node) if node is not None else None
  except yaml.YAMLError as e:
    mark = getattr(e, "problem_mark", None) or getattr(e, "context_mark", None)
    if mark is not None:
      line = f":{mark.line + 1}"
    elif isinstance(getattr(e, "position", None), int):  # yaml.reader.ReaderError
      line = f":{text[:e.position].count(chr(10)) + 1}"
    else:
      line = ""
    problem = getattr(e, "problem", None) or getattr(e, "reason", None) or str(e).splitlines()[0]
    raise UserError(f"{path}{line}: invalid YAML ({problem})") from None
  finally:
    if loader is not None:
      loader.dispose()
  return doc, _key_lines(node)


def _key_lines(node, prefix: str = "", lines: dict | None = None, seen: set | None = None) -> dict:
  """{key path: 1-based line} of every mapping key and sequence item under `node`.

  Paths as in `tasks[0].splits.train`. A node reached again through a YAML alias is not walked
  again (aliases can make a document recursive or exponentially large), so keys inside it have
  only their first path. A key given twice has its last line, as its value is the last one.
  """
  lines = {} if lines is None else lines
  seen = set() if seen is None else seen
  if id(node) in seen or not isinstance(node, (yaml.MappingNode, yaml.SequenceNode)):
    return lines
  seen.add(id(node))
  if isinstance(node, yaml.MappingNode):  # merge keys (<<) are already flattened by construction
    children = [(f"{prefix}.{key.value}" if prefix else str(key.value), key, value)
                for key, value in node.value]
  else:
    children = [(f"{prefix}[{i}]", item, item) for i, item in enumerate(node.value)]
  for path, marker, child in children:
    lines[path] = marker.start_mark.line + 1
    _key_lines(child, path, lines, seen)
  return lines


def _parse_file(path: str) -> tuple[list[registry.TaskSpec], list[mixing.MixtureSpec]]:
  doc, lines = read_yaml_with_lines(path)
  at = lambda key: where(path, lines.get(key))  # noqa: E731
  if doc is None:
    raise UserError(f"{path}: file is empty (expected a mapping with keys {', '.join(FILE_KEYS)})")
  if not isinstance(doc, dict):
    raise UserError(f"{path}: expected a mapping with keys {', '.join(FILE_KEYS)}")
  check_keys(doc, FILE_KEYS, at, what="top-level key", suffix=f"; expected {', '.join(FILE_KEYS)}")
  base_dir = os.path.dirname(os.path.abspath(path))
  tasks, mixtures = [], []
  for kind, items in (("tasks", doc.get("tasks")), ("mixtures", doc.get("mixtures"))):
    if items is None:
      continue
    if not isinstance(items, list):
      raise UserError(f"{at(kind)}: key {kind!r} must be a list")
    for i, item in enumerate(items):
      prefix = f"{kind}[{i}]."
      key_origins = {key[len(prefix):]: where(path, line) for key, line in lines.items()
                     if key.startswith(prefix)}
      if kind == "tasks":
        if isinstance(item, dict) and "vocabulary" not in item and doc.get("vocabulary"):
          item = {**item, "vocabulary": doc["vocabulary"]}
          key_origins["vocabulary"] = at("vocabulary")
        tasks.append(registry.TaskSpec.from_dict(item, origin=at(f"{kind}[{i}]"), base_dir=base_dir,
                                                 key_origins=key_origins))
      else:
        mixtures.append(mixing.MixtureSpec.from_dict(item, origin=at(f"{kind}[{i}]"),
                                                     key_origins=key_origins))
  return tasks, mixtures


def _import_module(name_or_path: str) -> None:
  """Imports a user module by dotted name (from the working directory too) or .py path."""
  try:
    if name_or_path.endswith(".py"):
      if not os.path.exists(name_or_path):
        raise UserError(f"{name_or_path}: module file does not exist")
      mod_name = "t5mix_user_" + os.path.splitext(os.path.basename(name_or_path))[0]
      spec = importlib.util.spec_from_file_location(mod_name, name_or_path)
      module = importlib.util.module_from_spec(spec)
      sys.modules[mod_name] = module
      spec.loader.exec_module(module)
    else:
      if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
      importlib.import_module(name_or_path)
  except UserError:
    raise
  except ModuleNotFoundError as e:
    raise UserError(f"--module {name_or_path}: cannot import ({e})") from None
  except SyntaxError as e:
    raise UserError(f"{e.filename}:{e.lineno}: syntax error in module ({e.msg})") from None


def _expand(path: str) -> tuple[list[str], list[str]]:
  """(yaml files, python files) of a file or directory."""
  if os.path.isdir(path):
    yamls = sorted(glob.glob(os.path.join(path, "*.yaml")) + glob.glob(os.path.join(path, "*.yml")))
    pys = sorted(p for p in glob.glob(os.path.join(path, "*.py"))
                 if not os.path.basename(p).startswith("_"))
    return yamls, pys
  if not os.path.exists(path):
    raise UserError(f"{path}: no such file or directory")
  return ([path], []) if not path.endswith(".py") else ([], [path])


def load(paths: list[str] = (), modules: list[str] = (), builtin: bool = True) -> None:
  """Registers the built-in definitions (once) and those of `paths` and `modules`."""
  all_paths = (list(BUILTIN_DIRS) if builtin else []) + list(paths)
  yamls, pys, keys = [], [], []
  for path in all_paths:
    key = os.path.abspath(path)
    if key in _loaded or key in keys:
      continue
    keys.append(key)
    y, p = _expand(path)
    yamls += y
    pys += p
  task_specs, mixture_specs = [], []
  for path in yamls:
    t, m = _parse_file(path)
    task_specs += t
    mixture_specs += m
  _loaded.update(keys)  # only once they parsed: after an error, loading them again retries
  for spec in task_specs:
    registry.add_task(spec=spec)
  for path in pys:
    _import_module(path)
  for name in modules:
    if name not in _loaded:
      _loaded.add(name)
      _import_module(name)
  _add_mixtures(mixture_specs)


def _add_mixtures(specs: list[mixing.MixtureSpec]) -> None:
  by_name = {}
  for spec in specs:
    if spec.name in by_name:
      raise UserError(f"{spec.origin}: mixture {spec.name!r} is already defined "
                      f"in {by_name[spec.name].origin}")
    by_name[spec.name] = spec
  mixing.check_no_cycles(by_name)
  done: set[str] = set()

  def add(name):  # children first, so a mixture may name one defined later in the files
    if name in done:
      return
    for entry in by_name[name].tasks:
      child = entry if isinstance(entry, str) else entry["name"]
      if child in by_name:
        add(child)
    mixing.add_mixture(by_name[name])
    done.add(name)

  for name in by_name:
    add(name)


def file_hashes(paths: list[str] = (), modules: list[str] = (), vocab: str | None = None
                ) -> dict[str, str]:
  """{absolute file: content hash} of definitions files (directories expanded), module files and
  a vocabulary file, as a run records them (data.hashes) to notice later edits."""
  files = []
  for path in paths:
    yamls, pys = _expand(path)
    files += yamls + pys
  files += [m for m in modules if m.endswith(".py")]
  if vocab and os.path.isfile(vocab):
    files.append(vocab)
  return {os.path.abspath(f): vocab_lib.file_hash(f) for f in files if os.path.isfile(f)}


def changed_files(saved: dict[str, str]) -> list[str]:
  """The files of `saved` (a run's data.hashes) that were edited or deleted since."""
  return [f"{path} ({'edited' if os.path.isfile(path) else 'deleted'})"
          for path, digest in sorted(saved.items())
          if not os.path.isfile(path) or vocab_lib.file_hash(path) != digest]
