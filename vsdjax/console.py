"""What a long run says while it works (loading, compiling, exporting)."""

import sys

import tqdm


def say(message: str) -> None:
  """One line on stderr, above any progress bar."""
  tqdm.tqdm.write(f"vsdjax: {message}", file=sys.stderr)
  sys.stderr.flush()
