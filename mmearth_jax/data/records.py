"""The ArrayRecord record encoding (format version 1). No pickle: any language can read it.

One record is one tile:

    bytes 0..3    magic  b"MMEJ"
    bytes 4..7    header length L, uint32 little-endian
    bytes 8..8+L  header, UTF-8 JSON: {"meta": {...}, "arrays": [[name, dtype, shape, offset], ...]}
    then          the arrays' raw C-order bytes, each starting at `offset` (from the record start,
                  a multiple of 16) in the stated numpy dtype string (explicit byte order).

`meta` holds the tile's identity (`tile_id`, `S2_type`, source `row`) and tile_info.json's
`S2_type` (`tile_info_S2_type`, read by `data.upstream_compat`). Decoding is zero-copy: the arrays
are read-only views into the record's bytes.
"""
from __future__ import annotations

import json
import struct
from typing import Any, Mapping

import numpy as np

MAGIC = b"MMEJ"
FORMAT_VERSION = 1
_ALIGN = 16


def encode(arrays: Mapping[str, np.ndarray], meta: Mapping[str, Any]) -> bytes:
  """Encodes named arrays and a small JSON-able `meta` dict into one record."""
  entries, blobs = [], []
  # Offsets are relative to the data section until the header length is known.
  offset = 0
  for name, arr in arrays.items():
    arr = np.asarray(arr, order="C")  # (ascontiguousarray would turn 0-d into 1-d)
    dtype = arr.dtype.newbyteorder("<") if arr.dtype.byteorder == ">" else arr.dtype
    arr = arr.astype(dtype, copy=False)
    entries.append([name, dtype.str, list(arr.shape), offset])
    blobs.append(arr.tobytes())
    offset += _pad(len(blobs[-1]))
  header = {"meta": dict(meta), "arrays": entries}
  # The header's own length changes the data offsets: fix the data start first.
  probe = json.dumps(header, separators=(",", ":")).encode()
  start = _pad(8 + len(probe) + 16 + 8 * len(entries))
  for e in entries:
    e[3] += start
  head = json.dumps(header, separators=(",", ":")).encode()
  if 8 + len(head) > start:  # never happens with the slack above, but never write overlap
    raise AssertionError("record header overflow")
  out = bytearray(start + offset)
  out[0:4] = MAGIC
  out[4:8] = struct.pack("<I", len(head))
  out[8:8 + len(head)] = head
  for e, blob in zip(entries, blobs):
    out[e[3]:e[3] + len(blob)] = blob
  return bytes(out)


def decode(record: bytes) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
  """Decodes one record into (arrays, meta)."""
  if record[:4] != MAGIC:
    raise ValueError("not an mmearth_jax record (bad magic); was this shard written by "
                     "`mmearth-jax convert`?")
  (n,) = struct.unpack_from("<I", record, 4)
  header = json.loads(record[8:8 + n])
  arrays = {}
  for name, dtype, shape, offset in header["arrays"]:
    dt = np.dtype(dtype)
    count = int(np.prod(shape)) if shape else 1
    arrays[name] = np.frombuffer(record, dt, count, offset).reshape(tuple(shape))
  return arrays, header["meta"]


def _pad(n: int) -> int:
  return (n + _ALIGN - 1) // _ALIGN * _ALIGN
