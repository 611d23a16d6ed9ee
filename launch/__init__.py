"""Entry points (`python -m launch.train`, `decode`, `convert`, `sweep`, `compile`) and cluster scripts.

Importing the package (every launcher does) starts JAX on the CPU alone when no accelerator is attached, and
keeps Orbax's stale event-loop tracebacks off the terminal.
"""

import importlib.util
import os
import sys
from typing import Any


def skip_absent_tpu() -> None:
  """CPU only on a machine with libtpu installed (the tpu-aot extra, in the CPU lock) but no TPU and no GPU.

  Otherwise JAX starts libtpu at the first device use, and libtpu prints a screen of set-up errors (no TPU
  accelerator type, no worker hostnames) before falling back to the CPU. JAX_PLATFORMS, when set, wins.
  """
  if "JAX_PLATFORMS" in os.environ or importlib.util.find_spec("libtpu") is None:
    return
  import jax
  from jax._src import hardware_utils  # JAX's own probe of the PCI bus (it decides TPU start-up the same way)

  if not (hardware_utils.num_available_tpu_chips_and_device_id()[0] or hardware_utils.has_visible_nvidia_gpu()
          or hardware_utils.num_available_amd_gpus()):
    jax.config.update("jax_platforms", "cpu")


skip_absent_tpu()


def quiet_closed_loop(unraisable: Any) -> None:
  """Drops 'Event loop is closed' from the tensorstore reads Orbax leaves running after a failed restore.

  They finish after the launcher has printed its error: line, and Python would print their traceback under it
  (or cut into it) at exit. Every other unraisable exception goes to Python's own hook.
  """
  e = unraisable.exc_value
  if not (isinstance(e, RuntimeError) and str(e) == "Event loop is closed"):
    sys.__unraisablehook__(unraisable)


sys.unraisablehook = quiet_closed_loop


def error_line(e: BaseException, limit: int = 1000) -> str:
  """An exception's message as one line of at most `limit` characters (library messages can span pages)."""
  text = " ".join(line.strip() for line in str(e).splitlines() if line.strip()) or type(e).__name__
  return text if len(text) <= limit else text[:limit - 3] + "..."
