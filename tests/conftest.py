"""Shared fixtures: small built-in samples and their converted shards, made once per session."""
import os
import re

# Before jax is imported anywhere: 8 simulated CPU devices, so sharding runs on a real mesh.
os.environ["XLA_FLAGS"] = (re.sub(r"--xla_force_host_platform_device_count=\d+", "",
                                  os.environ.get("XLA_FLAGS", "")) +
                           " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import pytest  # noqa: E402

from mmearth_jax.data import convert, synth  # noqa: E402


@pytest.fixture(scope="session")
def sample64(tmp_path_factory):
  """48 tiles of 64 px in the upstream layout."""
  folder = str(tmp_path_factory.mktemp("sample64"))
  synth.write_sample(folder, n=48, size=64, seed=0)
  return folder


@pytest.fixture(scope="session")
def shards64(sample64, tmp_path_factory):
  out = str(tmp_path_factory.mktemp("shards64"))
  convert.convert(sample64, out, shards=3, log=lambda *a: None)
  return out


@pytest.fixture(scope="session")
def sample128(tmp_path_factory):
  folder = str(tmp_path_factory.mktemp("sample128"))
  synth.write_sample(folder, n=8, size=128, seed=1)
  return folder


@pytest.fixture(scope="session")
def shards128(sample128, tmp_path_factory):
  out = str(tmp_path_factory.mktemp("shards128"))
  convert.convert(sample128, out, shards=2, log=lambda *a: None)
  return out


@pytest.fixture(scope="module")
def jax_compilation_cache(tmp_path_factory):
  """JAX's persistent compilation cache, in a fresh folder, for one module's duration (off again
  afterwards): a program the module compiles a second time in this process (the same training
  config run again, a periodic evaluation's features function jitted again) is loaded instead of
  compiled. What runs is the same executable either way."""
  import jax
  from jax.experimental.compilation_cache import compilation_cache as cc
  path = str(tmp_path_factory.mktemp("jax_cache"))
  old = jax.config.jax_compilation_cache_dir
  jax.config.update("jax_compilation_cache_dir", path)
  cc.reset_cache()  # the cache is set up once per process; make it see the new folder
  yield path
  jax.config.update("jax_compilation_cache_dir", old)
  cc.reset_cache()
