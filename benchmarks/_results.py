"""Where a benchmark writes its JSON by default: benchmarks/results/<name>[_tag]_<device>.json.

Smoke runs go to the temp dir instead, so CPU-sized numbers are never committed as results.
"""

import json
import os
import re
import tempfile


def default_out(name: str, device_kind: str, smoke: bool = False, tag: str = "") -> str:
  """The JSON path for benchmark `name` on `device_kind` (e.g. 'NVIDIA H100 80GB HBM3')."""
  device = re.sub(r"[^A-Za-z0-9]+", "_", device_kind).strip("_").lower()
  if smoke:
    return os.path.join(tempfile.gettempdir(), f"{name}_smoke_{device}.json")
  return os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", f"{name}{tag}_{device}.json")


def write_json(result: dict, path: str) -> None:
  """Writes a benchmark's result (creating its folder) and says where."""
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path, "w") as f:
    json.dump(result, f, indent=1)
  print(f"wrote {path}")
