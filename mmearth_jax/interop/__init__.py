"""PyTorch interop: reading and writing PyTorch checkpoints, the layout converters and the
plain-PyTorch reference models.

Every module here needs PyTorch, which is an extra (`pip install 'mmearth_jax[torch]'`); the rest
of the package (training, evaluation, embeddings of our own checkpoints) imports this package
only inside the functions that read or write a PyTorch file. Without PyTorch, importing any
module of this package raises `ModuleNotFoundError` (name "torch") with `TORCH_MISSING`.
"""

TORCH_MISSING = ("PyTorch is not installed, and reading or writing PyTorch checkpoints (.pth, "
                 ".pt, .bin, .ckpt, .safetensors) needs it: pip install 'mmearth_jax[torch]'")


def _require_torch() -> None:
  try:
    import torch  # noqa: F401
  except ModuleNotFoundError as e:
    if e.name != "torch":  # torch is there but something it needs is not: say that instead
      raise
    raise ModuleNotFoundError(TORCH_MISSING, name="torch") from None


_require_torch()
