"""The import rules of the package, checked on the source (nothing is imported), and one check
in a fresh interpreter without PyTorch:

  * no import cycle between mmearth_jax modules (module-level and function-level imports);
  * no private name (`_x`) of one mmearth_jax module used by another, by `from ... import _x`
    or as an attribute of an imported module (library code and benchmarks);
  * layers import downward only: cli -> train -> eval -> pretrained -> methods -> objectives ->
    models -> ops; `data` imports none of those above `ops`;
  * `mmearth_jax.models.*` imports nothing from `mmearth_jax.data`, `.eval` or `.train`;
  * `mmearth_jax.bands` imports nothing from mmearth_jax;
  * no library module imports `mmearth_jax.testing` (the fake-dataset writers of tests/demos);
  * the recipes (`configs/`, installed as `mmearth_jax.configs`) import only
    `mmearth_jax.config_lib` and `mmearth_jax.models.variants`, plus `mmearth_jax.interop.*`
    lazily (inside a function or under `if __name__ == "__main__"`: the torch helpers);
  * torch (an extra) is imported at module level only by `mmearth_jax.interop.*`, and nothing
    else imports `mmearth_jax.interop` at module level; without torch, the command line,
    training, evaluation and embeddings of our own checkpoints run, and reading or writing a
    PyTorch file fails naming the extra to install.

`from pkg import sub` is an edge to the submodule `pkg.sub`; a package importing its own
submodule is an ordinary edge (no cycle unless the submodule imports the package back).
"""
from __future__ import annotations

import ast
import dataclasses
import json
import os
import pkgutil
import subprocess
import sys

import pytest
from _env import cpu_env

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = "mmearth_jax"
PACKAGE_DIR = os.path.join(ROOT, PACKAGE)
CONFIGS_DIR = os.path.join(ROOT, "configs")  # installed as mmearth_jax.configs (setup.py)
BENCHMARKS_DIR = os.path.join(ROOT, "benchmarks")


def _walk(path: str, prefix: str) -> dict[str, str]:
  """{module name: file} of every module below `path`, found without importing anything
  (`pkgutil.walk_packages` would import each subpackage to recurse into it)."""
  out = {}
  init = os.path.join(path, "__init__.py")
  if os.path.exists(init):
    out[prefix.rstrip(".")] = init
  for info in pkgutil.iter_modules([path]):
    if info.ispkg:
      out.update(_walk(os.path.join(path, info.name), f"{prefix}{info.name}."))
    else:
      out[prefix + info.name] = os.path.join(path, f"{info.name}.py")
  return out


MODULES = {**_walk(PACKAGE_DIR, f"{PACKAGE}."), **_walk(CONFIGS_DIR, f"{PACKAGE}.configs.")}


@dataclasses.dataclass
class Import:
  target: str  # the mmearth_jax module imported (a submodule when `from pkg import sub`)
  name: str | None  # the name taken from it by `from target import name` (None: the module)
  lazy: bool  # inside a function (or under `if __name__ == "__main__"`)
  line: int


def _is_package(module: str) -> bool:
  return os.path.basename(MODULES[module]) == "__init__.py"


def _resolve(module: str, level: int, name: str | None) -> str:
  """The absolute module of a (possibly relative) `from` import inside `module`."""
  if not level:
    return name or ""
  base = module.split(".")
  base = base if _is_package(module) else base[:-1]
  base = base[:len(base) - level + 1]
  return ".".join(base + ([name] if name else []))


def _is_main_guard(node: ast.AST) -> bool:
  """`if __name__ == "__main__":` (a script's entry point runs only when it is executed)."""
  return (isinstance(node, ast.If) and isinstance(node.test, ast.Compare)
          and isinstance(node.test.left, ast.Name) and node.test.left.id == "__name__"
          and len(node.test.comparators) == 1
          and isinstance(node.test.comparators[0], ast.Constant)
          and node.test.comparators[0].value == "__main__")


