"""Transparent huge pages for host memory that glibc's malloc maps: a CPU training speed setting.

XLA:CPU allocates every run's temporary buffer anew (hundreds of MiB for a train step), and glibc
serves an allocation that large with a fresh `mmap`, so each step page-faults and zeroes that memory
again in 4 KiB pages. glibc >= 2.35 can ask the kernel for transparent huge pages on those mappings
(`GLIBC_TUNABLES=glibc.malloc.hugetlb=1`), which cuts the faults ~29x and made the default demo run
train ~11% faster (benchmarks/RESULTS.md, "Host memory"). A tunable is read only when the process
starts, so the `t5mix` command sets it and re-executes itself, once, before importing anything heavy.

No library offers this (it is a process-level glibc setting), hence this module. Opt out with
`T5MIX_HUGEPAGES=0`.
"""

from __future__ import annotations

import os
import sys

TUNABLE = "glibc.malloc.hugetlb=1"
THP_MODE_FILE = "/sys/kernel/mm/transparent_hugepage/enabled"


def _glibc_version() -> tuple[int, int] | None:
  try:
    name, version = os.confstr("CS_GNU_LIBC_VERSION").split()  # e.g. "glibc 2.36"
    major, minor = version.split(".")[:2]
    return (int(major), int(minor)) if name == "glibc" else None
  except (AttributeError, OSError, ValueError):  # not glibc (musl, macOS, Windows)
    return None


def _thp_mode(path: str = THP_MODE_FILE) -> str | None:
  """The kernel's transparent-huge-page mode: 'always', 'madvise' or 'never' (None if unknown)."""
  try:
    with open(path) as f:
      text = f.read()
  except OSError:
    return None
  start, end = text.find("["), text.find("]")
  return text[start + 1:end] if 0 <= start < end else None


def tunables_with_hugepages(environ, glibc_version, thp_mode) -> str | None:
  """The GLIBC_TUNABLES value to re-execute with, or None when nothing should change."""
  if environ.get("T5MIX_HUGEPAGES", "1").strip().lower() in ("0", "false", "no", "off"):
    return None
  if glibc_version is None or glibc_version < (2, 35) or thp_mode not in ("always", "madvise"):
    return None
  current = environ.get("GLIBC_TUNABLES", "")
  if "glibc.malloc.hugetlb=" in current:  # already set, by us (after the re-exec) or by the user
    return None
  return f"{current}:{TUNABLE}" if current else TUNABLE


def reexec_with_hugepages() -> None:
  """Re-execute this process with huge pages for malloc, when the machine supports it.

  Call first thing in a program's entry point: nothing before the call survives it. Returns (and
  changes nothing) when already set, opted out, or unsupported; on success it does not return.
  """
  if not sys.platform.startswith("linux"):
    return
  tunables = tunables_with_hugepages(os.environ, _glibc_version(), _thp_mode())
  if tunables is None:
    return
  env = dict(os.environ, GLIBC_TUNABLES=tunables)
  sys.stdout.flush()
  sys.stderr.flush()
  try:
    # sys.orig_argv is the interpreter's own command line (`-m module`, `-c code` and options included).
    os.execve(sys.executable, sys.orig_argv, env)
  except OSError:  # cannot re-execute (unusual sandbox): carry on without huge pages
    return
