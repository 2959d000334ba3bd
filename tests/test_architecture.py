"""The package's import structure (ARCHITECTURE.md): layers that import only downward, no cycles,
and no function-level imports that hide an upward one.

Read from the source with `ast`, so nothing is imported and the test is instant.
"""

import ast
import pathlib

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / "t5mix"

# Lowest first. A module imports modules of its own layer or of a lower one; layers that share a
# rank are siblings and import nothing of each other.
LAYERS = [
    ("foundation", 0, {"errors", "distributed", "host_memory", "demo_data", "vocab"}),
    ("data", 1, {"ner", "metrics", "formats", "sources", "span_corruption", "registry", "mixing",
                 "definitions", "input_pipeline", "cache"}),
    ("model", 1, {"peft", "model", "decode", "partitioning", "hf_interop"}),
    ("config", 2, {"config"}),
    ("checkpoints", 3, {"checkpoints", "tracking"}),
    ("fine-tuning", 4, {"finetune", "optim", "adapters", "convert"}),
    ("eval", 4, {"evaluate", "eval_report", "predict", "compare", "probe"}),
    ("train", 5, {"train"}),
    ("cli", 6, {"eval_cli", "cli"}),
]
LAZY_IMPORTERS = {"cli", "eval_cli"}  # import commands' modules when run: `t5mix --help` stays fast


def _imports() -> dict[str, list[tuple[str, bool]]]:
  """{module: [(imported t5mix module, whether the import is inside a function)]}."""
  modules = {p.stem for p in PACKAGE.glob("*.py")}
  graph = {}
  for path in PACKAGE.glob("*.py"):
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
      if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "t5mix":
        names = ([a.name for a in node.names] if node.module == "t5mix"
                 else [node.module.split(".")[1]])
      elif isinstance(node, ast.Import):
        names = [a.name.split(".")[1] for a in node.names if a.name.startswith("t5mix.")]
      else:
        continue
      found += [(n, node.col_offset > 0) for n in names if n in modules and n != path.stem]
    graph[path.stem] = found
  return graph


GRAPH = _imports()
LAYER_OF = {m: (name, rank) for name, rank, members in LAYERS for m in members}


def test_every_module_has_a_layer():
  assert set(GRAPH) - {"__init__"} == set(LAYER_OF), "add new modules to LAYERS and ARCHITECTURE.md"


@pytest.mark.parametrize("module", sorted(set(GRAPH) - {"__init__"}))
def test_imports_go_down(module):
  layer, rank = LAYER_OF[module]
  for imported, _ in GRAPH[module]:
    their_layer, their_rank = LAYER_OF[imported]
    assert their_layer == layer or their_rank < rank, (
        f"{module} ({layer}) imports {imported} ({their_layer})")


def test_no_import_cycles():
  edges = {m: {i for i, _ in imports} for m, imports in GRAPH.items()}

  def cycle_from(start):
    stack = [(start, [start])]
    while stack:
      node, path = stack.pop()
      for nxt in edges.get(node, ()):
        if nxt == start:
          return path + [start]
        if nxt not in path:
          stack.append((nxt, path + [nxt]))
    return None

  cycles = [c for m in sorted(edges) if (c := cycle_from(m))]
  assert not cycles, "import cycle: " + " -> ".join(cycles[0])


def test_function_level_imports_only_in_the_cli():
  hidden = [(m, i) for m, imports in GRAPH.items() if m not in LAZY_IMPORTERS
            for i, inside in imports if inside]
  assert not hidden, f"function-level imports (module, imported): {hidden}"


def test_the_checker_sees_imports():
  """The parse above finds what it must: a known upward import would be reported."""
  assert ("checkpoints", False) in GRAPH["train"] and ("train", True) in GRAPH["cli"]
  assert all(LAYER_OF[i][1] < LAYER_OF["train"][1] for i, _ in GRAPH["train"])
