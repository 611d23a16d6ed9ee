"""Entry points (`python -m launch.train`, `decode`, `convert`, `sweep`, `compile`) and cluster scripts."""


def error_line(e: BaseException, limit: int = 1000) -> str:
  """An exception's message as one line of at most `limit` characters (library messages can span pages)."""
  text = " ".join(line.strip() for line in str(e).splitlines() if line.strip()) or type(e).__name__
  return text if len(text) <= limit else text[:limit - 3] + "..."
