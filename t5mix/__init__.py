"""t5mix: multitask T5 training in JAX/Flax with temperature-based dataset mixing.

The registry API is importable from the top level: `t5mix.add_task(...)`, `t5mix.add_mixture(...)`.
"""

__version__ = "0.1.0"

_LAZY = {"add_task": "t5mix.registry", "TaskSpec": "t5mix.registry",
         "add_mixture": "t5mix.mixing", "MixtureSpec": "t5mix.mixing", "UserError": "t5mix.errors"}


def __getattr__(name):
  # Lazy, so that `import t5mix` (and the CLI's start) does not import TensorFlow before it must.
  if name in _LAZY:
    import importlib
    return getattr(importlib.import_module(_LAZY[name]), name)
  raise AttributeError(f"module 't5mix' has no attribute {name!r}")
