"""The one exception type users see.

Anything a user can cause (a bad file, an unknown name, a bad config value) raises `UserError`
with a one-line message naming the file and line, or the key. The CLI prints it as
`t5mix: error: <message>` and exits with status 2, without a traceback.
"""


class UserError(Exception):
  """A problem with the user's input; the message is shown to the user as is."""


def where(path, line=None) -> str:
  """`path:line` (or `path`) for error messages."""
  return f"{path}:{line}" if line is not None else str(path)
