"""The package as a user gets it: a wheel built from this checkout, installed into a fresh virtual
environment outside the repository, with no path back to the checkout.

    from _wheel import wheel_venv  # noqa: F401  (a pytest fixture: importing it is enough)

    def test_something(wheel_venv, tmp_path):
      subprocess.run([wheel_venv.bin("mmearth-jax"), "synth", ...], cwd=tmp_path,
                     env=wheel_venv.env(), check=True)

`wheel_venv` is built once per test run and shared by every test and every pytest-xdist worker of
that run (a file lock in the run's common temporary folder: the first worker builds, the others
wait and reuse it); it is read-only by convention, install nothing more into it. Run commands
from a folder outside the repository (`tmp_path`) with `wheel_venv.env()` (CPU-only JAX, no
PYTHONPATH, the venv's bin/ first on PATH), and call its programs by full path
(`wheel_venv.python`, `wheel_venv.bin("mmearth-jax")`): the test venv's bin/ may be on PATH too.
To execute a notebook against it, start the kernel with `wheel_venv.python` (e.g. `python -m
ipykernel install --prefix DIR --name wheel` run with it, then papermill's `kernel_name="wheel"`
with JUPYTER_PATH=DIR/share/jupyter).

How it is made, and why:

  * The wheel is built with `pip wheel --no-deps --no-build-isolation` from a copy of the
    checkout (without .git, .venv, data, build outputs): setuptools' build/ folder keeps files
    that were deleted from the source, and building in place would race other builds.
  * The fresh venv gets the packages already installed in the test venv (so nothing is
    downloaded) through one `.pth` line naming a folder of links to the test venv's
    site-packages entries, less every trace of mmearth_jax (its editable finder, `.pth` and
    dist-info). A `.pth` line adds a folder to sys.path without running the `.pth` files in
    it, and the fresh venv's own site-packages comes first.
  * `pip install --no-index <wheel>[extras]` then resolves offline: it fails if a declared
    dependency is missing from, or at a version outside its range in, the test venv.
  * The builder checks that `import mmearth_jax` in the fresh venv finds the installed copy.
"""
from __future__ import annotations

import dataclasses
import glob
import os
import shutil
import subprocess
import sys
import sysconfig
import time

import pytest
from _env import REPO, cpu_env

EXTRAS = "torch"  # the wheel is installed with these extras (their dependencies must be there)
# Top-level entries of the checkout that are not sources (.gitignore's, and git's own).
_NOT_SOURCE = {".git", ".venv", "data", "build", "dist", "workdir", ".pytest_cache", "shared"}
_BUILT = "ok"  # written last: a complete build


@dataclasses.dataclass(frozen=True)
class WheelVenv:
  wheel: str  # the .whl file built from this checkout
  venv: str  # the virtual environment it is installed in

  @property
  def python(self) -> str:
    return self.bin("python")

  def bin(self, name: str) -> str:
    return os.path.join(self.venv, "bin", name)

  def env(self, devices: int = 1) -> dict:
    """`_env.cpu_env(devices)` without PYTHONPATH, with this venv activated."""
    env = cpu_env(devices)
    env.pop("PYTHONPATH", None)
    env["VIRTUAL_ENV"] = self.venv
    env["PATH"] = os.pathsep.join([os.path.join(self.venv, "bin"), env.get("PATH", "")])
    return env


def _copy_sources(dst: str) -> None:
  def ignore(folder, names):
    top = os.path.abspath(folder) == REPO
    return {n for n in names if n == "__pycache__" or n.endswith(".egg-info")
            or (top and n in _NOT_SOURCE)}
  shutil.copytree(REPO, dst, ignore=ignore, symlinks=True)


def _site_packages() -> list[str]:
  paths = [sysconfig.get_path("purelib"), sysconfig.get_path("platlib")]
  return list(dict.fromkeys(os.path.realpath(p) for p in paths))


def _hidden(entry: str) -> bool:
  """mmearth_jax's own entries (the package or its editable finder, dist-info and `.pth`), and
  every `.pth` file."""
  return "mmearth_jax" in entry.lower().replace("-", "_") or entry.endswith(".pth")


def _link_dependencies(folder: str) -> None:
  """`folder` gets a link to every entry of this interpreter's site-packages but the hidden ones
  (a `.pth` file does nothing outside a site folder anyway)."""
  os.makedirs(folder)
  for site in _site_packages():
    for entry in sorted(os.listdir(site)):
      link = os.path.join(folder, entry)
      if not _hidden(entry) and not os.path.lexists(link):
        os.symlink(os.path.join(site, entry), link)


def _run(cmd: list[str], log, **kwargs) -> None:
  start = time.monotonic()
  out = subprocess.run(cmd, capture_output=True, text=True, **kwargs)
  log(f"{time.monotonic() - start:5.1f} s  {' '.join(cmd[:4])} ...")
  if out.returncode != 0:
    raise RuntimeError(f"{' '.join(cmd)} failed ({out.returncode}):\n{out.stdout}\n{out.stderr}")


def build(root: str, extras: str = EXTRAS, log=print) -> WheelVenv:
  """Builds the wheel under `root`/wheel, the venv at `root`/venv, and installs the one into the
  other with `extras`. `root` must be empty or absent, and outside the repository."""
  root = os.path.abspath(root)
  assert not root.startswith(REPO + os.sep), f"{root} is inside the repository {REPO}"
  src, wheel_dir, venv = (os.path.join(root, n) for n in ("src", "wheel", "venv"))
  _copy_sources(src)
  env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
  _run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation",
        "-w", wheel_dir, src], log, env=env, cwd=root)
  (wheel,) = glob.glob(os.path.join(wheel_dir, "mmearth_jax-*.whl"))
  shutil.rmtree(src)
  _run([sys.executable, "-m", "venv", "--without-pip", venv], log, env=env, cwd=root)
  deps = os.path.join(root, "dependencies")
  _link_dependencies(deps)
  (site,) = glob.glob(os.path.join(venv, "lib", "python*", "site-packages"))
  with open(os.path.join(site, "test_venv_dependencies.pth"), "w") as f:
    f.write(deps + "\n")
  result = WheelVenv(wheel, venv)
  spec = f"{wheel}[{extras}]" if extras else wheel
  # pip itself comes from the linked dependencies; it installs into the running (fresh) venv.
  _run([result.python, "-m", "pip", "install", "--quiet", "--no-index", "--no-cache-dir", spec],
       log, env=result.env(), cwd=root)
  found = subprocess.run([result.python, "-c", "import mmearth_jax; print(mmearth_jax.__file__)"],
                         capture_output=True, text=True, env=result.env(), cwd=root, check=True)
  if not found.stdout.strip().startswith(venv + os.sep):
    raise RuntimeError(f"the fresh venv imports mmearth_jax from {found.stdout.strip()}, not "
                       f"from {venv}")
  return result


@pytest.fixture(scope="session")
def wheel_venv(tmp_path_factory) -> WheelVenv:
  """The wheel of this checkout installed with its `torch` extra in a fresh venv: one per run,
  shared by the xdist workers (see the module docstring)."""
  from filelock import FileLock
  base = tmp_path_factory.getbasetemp()
  shared = base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base  # common to workers
  root = shared / "mmearth_jax_wheel_venv"
  with FileLock(str(root) + ".lock"):
    if not (root / _BUILT).exists():
      shutil.rmtree(root, ignore_errors=True)  # a build that failed half-way
      build(str(root))
      (root / _BUILT).write_text("")
  (wheel,) = glob.glob(str(root / "wheel" / "mmearth_jax-*.whl"))
  return WheelVenv(wheel, str(root / "venv"))
