"""The `t5mix` command re-executes itself once with huge pages for malloc (t5mix/host_memory.py)."""

import os
import subprocess
import sys

import pytest

from t5mix import host_memory


needs_hugepages = pytest.mark.skipif(
    host_memory.tunables_with_hugepages({}, host_memory._glibc_version(), host_memory._thp_mode()) is None,
    reason="needs Linux, glibc >= 2.35 and transparent huge pages not 'never'")


def _clean_env():
  """This process's environment without the settings under test."""
  return {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", "T5MIX_HUGEPAGES")}


def test_tunable_is_added_once_and_respects_opt_out_and_platform():
  new = host_memory.tunables_with_hugepages
  assert new({}, (2, 36), "madvise") == "glibc.malloc.hugetlb=1"
  assert new({}, (2, 35), "always") == "glibc.malloc.hugetlb=1"
  # the user's own tunables are kept
  assert new({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"}, (2, 36), "madvise") == \
      "glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1"
  # already set (after our re-exec, or by the user, to any value): no second re-exec
  assert new({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"}, (2, 36), "madvise") is None
  assert new({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"}, (2, 36), "madvise") is None
  assert new({"T5MIX_HUGEPAGES": "0"}, (2, 36), "madvise") is None
  assert new({"T5MIX_HUGEPAGES": "off"}, (2, 36), "madvise") is None
  assert new({}, (2, 31), "madvise") is None  # glibc without the tunable
  assert new({}, None, "madvise") is None  # not glibc
  assert new({}, (2, 36), "never") is None
  assert new({}, (2, 36), None) is None


def test_thp_mode_reads_the_bracketed_choice(tmp_path):
  path = tmp_path / "enabled"
  path.write_text("always [madvise] never\n")
  assert host_memory._thp_mode(str(path)) == "madvise"
  assert host_memory._thp_mode(str(tmp_path / "missing")) is None


# A child that re-executes itself, then maps 64 MiB with malloc and reports whether that mapping is
# advised for huge pages (VmFlags "hg" in /proc/self/smaps: glibc's madvise(MADV_HUGEPAGE), which is
# what the tunable does; whether the kernel then finds free 2 MiB pages is up to the machine).
CHILD = r"""
import ctypes, os
from t5mix import host_memory
host_memory.reexec_with_hugepages()
libc = ctypes.CDLL(None)
libc.malloc.restype = ctypes.c_void_p
ptr = libc.malloc(64 << 20)
advised = None
for line in open("/proc/self/smaps"):
  head = line.split()[0]
  if "-" in head and not head.endswith(":"):
    start, end = (int(x, 16) for x in head.split("-"))
    inside = start <= ptr < end
  elif inside and line.startswith("VmFlags:"):
    advised = "hg" in line.split()[1:]
print(os.environ.get("GLIBC_TUNABLES"), advised)
"""


def _child(**env):
  out = subprocess.run([sys.executable, "-c", CHILD], env={**_clean_env(), **env}, capture_output=True, text=True,
                       check=True).stdout.split()
  return (None if out[0] == "None" else out[0]), out[1] == "True"


@needs_hugepages
def test_reexec_advises_huge_pages_for_large_allocations():
  tunables, advised = _child()
  assert tunables == "glibc.malloc.hugetlb=1" and advised
  tunables, advised = _child(T5MIX_HUGEPAGES="0")
  assert tunables is None and not advised


@needs_hugepages
def test_the_t5mix_command_runs_with_huge_pages(tmp_path):
  # pyproject's console script and `python -m t5mix.cli` both enter through cli.run; a user module
  # loaded by the command reports the environment it runs in.
  import tomllib
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  with open(os.path.join(root, "pyproject.toml"), "rb") as f:
    assert tomllib.load(f)["project"]["scripts"]["t5mix"] == "t5mix.cli:run"
  module = tmp_path / "report_env.py"
  module.write_text("import os\nprint('TUNABLES=' + str(os.environ.get('GLIBC_TUNABLES')))\n")
  for extra, expected in (({}, "TUNABLES=glibc.malloc.hugetlb=1"), ({"T5MIX_HUGEPAGES": "0"}, "TUNABLES=None")):
    p = subprocess.run([sys.executable, "-m", "t5mix.cli", "tasks", "--no-counts", "--module", str(module)],
                       env={**_clean_env(), **extra}, capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    assert expected in p.stdout.splitlines(), p.stdout[:300]
