"""The import rules of the package, checked on the source (nothing is imported):

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
    lazily (inside a function or under `if __name__ == "__main__"`: the torch helpers).

`from pkg import sub` is an edge to the submodule `pkg.sub`; a package importing its own
submodule is an ordinary edge (no cycle unless the submodule imports the package back).
"""
from __future__ import annotations

import ast
import dataclasses
import os
import pkgutil

import pytest

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