def _scan(module: str, source: str | None = None
          ) -> tuple[list[Import], dict[str, str], ast.AST]:
  """Imports of mmearth_jax modules in `module` (its file, or `source`), and {local name:
  module} of the names bound to mmearth_jax modules (for attribute checks)."""
  if source is None:
    source = open(MODULES[module]).read()
  tree = ast.parse(source, MODULES.get(module, module))
  imports: list[Import] = []
  aliases: dict[str, str] = {}

  def visit(node: ast.AST, lazy: bool) -> None:
    for child in ast.iter_child_nodes(node):
      inner = lazy or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)) or (
          _is_main_guard(child))
      if isinstance(child, ast.Import):
        for a in child.names:
          if a.name == PACKAGE or a.name.startswith(PACKAGE + "."):
            imports.append(Import(a.name, None, lazy, child.lineno))
            if a.asname:
              aliases[a.asname] = a.name
            else:  # `import a.b.c` binds `a`; attribute chains are resolved below
              aliases[a.name.split(".")[0]] = a.name.split(".")[0]
      elif isinstance(child, ast.ImportFrom):
        src = _resolve(module, child.level, child.module)
        if src == PACKAGE or src.startswith(PACKAGE + "."):
          for a in child.names:
            sub = f"{src}.{a.name}"
            if sub in MODULES:
              imports.append(Import(sub, None, lazy, child.lineno))
              aliases[a.asname or a.name] = sub
            else:
              imports.append(Import(src, a.name, lazy, child.lineno))
      visit(child, inner)

  visit(tree, False)
  return imports, aliases, tree


def _module_of(node: ast.AST, aliases: dict[str, str]) -> str | None:
  """The mmearth_jax module an expression such as `M` or `mmearth_jax.data.pipeline` names."""
  if isinstance(node, ast.Name):
    return aliases.get(node.id)
  if isinstance(node, ast.Attribute):
    base = _module_of(node.value, aliases)
    if base is not None and f"{base}.{node.attr}" in MODULES:
      return f"{base}.{node.attr}"
  return None


def _private(name: str) -> bool:
  return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


SCANNED = {m: _scan(m) for m in MODULES}


def _graph() -> dict[str, set[str]]:
  graph: dict[str, set[str]] = {m: set() for m in MODULES}
  for m, (imports, _, _) in SCANNED.items():
    for imp in imports:
      if imp.target in MODULES and imp.target != m:
        graph[m].add(imp.target)
  return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
  """The strongly connected components with more than one module (Tarjan), sorted."""
  index: dict[str, int] = {}
  low: dict[str, int] = {}
  stack: list[str] = []
  on_stack: set[str] = set()
  out: list[list[str]] = []

  def connect(v: str) -> None:
    index[v] = low[v] = len(index)
    stack.append(v)
    on_stack.add(v)
    for w in sorted(graph[v]):
      if w not in index:
        connect(w)
        low[v] = min(low[v], low[w])
      elif w in on_stack:
        low[v] = min(low[v], index[w])
    if low[v] == index[v]:
      comp = []
      while True:
        w = stack.pop()
        on_stack.discard(w)
        comp.append(w)
        if w == v:
          break
      if len(comp) > 1:
        out.append(sorted(comp))

  for v in sorted(graph):
    if v not in index:
      connect(v)
  return sorted(out)


def _private_uses(file: str, module: str, imports: list[Import], aliases: dict[str, str],
                  tree: ast.AST) -> list[str]:
  found = []
  for imp in imports:
    if imp.name is not None and _private(imp.name) and imp.target != module:
      found.append(f"{file}:{imp.line}: from {imp.target} import {imp.name}")
  for node in ast.walk(tree):
    if isinstance(node, ast.Attribute) and _private(node.attr):
      target = _module_of(node.value, aliases)
      if target is not None and target != module:
        found.append(f"{file}:{node.lineno}: {target}.{node.attr}")
  return found


def _relative(path: str) -> str:
  return os.path.relpath(path, ROOT)


def test_the_walk_finds_the_package():
  for m in ("mmearth_jax.bands", "mmearth_jax.modalities", "mmearth_jax.models.vit",
            "mmearth_jax.eval.datasets", "mmearth_jax.testing", "mmearth_jax.configs.mp_mae"):
    assert m in MODULES, m


def test_the_checks_see_cycles_edges_and_private_uses():
  assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
  graph = _graph()
  assert "mmearth_jax.bands" in graph["mmearth_jax.modalities"]  # `from pkg import submodule`
  assert "mmearth_jax.ops.resize" in graph["mmearth_jax.eval.datasets"]
  probe = ("from mmearth_jax.ops import resize as R\n"
           "def f():\n  from mmearth_jax.models.vit import _x\n  return R._matrix\n")
  imports, aliases, tree = _scan("probe", probe)
  assert [(i.target, i.name, i.lazy) for i in imports] == [
      ("mmearth_jax.ops.resize", None, False), ("mmearth_jax.models.vit", "_x", True)]
  assert _private_uses("probe.py", "probe", imports, aliases, tree) == [
      "probe.py:3: from mmearth_jax.models.vit import _x",
      "probe.py:4: mmearth_jax.ops.resize._matrix"]


def test_no_import_cycle():
  cycles = _cycles(_graph())
  assert not cycles, "import cycles between modules:\n" + "\n".join(" <-> ".join(c)
                                                                     for c in cycles)


