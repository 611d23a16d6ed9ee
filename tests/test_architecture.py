"""ARCHITECTURE.md stays true: the layer table, no import cycle, no gin or flags in the library, the route."""

import ast
import importlib.util
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGE = (ROOT / "ARCHITECTURE.md").read_text()
AREAS = ("training", "inference", "convert", "workdir", "models", "attention", "kernels", "data", "sharding")


def _module(path: Path) -> str:
  parts = path.relative_to(ROOT).with_suffix("").parts
  return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path, text: str = "") -> list[tuple[str, bool]]:
  """(imported module or name, at module level?) of every import statement in a file (or in `text`)."""
  tree, module = ast.parse(text or path.read_text()), _module(path)
  package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
  top = {id(n) for n in tree.body}
  out = []
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      out += [(a.name, id(node) in top) for a in node.names]
    elif isinstance(node, ast.ImportFrom):
      base = importlib.util.resolve_name("." * node.level + (node.module or ""), package)
      out += [(base, id(node) in top)] + [(f"{base}.{a.name}", id(node) in top) for a in node.names]
  return out


def _area(module: str) -> str:
  return module.split(".")[1] if module.count(".") else ""


def _files() -> list[Path]:
  return sorted((ROOT / "t_jax").rglob("*.py"))


def _layer_table() -> dict[str, dict[str, tuple[bool, str]]]:
  """{area: {area it may import: (lazily only?, the one module allowed or '')}} from ARCHITECTURE.md's table."""
  table = {}
  for row in re.findall(r"^\| (`t_jax/.*)$", PAGE, re.M):
    folders, _, allowed = (c.strip() for c in row.strip("|").split(" | "))
    rules = {}
    for item in re.split(r"[,;] (?![^(]*\))", allowed):  # top-level commas and semicolons
      name, only = item.split()[0].strip("`"), re.search(r"`(\w+)\.py` only", item)
      if name in AREAS:
        rules[name] = ("lazily" in item, f"t_jax.{name}.{only.group(1)}" if only else "")
    for folder in re.findall(r"`t_jax/(\w+)", folders):
      table[folder] = rules
  return table


def _forbidden(overrides: dict[Path, str] = {}) -> list[str]:  # noqa: B006 - read only
  """The imports of t_jax modules the table does not allow (files' text replaced by `overrides`)."""
  table, wrong = _layer_table(), []
  for path in _files():
    area = _area(_module(path))
    for name, eager in _imports(path, overrides.get(path, "")):
      target = _area(name) if name.startswith("t_jax.") else None
      if target not in AREAS or target == area or not area:  # t_jax/__init__.py re-exports the API
        continue
      lazy_only, only = table[area].get(target, (False, None))
      if only is None or (eager and lazy_only) or (only and name != only and not name.startswith(only + ".")):
        wrong.append(f"{path.relative_to(ROOT)} imports {name}{'' if eager else ' (lazily)'}")
  return sorted(set(wrong))


def test_the_layer_table_covers_every_folder_and_the_imports_follow_it():
  assert set(_layer_table()) == set(AREAS)
  wrong = _forbidden()
  assert not wrong, "imports the ARCHITECTURE.md table does not allow:\n" + "\n".join(wrong)


def test_no_library_module_reads_gin_or_defines_flags():
  offenders = [f"{p.relative_to(ROOT)}: {name}" for p in _files() for name, _ in _imports(p)
               if name.split(".")[0] == "gin" or name.startswith("absl.flags")]
  assert not offenders


def test_no_import_cycle_between_modules():
  modules = {_module(p): p for p in _files()}
  graph = {m: {n for n, eager in _imports(p) if eager and n in modules and not m.startswith(n + ".") and n != m}
           for m, p in modules.items()}  # a module's own packages are already being imported: no cycle
  state: dict[str, int] = {}

  def visit(m: str, path: list[str]) -> None:
    state[m] = 1
    for n in graph[m]:
      assert state.get(n) != 1, "import cycle: " + " -> ".join(path[path.index(n):] + [n] if n in path else path)
      if n not in state:
        visit(n, path + [n])
    state[m] = 2

  for m in modules:
    if m not in state:
      visit(m, [m])


def test_every_file_and_function_the_page_names_exists():
  refs = re.findall(r"`([\w/]+\.py):(\w+)", PAGE)  # from the repository root, or from t_jax/
  assert len(refs) > 10
  for file, name in refs:
    path = ROOT / file if (ROOT / file).exists() else ROOT / "t_jax" / file
    defined = {n.name for n in ast.walk(ast.parse(path.read_text()))
               if isinstance(n, (ast.FunctionDef, ast.ClassDef))}
    assert name in defined, f"ARCHITECTURE.md names {file}:{name}, which does not exist"


_SPY = """
import importlib, json, sys, traceback
sys.path.insert(0, ".")
from absl import app
api = importlib.import_module("t_jax.attention.api")
from launch import train
stacks, real = [], api.xla_attention
def spy(*a, **kw):
  stacks.append([(f.filename, f.name) for f in traceback.extract_stack()])
  return real(*a, **kw)
api.xla_attention = spy
try:
  app.run(train.main)
finally:
  print("STACKS " + json.dumps(stacks))
"""


def test_one_training_step_reaches_the_attention_matmul_through_the_routes_files(tmp_path):
  """The files on the call stack from `python -m launch.train` to xla_attention in the train step are the
  route ARCHITECTURE.md lists, in order, and at most 6."""
  args = [sys.executable, "-c", _SPY, "--gin_file=experiments/quickstart_tiny.gin",
          "--gin_bindings=TrainConfig.num_steps=1", "--gin_bindings=TrainConfig.num_samples=0",
          f"--workdir={tmp_path / 'run'}"]
  out = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=600)
  line = next((x for x in out.stdout.splitlines() if x.startswith("STACKS ")), None)
  assert out.returncode == 0 and line, out.stderr[-2000:]
  stack = next(s for s in json.loads(line[7:]) if any(name == "train_step" for _, name in s))
  files = []
  for file, _ in stack:
    if file.startswith(str(ROOT)) and (rel := str(Path(file).relative_to(ROOT))) not in files:
      files.append(rel)
  files.append("t_jax/attention/xla.py")  # the spy stood in for it
  section = PAGE[PAGE.index("## The route of one training step"):PAGE.index("On the Pallas path")]
  listed = re.findall(r"^\d+\. `([\w/]+\.py)", section, re.M)
  assert files == listed
  assert len(files) <= 6 and f"(XLA path: {len(files)} files)" in section


@pytest.mark.parametrize("file, line", [
    ("t_jax/kernels/_blocks.py", "from t_jax.models import ModelConfig\n"),  # not in the kernels' row
    ("t_jax/kernels/_blocks.py", "from t_jax.attention.api import attention\n"),  # masks.py only
    ("t_jax/models/speech.py", "def f():\n  from t_jax.inference import generate\n"),  # not even lazily
    ("t_jax/attention/masks.py", "from t_jax.kernels import flash_attention\n"),  # lazily only
])
def test_the_table_check_catches_a_forbidden_import(file, line):
  path = ROOT / file
  wrong = _forbidden({path: path.read_text() + line})
  assert wrong and all(w.startswith(f"{file} imports ") for w in wrong)
