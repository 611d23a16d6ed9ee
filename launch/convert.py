"""Convert between Hugging Face checkpoint directories and t_jax params workdirs.

  python -m launch.convert --from_hf=HF_DIR --to_workdir=WORKDIR
  python -m launch.convert --from_workdir=WORKDIR --to_hf=HF_DIR [--tokenizer=spm.model]

A workdir holds config.gin (ModelConfig bindings) and params/ (Orbax); see t_jax.convert.workdir.
The source HF config is kept as WORKDIR/hf_config.json so the reverse trip restores its special ids.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Optional

from absl import app, flags

FROM_HF = flags.DEFINE_string("from_hf", None, "HF checkpoint directory (config.json + weights).")
TO_WORKDIR = flags.DEFINE_string("to_workdir", None, "t_jax workdir to write (config.gin + params/).")
FROM_WORKDIR = flags.DEFINE_string("from_workdir", None, "t_jax workdir to read.")
TO_HF = flags.DEFINE_string("to_hf", None, "HF directory to write (config.json + model.safetensors).")
TOKENIZER = flags.DEFINE_string("tokenizer", None, "SentencePiece model copied beside the HF export.")
SCAN_LAYERS = flags.DEFINE_bool("scan_layers", False, "Store the imported layers stacked (scan_layers=True).")
PARAM_DTYPE = flags.DEFINE_enum("param_dtype", "float32", ["float32", "bfloat16", "float16"],
                                "Parameter dtype of the imported model.")
HF_DTYPE = flags.DEFINE_enum("hf_dtype", "float32", ["float32", "bfloat16", "float16"], "Dtype of exported weights.")
OVERWRITE = flags.DEFINE_bool("overwrite", False, "Replace an existing workdir checkpoint.")

HF_CONFIG = "hf_config.json"
TOKEN_FIELDS = ("pad_token_id", "bos_token_id", "eos_token_id", "decoder_start_token_id")


def hf_to_workdir(hf_dir: str, workdir: str, *, scan_layers: bool = False, param_dtype: str = "float32",
                  overwrite: bool = False) -> Path:
  """HF checkpoint directory -> t_jax workdir; returns the workdir."""
  from t_jax.convert import from_hf, write_params_workdir

  model, params = from_hf(hf_dir, overrides=dict(scan_layers=scan_layers, param_dtype=param_dtype))
  root = write_params_workdir(workdir, model.cfg, params, overwrite=overwrite)
  (root / HF_CONFIG).write_text((Path(hf_dir) / "config.json").read_text())
  return root


def workdir_to_hf(workdir: str, hf_dir: str, *, tokenizer: Optional[str] = None, dtype: str = "float32") -> Path:
  """t_jax workdir -> HF directory; special ids come from WORKDIR/hf_config.json when present."""
  from t_jax.convert import read_params_workdir, to_hf

  cfg, params = read_params_workdir(workdir)
  token_ids = None
  source = Path(workdir) / HF_CONFIG
  if source.is_file():
    hf = json.loads(source.read_text())
    token_ids = {k: hf[k] for k in TOKEN_FIELDS if k in hf}
  return to_hf(cfg, params, hf_dir, tokenizer=tokenizer, token_ids=token_ids, dtype=dtype)


def main(argv: list[str]) -> int:
  """Entry point: exactly one of --from_hf/--to_workdir or --from_workdir/--to_hf."""
  del argv
  from t_jax.convert import ConversionError

  try:
    if FROM_HF.value and TO_WORKDIR.value and not (FROM_WORKDIR.value or TO_HF.value):
      out = hf_to_workdir(FROM_HF.value, TO_WORKDIR.value, scan_layers=SCAN_LAYERS.value,
                          param_dtype=PARAM_DTYPE.value, overwrite=OVERWRITE.value)
    elif FROM_WORKDIR.value and TO_HF.value and not (FROM_HF.value or TO_WORKDIR.value):
      out = workdir_to_hf(FROM_WORKDIR.value, TO_HF.value, tokenizer=TOKENIZER.value, dtype=HF_DTYPE.value)
    else:
      print("error: give --from_hf with --to_workdir, or --from_workdir with --to_hf", file=sys.stderr)
      return 2
  except (ConversionError, FileExistsError, FileNotFoundError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  print(f"wrote {out}")
  return 0


if __name__ == "__main__":
  app.run(main)