def test_no_private_name_crosses_modules():
  found = []
  for m, (imports, aliases, tree) in SCANNED.items():
    found += _private_uses(_relative(MODULES[m]), m, imports, aliases, tree)
  assert not found, "private names used across modules:\n" + "\n".join(found)


def test_benchmarks_use_no_private_name():
  """Neither of mmearth_jax nor of another benchmark script (they import each other's helpers)."""
  found = []
  scripts = sorted(n[:-3] for n in os.listdir(BENCHMARKS_DIR) if n.endswith(".py"))
  for name in scripts:
    path = os.path.join(BENCHMARKS_DIR, f"{name}.py")
    imports, aliases, tree = _scan(f"benchmarks.{name}", open(path).read())
    found += _private_uses(_relative(path), f"benchmarks.{name}", imports, aliases, tree)
    for node in ast.walk(tree):
      if isinstance(node, ast.ImportFrom) and node.module in scripts and node.module != name:
        found += [f"{_relative(path)}:{node.lineno}: from {node.module} import {a.name}"
                  for a in node.names if _private(a.name)]
  assert not found, "private names of mmearth_jax used by benchmarks:\n" + "\n".join(found)


@pytest.mark.parametrize("layer", ["mmearth_jax.data", "mmearth_jax.eval", "mmearth_jax.train"])
def test_models_import_no_data_eval_or_train(layer):
  bad = [f"{_relative(MODULES[m])}:{imp.line}: {imp.target}"
         for m, (imports, _, _) in SCANNED.items() if m.startswith("mmearth_jax.models.")
         for imp in imports if imp.target == layer or imp.target.startswith(layer + ".")]
  assert not bad, f"models import {layer}:\n" + "\n".join(bad)


# The README's "Imports run one way", top to bottom.
LAYERS = ("cli", "train", "eval", "pretrained", "methods", "objectives", "models", "ops")


def _layer(module: str) -> int | None:
  for i, name in enumerate(LAYERS):
    if module == f"{PACKAGE}.{name}" or module.startswith(f"{PACKAGE}.{name}."):
      return i
  return None


def test_layers_import_downward_only():
  bad = []
  for m, (imports, _, _) in SCANNED.items():
    here = LAYERS.index("ops") if m.startswith(f"{PACKAGE}.data.") else _layer(m)
    for imp in imports:
      there = _layer(imp.target)
      if here is not None and there is not None and there < here:
        bad.append(f"{_relative(MODULES[m])}:{imp.line}: {imp.target}")
  assert not bad, ("imports against the layer order " + " -> ".join(LAYERS) + ":\n"
                   + "\n".join(bad))


def test_bands_import_nothing_of_the_package():
  imports, _, _ = SCANNED["mmearth_jax.bands"]
  assert not imports, [imp.target for imp in imports]


def test_library_never_imports_testing():
  bad = [f"{_relative(MODULES[m])}:{imp.line}"
         for m, (imports, _, _) in SCANNED.items() if m != "mmearth_jax.testing"
         for imp in imports if imp.target == "mmearth_jax.testing"]
  assert not bad, "library modules import mmearth_jax.testing:\n" + "\n".join(bad)


CONFIG_IMPORTS = ("mmearth_jax.config_lib", "mmearth_jax.models.variants")


def test_configs_import_only_config_lib_and_variants():
  bad = []
  for m, (imports, _, _) in SCANNED.items():
    if not m.startswith("mmearth_jax.configs."):
      continue
    for imp in imports:
      ok = imp.target in CONFIG_IMPORTS or (imp.lazy and imp.target.startswith(
          "mmearth_jax.interop."))
      if not ok:
        bad.append(f"{_relative(MODULES[m])}:{imp.line}: {imp.target}"
                   f"{'' if imp.name is None else ' import ' + imp.name}"
                   f"{' (in a function)' if imp.lazy else ''}")
  assert not bad, "configs import more than config_lib / models.variants:\n" + "\n".join(bad)


# ---------------------------------------------------------------------------------------------
# PyTorch is an extra (`pip install 'mmearth_jax[torch]'`): only mmearth_jax.interop imports it.


def _torch_imports(tree: ast.AST) -> list[tuple[str, int, bool]]:
  """(module, line, lazy) of every import of torch or of a torch submodule in `tree`."""
  found = []

  def visit(node: ast.AST, lazy: bool) -> None:
    for child in ast.iter_child_nodes(node):
      inner = lazy or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)) or (
          _is_main_guard(child))
      names = ([a.name for a in child.names] if isinstance(child, ast.Import) else
               [child.module or ""] if isinstance(child, ast.ImportFrom) and not child.level else
               [])
      found.extend((n, child.lineno, lazy) for n in names
                   if n == "torch" or n.startswith("torch.") or n == "safetensors.torch")
      visit(child, inner)

  visit(tree, False)
  return found


