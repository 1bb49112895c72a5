"""Write legacy-format PyTorch files without torch, opcode by opcode (test data for melcore.torchfile).

``write_legacy_state_dict`` produces what ``torch.save(state_dict, f,
_use_new_zipfile_serialization=False)`` writes for float32/int64 tensors; ``object_pickle``
lets a test put any pickle (e.g. one naming a forbidden global) in the object's place.
"""

from __future__ import annotations

import pickle
import struct

import numpy as np

_MAGIC = 0x1950A86A20F9469CFC6C
_STORAGE = {np.dtype("float32"): "FloatStorage", np.dtype("int64"): "LongStorage", np.dtype("int32"): "IntStorage"}


def _global(module: str, name: str) -> bytes:
    return pickle.GLOBAL + f"{module}\n{name}\n".encode()


def _unicode(text: str) -> bytes:
    data = text.encode()
    return pickle.BINUNICODE + struct.pack("<I", len(data)) + data


def _int(value: int) -> bytes:
    return pickle.BININT + struct.pack("<i", int(value))


def _tuple(items: list[bytes]) -> bytes:
    return pickle.MARK + b"".join(items) + pickle.TUPLE


def _state_dict_pickle(tensors: dict[str, np.ndarray]) -> tuple[bytes, list[str]]:
    out = [
        pickle.PROTO + b"\x02",
        _global("collections", "OrderedDict"),
        pickle.EMPTY_TUPLE,
        pickle.REDUCE,
        pickle.MARK,
    ]
    keys = []
    for i, (name, array) in enumerate(tensors.items()):
        key = str(1000 + i)
        keys.append(key)
        storage_type = _STORAGE[np.asarray(array).dtype]
        persistent = (
            _tuple(
                [
                    _unicode("storage"),
                    _global("torch", storage_type),
                    _unicode(key),
                    _unicode("cpu"),
                    _int(np.asarray(array).size),
                    pickle.NONE,
                ]
            )
            + pickle.BINPERSID
        )
        shape = np.asarray(array).shape
        strides = [int(np.prod(shape[j + 1 :])) for j in range(len(shape))]
        args = _tuple(
            [
                persistent,
                _int(0),
                _tuple([_int(s) for s in shape]),
                _tuple([_int(s) for s in strides]),
                pickle.NEWFALSE,
                _global("collections", "OrderedDict") + pickle.EMPTY_TUPLE + pickle.REDUCE,
            ]
        )
        out += [_unicode(name), _global("torch._utils", "_rebuild_tensor_v2"), args, pickle.REDUCE]
    out += [pickle.SETITEMS, pickle.STOP]
    return b"".join(out), keys


def write_legacy_state_dict(path, tensors: dict[str, np.ndarray], *, object_pickle: bytes | None = None) -> None:
    """Write ``tensors`` as a legacy PyTorch state dict; ``object_pickle`` replaces the object pickle."""
    tensors = {k: np.array(v, order="C") for k, v in tensors.items()}  # (ascontiguousarray makes 0-d arrays 1-d)
    body, keys = _state_dict_pickle(tensors)
    with open(path, "wb") as f:
        f.write(pickle.dumps(_MAGIC, protocol=2))
        f.write(pickle.dumps(1001, protocol=2))
        f.write(
            pickle.dumps(
                {"protocol_version": 1001, "little_endian": True, "type_sizes": {"short": 2, "int": 4, "long": 4}},
                protocol=2,
            )
        )
        f.write(object_pickle if object_pickle is not None else body)
        f.write(pickle.dumps(keys if object_pickle is None else [], protocol=2))
        if object_pickle is None:
            for array in tensors.values():
                f.write(struct.pack("<q", array.size))
                f.write(array.astype(array.dtype.newbyteorder("<")).tobytes())
