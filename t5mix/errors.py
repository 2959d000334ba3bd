"""The one exception type users see.

Anything a user can cause (a bad file, an unknown name, a bad config value) raises `UserError`
with a one-line message naming the file and line, or the key. The CLI prints it as
`t5mix: error: <message>` and exits with status 2, without a traceback.
"""

import difflib
import re
from typing import Callable, Collection, Iterable, Mapping


class UserError(Exception):
  """A problem with the user's input; the message is shown to the user as is."""


def where(path, line=None) -> str:
  """`path:line` (or `path`) for error messages."""
  return f"{path}:{line}" if line is not None else str(path)


def did_you_mean(word, candidates: Iterable, show: Callable[[str], str] = repr) -> str:
  """` (did you mean 'x'?)` naming the candidate closest to `word`, or '' when none is close.

  Closeness is difflib's (ratio >= 0.6, the best one); `show` writes the suggestion, e.g. with the
  section prefix of a dotted config key.
  """
  close = difflib.get_close_matches(str(word), [str(c) for c in candidates], n=1)
  return f" (did you mean {show(close[0])}?)" if close else ""


def check_keys(mapping: Iterable, allowed: Collection[str],
               where: Callable[[str], str] | None = None, *, what: str = "key", prefix: str = "",
               suffix: str = "") -> None:
  """UserError for the first key of `mapping` that is not in `allowed`, with a did-you-mean hint:
  `WHERE: unknown WHAT 'KEY' (did you mean 'CLOSE'?)SUFFIX`.

  `where(key)` says where the key was written (e.g. its `file:line`); None leaves the location
  out (a caller adds it). `prefix` goes before the key and the suggestion, e.g. the section of a
  dotted config key (`optimizer.`).
  """
  for key in mapping:
    if key not in allowed:
      at = f"{where(str(key))}: " if where is not None else ""
      shown = repr(prefix + str(key)) if prefix else repr(key)
      hint = did_you_mean(key, allowed, lambda close: repr(prefix + close))
      raise UserError(f"{at}unknown {what} {shown}{hint}{suffix}")


def key_origin(key_origins: Mapping[str, str], key: str | None, default: str) -> str:
  """Where a key of a definition was written (`file:line`): the line of `key`, a key path such as
  `splits.train` or `tasks[2]`, else of the closest key that encloses it, else `default`."""
  while key and key not in key_origins:
    parent = re.sub(r"(\.[^.\[]*|\[\d+\])$", "", key)  # splits.train -> splits, tasks[2] -> tasks
    key = parent if parent != key else None
  return key_origins.get(key, default)


def first_line(e: BaseException, limit: int = 200) -> str:
  """An exception's first line, for a one-line message (without TensorStore's page of JSON spec)."""
  text = str(e).strip().split(" See full TensorStore details")[0]
  line = text.splitlines()[0] if text else type(e).__name__
  return line if len(line) <= limit else line[:limit - 1] + "…"