def test_only_interop_imports_torch_at_module_level():
  """Outside mmearth_jax.interop, torch (and interop itself) is imported inside the functions
  that read or write a PyTorch file, so the rest of the package imports without the extra."""
  bad = []
  for m, (imports, _, tree) in SCANNED.items():
    if m == "mmearth_jax.interop" or m.startswith("mmearth_jax.interop."):
      continue
    bad += [f"{_relative(MODULES[m])}:{line}: {name}" for name, line, lazy in _torch_imports(tree)
            if not lazy]
    bad += [f"{_relative(MODULES[m])}:{imp.line}: {imp.target}" for imp in imports
            if not imp.lazy and imp.target.startswith("mmearth_jax.interop")]
  assert not bad, "module-level imports of torch outside mmearth_jax.interop:\n" + "\n".join(bad)


# Run in a fresh interpreter in which `import torch` fails as if torch were not installed.
WITHOUT_TORCH = r"""
import sys
sys.modules["torch"] = None  # `import torch` now raises ModuleNotFoundError (name "torch")
import contextlib, importlib, io, json, os, pkgutil
import numpy as np

shards, tmp = sys.argv[1:3]
import mmearth_jax.eval
modules = ["mmearth_jax.cli", "mmearth_jax.pretrained", "mmearth_jax.train",
           *(m.name for m in pkgutil.iter_modules(mmearth_jax.eval.__path__, "mmearth_jax.eval."))]
for name in modules:
  importlib.import_module(name)

import jax
import jax.numpy as jnp
from mmearth_jax import cli, pretrained

spec = {"arch": "convnextv2", "depths": [1, 1, 1, 1], "dims": [8, 16, 16, 16], "stem": "mmearth",
        "patch_size": 8, "in_chans": 3, "num_classes": 0, "bands": ["B4", "B3", "B2"]}
params = pretrained.build(spec).init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)))["params"]
model = pretrained.save(os.path.join(tmp, "model"), spec, params, source="test")
np.save(os.path.join(tmp, "tiles.npy"), np.zeros((2, 32, 32, 3), np.float32))
from safetensors.numpy import save_file  # numpy only: safetensors itself needs no torch
save_file({"stem.0.weight": np.zeros((8, 3, 4, 4), np.float32)}, os.path.join(tmp, "w.safetensors"))

def run(*argv):
  err = io.StringIO()
  with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
    code = cli.main(argv)
  return [code, err.getvalue()]

out = {
    "imported": modules,
    "embed": run("embed", "--checkpoint", model, "--images", os.path.join(tmp, "tiles.npy"),
                 "--normalised", "--out", os.path.join(tmp, "emb.npy")),
    "knn": run("knn", "--checkpoint", model, "--dataset", "mmearth:" + shards, "--k", "3"),
    "to-torch": run("to-torch", "--checkpoint", model, "--layout", "mmearth",
                    "--out", os.path.join(tmp, "m.pth")),
    "from-torch safetensors": run("from-torch", "--checkpoint", os.path.join(tmp, "w.safetensors"),
                                  "--out", os.path.join(tmp, "imported")),
    "torch still absent": sys.modules["torch"] is None,
}
try:
  import mmearth_jax.interop.torch_io
except ModuleNotFoundError as e:
  out["import torch_io"] = [e.name, e.msg]
print(json.dumps(out))
"""


def test_without_torch_the_package_runs_and_torch_files_name_the_extra(shards64, tmp_path):
  out = subprocess.run([sys.executable, "-c", WITHOUT_TORCH, shards64, str(tmp_path)],
                       env=cpu_env(1), cwd=tmp_path, capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stderr
  got = json.loads(out.stdout.strip().splitlines()[-1])
  assert {"mmearth_jax.eval.knn", "mmearth_jax.eval.segmentation"} <= set(got["imported"])
  assert got["embed"] == [0, ""] and got["knn"][0] == 0, got
  assert (tmp_path / "emb.npy").exists() and got["torch still absent"]
  hint = "pip install 'mmearth_jax[torch]'"
  for command in ("to-torch", "from-torch"):
    code, err = got[command if command == "to-torch" else "from-torch safetensors"]
    assert code == 2 and err.startswith(f"mmearth-jax {command}: error: PyTorch is not installed")
    assert hint in err and "Traceback" not in err, err
  assert not (tmp_path / "m.pth").exists() and not (tmp_path / "imported").exists()
  name, msg = got["import torch_io"]
  assert name == "torch" and hint in msg
