"""Metric sinks: DIR/metrics.jsonl (one JSON object per logged step) and TensorBoard events in DIR."""

from __future__ import annotations

import json
import os

import jax
import numpy as np


class MetricWriter:
  """Appends rows to metrics.jsonl and scalars to TensorBoard (process 0 only)."""

  def __init__(self, workdir: str) -> None:
    """Opens both sinks in append mode, so a resumed run keeps what was written before."""
    self.enabled = jax.process_index() == 0
    if self.enabled:
      self._jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a")  # noqa: SIM115 - closed in close()
      from tensorboardX import SummaryWriter  # imported here: it pulls in torch when installed

      self._tb = SummaryWriter(workdir)

  def write(self, step: int, metrics: dict) -> None:
    """One row {'step': step, **metrics}; values become Python floats."""
    if not self.enabled:
      return
    row = {"step": int(step), **{k: float(np.asarray(v)) for k, v in metrics.items()}}
    self._jsonl.write(json.dumps(row) + "\n")
    self._jsonl.flush()
    for k, v in row.items():
      if k != "step":
        self._tb.add_scalar(k, v, step)
    self._tb.flush()

  def close(self) -> None:
    """Flushes and closes."""
    if self.enabled:
      self._jsonl.close()
      self._tb.close()
