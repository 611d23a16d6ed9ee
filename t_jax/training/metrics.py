"""Metric sinks: DIR/metrics.jsonl (one JSON object per logged step) and TensorBoard events in DIR."""

from __future__ import annotations

import json
import os
import sys

import jax
import numpy as np
from tqdm import tqdm


def _summary_writer(workdir: str):
  """tensorboardX's SummaryWriter, imported without torch: it imports torch (1.5-4 s) only to accept its
  tensors, which t_jax never passes."""
  hide = "torch" not in sys.modules
  if hide:
    sys.modules["torch"] = None  # `import torch` raises ImportError, which tensorboardX tolerates
  try:
    from tensorboardX import SummaryWriter
  finally:
    if hide:
      del sys.modules["torch"]
  return SummaryWriter(workdir)


class MetricWriter:
  """Appends rows to metrics.jsonl and scalars to TensorBoard (process 0 only)."""

  def __init__(self, workdir: str, start_step: int = 0) -> None:
    """Opens both sinks in append mode; rows past `start_step` (from before a crash) are dropped first."""
    self.enabled = jax.process_index() == 0
    if self.enabled:
      path = os.path.join(workdir, "metrics.jsonl")
      _truncate_after(path, start_step)
      self._jsonl = open(path, "a")  # noqa: SIM115 - closed in close()
      self._tb = _summary_writer(workdir)

  def write(self, step: int, metrics: dict) -> None:
    """One row {'step': step, **metrics}; values become Python floats."""
    if not self.enabled:
      return
    row = {"step": int(step), **{k: float(np.asarray(v)) for k, v in metrics.items()}}
    self._jsonl.write(json.dumps(row) + "\n")
    self._jsonl.flush()
    for k in metrics:
      self._tb.add_scalar(k, row[k], step)
    self._tb.flush()

  def close(self) -> None:
    """Flushes and closes."""
    if self.enabled:
      self._jsonl.close()
      self._tb.close()


def _truncate_after(path: str, step: int) -> None:
  """Keeps the rows with row['step'] <= step (a resumed run replays the later ones); a torn last line (a crash
  mid-write) is dropped with a message, a torn line elsewhere is an error naming it."""
  if not os.path.exists(path):
    return
  with open(path) as f:
    lines = [line for line in f.readlines() if line.strip()]
  rows = []
  for n, line in enumerate(lines, 1):
    try:
      rows.append(json.loads(line))
    except json.JSONDecodeError as e:
      if n < len(lines):
        raise ValueError(f"{path}:{n} is not a JSON row ({e}); fix or remove that line") from e
      log(f"{path}: dropping its torn last line ({e})")
  kept = [line for line, row in zip(lines, rows) if row["step"] <= step]
  if len(kept) != len(lines):
    with open(path + ".tmp", "w") as f:
      f.writelines(kept)
    os.replace(path + ".tmp", path)


def log(message: str) -> None:
  """Prints on process 0 only (every process runs the same loop in a multi-host job), above any progress bar."""
  if jax.process_index() == 0:
    tqdm.write(message)
