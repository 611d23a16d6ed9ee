"""Convert between Hugging Face checkpoint directories and t_jax params workdirs.

  python -m launch.convert --from_hf=HF_DIR --to_workdir=WORKDIR
  python -m launch.convert --from_workdir=WORKDIR --to_hf=HF_DIR [--tokenizer=spm.model]
  python -m launch.convert --from_workdir=RUN --to_workdir=OUT      # a run's params (LoRA merged) as a workdir

A workdir holds config.gin (ModelConfig bindings) and params/ (Orbax); see t_jax/workdir.py.
The source HF config is kept as WORKDIR/hf_config.json so the reverse trip restores its special ids, and its
tokenizer files as WORKDIR/hf_tokenizer/ (`t_jax.load` returns that tokenizer; --to_hf writes it back).
Bad input exits 2 with one `error:` line naming the file; existing outputs are only replaced with --overwrite.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Optional

from absl import app, flags, logging

from launch import error_line

FROM_HF = flags.DEFINE_string("from_hf", None, "HF checkpoint directory (config.json + weights).")
TO_WORKDIR = flags.DEFINE_string("to_workdir", None, "t_jax workdir to write (config.gin + params/).")
FROM_WORKDIR = flags.DEFINE_string("from_workdir", None, "t_jax workdir to read.")
TO_HF = flags.DEFINE_string("to_hf", None, "HF directory to write (config.json + model.safetensors).")
TOKENIZER = flags.DEFINE_string("tokenizer", None, "SentencePiece model (or HF tokenizer directory) copied beside "
                                "the HF export; default: the workdir's hf_tokenizer/ when it has one.")
SCAN_LAYERS = flags.DEFINE_bool("scan_layers", False, "Store the imported layers stacked (scan_layers=True).")
PARAM_DTYPE = flags.DEFINE_enum("param_dtype", "float32", ["float32", "bfloat16", "float16"],
                                "Parameter dtype of the imported model.")
HF_DTYPE = flags.DEFINE_enum("hf_dtype", "float32", ["float32", "bfloat16", "float16"], "Dtype of exported weights.")
OVERWRITE = flags.DEFINE_bool("overwrite", False, "Replace the files of an existing workdir or HF directory.")

HF_CONFIG = "hf_config.json"
TOKEN_FIELDS = ("pad_token_id", "bos_token_id", "eos_token_id", "decoder_start_token_id")
WORKDIR_FILES = ("config.gin", "params", HF_CONFIG, "hf_tokenizer")  # what hf_to_workdir writes
HF_FILES = ("config.json", "model.safetensors", "tokenizer.model", "tokenizer.json")  # what workdir_to_hf writes


def hf_to_workdir(hf_dir: str, workdir: str, *, scan_layers: bool = False, param_dtype: str = "float32",
                  overwrite: bool = False) -> Path:
  """HF checkpoint directory -> t_jax workdir; returns the workdir."""
  from t_jax.convert import from_hf, write_params_workdir
  from t_jax.data.hf_tokenizer import HF_TOKENIZER_DIR, HFTokenizer, is_hf_tokenizer_dir

  _refuse_existing(workdir, WORKDIR_FILES, overwrite)
  model, params = from_hf(hf_dir, overrides=dict(scan_layers=scan_layers, param_dtype=param_dtype))
  tok = HFTokenizer.load(hf_dir) if is_hf_tokenizer_dir(hf_dir) else None  # read before anything is written
  root = write_params_workdir(workdir, model.cfg, params, overwrite=overwrite)
  (root / HF_CONFIG).write_text((Path(hf_dir) / "config.json").read_text())
  if tok is not None:  # the checkpoint's own tokenizer: t_jax.load(workdir) returns it
    tok.save(root / HF_TOKENIZER_DIR)
  return root


def workdir_to_hf(workdir: str, hf_dir: str, *, tokenizer: Optional[str] = None, dtype: str = "float32",
                  overwrite: bool = False) -> Path:
  """t_jax workdir -> HF directory; special ids come from WORKDIR/hf_config.json when present."""
  from t_jax.convert import ConversionError, to_hf
  from t_jax.models.lora import merge_lora
  from t_jax.workdir import PARAMS_DIR, params_target, read_config, read_params

  _refuse_existing(hf_dir, HF_FILES, overwrite)
  cfg, _ = read_config(workdir)
  root = Path(workdir).absolute()
  try:
    cfg, params = merge_lora(cfg, read_params(root, params_target(cfg)))  # LoRA adapters folded in
  except Exception as e:  # noqa: BLE001 - orbax reports truncated or corrupt files as anything
    if isinstance(e, ValueError) and str(root) in str(e):
      raise  # t_jax.workdir's own errors name the checkpoint
    cause = e
    while cause.__cause__ is not None:  # tensorstore's own error says which array and byte range
      cause = cause.__cause__
    where = root / ("checkpoints" if (root / "checkpoints").is_dir() else PARAMS_DIR)
    raise ConversionError(f"{where} cannot be read (truncated or corrupt?): {type(cause).__name__}: "
                          f"{error_line(cause)[:300]}") from e
  token_ids = None
  source = Path(workdir) / HF_CONFIG
  if source.is_file():
    try:
      hf = json.loads(source.read_text())
      token_ids = {k: hf[k] for k in TOKEN_FIELDS if k in hf}
    except (ValueError, TypeError) as e:
      raise ConversionError(f"{source}: invalid JSON ({e})") from e
  if tokenizer is None and (Path(workdir) / "hf_tokenizer").is_dir():  # an imported checkpoint's tokenizer
    tokenizer = str(Path(workdir) / "hf_tokenizer")
  return to_hf(cfg, params, hf_dir, tokenizer=tokenizer, token_ids=token_ids, dtype=dtype)


def _refuse_existing(directory: str, names: tuple[str, ...], overwrite: bool) -> None:
  """FileExistsError unless `overwrite` or `directory` holds none of `names`."""
  existing = [n for n in names if (Path(directory) / n).exists()]
  if existing and not overwrite:
    raise FileExistsError(f"{directory} already holds {', '.join(existing)}; pass --overwrite to replace them")


def main(argv: list[str]) -> int:
  """Entry point: exactly one of --from_hf/--to_workdir, --from_workdir/--to_hf or --from_workdir/--to_workdir."""
  del argv
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.FATAL)  # orbax logs reads, writes and bad files; errors are reported below
  try:
    if FROM_HF.value and TO_WORKDIR.value and not (FROM_WORKDIR.value or TO_HF.value):
      out = hf_to_workdir(FROM_HF.value, TO_WORKDIR.value, scan_layers=SCAN_LAYERS.value,
                          param_dtype=PARAM_DTYPE.value, overwrite=OVERWRITE.value)
    elif FROM_WORKDIR.value and TO_HF.value and not (FROM_HF.value or TO_WORKDIR.value):
      out = workdir_to_hf(FROM_WORKDIR.value, TO_HF.value, tokenizer=TOKENIZER.value, dtype=HF_DTYPE.value,
                          overwrite=OVERWRITE.value)
    elif FROM_WORKDIR.value and TO_WORKDIR.value and not (FROM_HF.value or TO_HF.value):
      from t_jax.training.finetune import export_params

      _refuse_existing(TO_WORKDIR.value, WORKDIR_FILES, OVERWRITE.value)
      out = export_params(FROM_WORKDIR.value, TO_WORKDIR.value, overwrite=OVERWRITE.value)
    else:
      print("error: give --from_hf with --to_workdir, or --from_workdir with --to_hf or --to_workdir",
            file=sys.stderr)
      return 2
  except (ValueError, OSError) as e:  # ConversionError is a ValueError
    print(f"error: {error_line(e)}", file=sys.stderr)
    return 2
  print(f"wrote {out}")
  return 0


if __name__ == "__main__":
  app.run(main)
