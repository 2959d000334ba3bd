"""The one exception type users see.

Anything a user can cause (a bad file, an unknown name, a bad config value) raises `UserError`
with a one-line message naming the file and line, or the key. The CLI prints it as
`t5mix: error: <message>` and exits with status 2, without a traceback.
"""

import difflib
import re
from typing import Callable, Iterable, Mapping


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


def key_origin(key_origins: Mapping[str, str], key: str | None, default: str) -> str:
  """Where a key of a definition was written (`file:line`): the line of `key`, a key path such as
  `splits.train` or `tasks[2]`, else of the closest key that encloses it, else `default`."""
  while key and key not in key_origins:
    parent = re.sub(r"(\.[^.\[]*|\[\d+\])$", "", key)  # splits.train -> splits, tasks[2] -> tasks
    key = parent if parent != key else None
  return key_origins.get(key, default)
