"""Read a PyTorch state dict saved in the legacy (non-zip) format, without torch.

The legacy ``torch.save`` format (``_use_new_zipfile_serialization=False``) is five
pickles followed by the raw tensor storages:

1. a magic number (``0x1950a86a20f9469cfc6c``), 2. the protocol version (1001),
3. system info (``little_endian``, type sizes), 4. the object itself, whose tensors are
   ``torch._utils._rebuild_tensor_v2(storage, offset, size, stride, requires_grad, hooks)``
   calls referring to storages by *persistent id*
   ``("storage", torch.FloatStorage, key, location, numel, view_metadata)``,
5. the list of storage keys in the order their bytes follow; each storage is an int64
   element count then ``numel * element_size`` bytes.

:func:`read_state_dict` unpickles with an explicit allow-list: the four globals a
state dict needs (``collections.OrderedDict``, ``torch._utils._rebuild_tensor_v2`` and
the float/long/int storage types) resolve to harmless stand-ins defined here; every
other global is refused with :class:`UnsafeTorchFileError` naming it, before anything
is called. No torch import, no code from the file runs.
"""

from __future__ import annotations

import os
import pickle
import struct
from pathlib import Path

import numpy as np

from melcore.errors import ConfigError

__all__ = ["UnsafeTorchFileError", "TorchFileError", "read_state_dict", "ALLOWED_GLOBALS"]

_MAGIC = 0x1950A86A20F9469CFC6C
_PROTOCOL_VERSION = 1001


class TorchFileError(ConfigError):
    """The file is not a legacy PyTorch state dict this reader understands."""


class UnsafeTorchFileError(TorchFileError):
    """The file's pickle names a global outside :data:`ALLOWED_GLOBALS`."""


class _Storage:
    """Stand-in for ``torch.<T>Storage``: the numpy dtype its bytes hold."""

    def __init__(self, dtype: str):
        self.dtype = np.dtype(dtype)


class _TensorRef:
    """A tensor to be filled from its storage once all storages have been read."""

    __slots__ = ("storage_key", "offset", "size", "stride")

    def __init__(self, storage_key: str, offset: int, size: tuple, stride: tuple):
        self.storage_key, self.offset, self.size, self.stride = storage_key, offset, size, stride


class _OrderedDict(dict):
    """Stand-in for ``collections.OrderedDict`` (a dict keeps order); accepts the attributes
    ``state_dict()`` sets on it (``_metadata``)."""


def _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad=False, backward_hooks=None, metadata=None):
    if not isinstance(storage, tuple) or len(storage) != 3:
        raise TorchFileError("tensor refers to something that is not a storage")
    return _TensorRef(storage[0], int(storage_offset), tuple(int(s) for s in size), tuple(int(s) for s in stride))


_STORAGES = {
    "FloatStorage": _Storage("<f4"),
    "DoubleStorage": _Storage("<f8"),
    "HalfStorage": _Storage("<f2"),
    "LongStorage": _Storage("<i8"),
    "IntStorage": _Storage("<i4"),
    "ShortStorage": _Storage("<i2"),
    "CharStorage": _Storage("i1"),
    "ByteStorage": _Storage("u1"),
    "BoolStorage": _Storage("?"),
}

#: ``(module, name)`` -> the stand-in it resolves to. Nothing else can be named by the file.
ALLOWED_GLOBALS: dict[tuple[str, str], object] = {
    ("collections", "OrderedDict"): _OrderedDict,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
    **{("torch", name): storage for name, storage in _STORAGES.items()},
}


class _AllowListUnpickler(pickle.Unpickler):
    """Resolves only :data:`ALLOWED_GLOBALS`; persistent ids become storage descriptors."""

    def __init__(self, file, path: Path, storages: dict):
        super().__init__(file)
        self._path = path
        self._storages = storages

    def find_class(self, module, name):
        try:
            return ALLOWED_GLOBALS[(module, name)]
        except KeyError:
            raise UnsafeTorchFileError(
                f"{self._path} names the global {module}.{name}, which a weights file has no reason to "
                f"use; refused without running it (allowed: "
                f"{', '.join(sorted(f'{m}.{n}' for m, n in ALLOWED_GLOBALS))})"
            ) from None

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) >= 5 and pid[0] == "storage" and isinstance(pid[1], _Storage)):
            raise TorchFileError(f"{self._path} holds a persistent reference that is not a tensor storage")
        _, storage, key, _location, numel = pid[:5]
        view = pid[5] if len(pid) > 5 else None
        if view is not None:
            raise TorchFileError(f"{self._path} uses storage views, which this reader does not support")
        key = str(key)
        self._storages.setdefault(key, (storage.dtype, int(numel)))
        return (key, storage.dtype, int(numel))


def _load_pickle(file, path: Path, storages: dict):
    try:
        return _AllowListUnpickler(file, path, storages).load()
    except TorchFileError:
        raise
    except Exception as exc:  # noqa: BLE001 - any unpickling failure means "not this format"
        raise TorchFileError(f"{path} is not a legacy PyTorch state dict ({type(exc).__name__})") from None


def read_state_dict(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """The tensors of a legacy-format PyTorch state dict, as numpy arrays.

    Args:
        path: a ``.pth`` / ``.pt`` file written by ``torch.save(state_dict,
            _use_new_zipfile_serialization=False)`` (the format of torch < 1.6).

    Returns:
        ``{name: array}`` in the file's order; each array has the tensor's shape (PyTorch
        layout, e.g. conv weights ``(out, in, kh, kw)``) and its storage dtype (float32
        for ``FloatStorage``, int64 for ``LongStorage``...), C-contiguous.

    Raises:
        UnsafeTorchFileError: the pickle names a global outside :data:`ALLOWED_GLOBALS`.
        TorchFileError: not that format (a zip-format file, a truncated file, a big-endian
            file, not a dict of tensors); the message names the file.
    """
    path = Path(path)
    if not path.is_file():
        raise TorchFileError(f"weights file {path} not found")
    with open(path, "rb") as f:
        head = f.read(4)
        if head[:2] == b"PK":
            raise TorchFileError(
                f"{path} is a zip-format PyTorch file; this reader takes the legacy format "
                "(torch.save(..., _use_new_zipfile_serialization=False))"
            )
        f.seek(0)
        storages: dict[str, tuple[np.dtype, int]] = {}
        magic = _load_pickle(f, path, storages)
        if magic != _MAGIC:
            raise TorchFileError(f"{path} is not a legacy PyTorch file (wrong magic number)")
        if _load_pickle(f, path, storages) != _PROTOCOL_VERSION:
            raise TorchFileError(f"{path} uses an unknown PyTorch file protocol version")
        sys_info = _load_pickle(f, path, storages)
        if not isinstance(sys_info, dict) or not sys_info.get("little_endian", False):
            raise TorchFileError(f"{path} was written on a big-endian machine; convert it there first")
        obj = _load_pickle(f, path, storages)
        keys = _load_pickle(f, path, storages)
        if not isinstance(obj, dict) or not isinstance(keys, list):
            raise TorchFileError(f"{path} holds a {type(obj).__name__}, not a state dict of tensors")
        data = {}
        for key in keys:
            key = str(key)
            if key not in storages:
                raise TorchFileError(f"{path} lists storage {key!r} that no tensor uses")
            dtype, numel = storages[key]
            header = f.read(8)
            if len(header) != 8:
                raise TorchFileError(f"{path} is truncated (storage {key!r} missing)")
            (count,) = struct.unpack("<q", header)
            if count != numel:
                raise TorchFileError(f"{path}: storage {key!r} holds {count} elements, its tensors expect {numel}")
            raw = f.read(count * dtype.itemsize)
            if len(raw) != count * dtype.itemsize:
                raise TorchFileError(f"{path} is truncated inside storage {key!r}")
            data[key] = np.frombuffer(raw, dtype=dtype)
    return {str(name): _materialise(path, name, ref, data) for name, ref in obj.items() if isinstance(ref, _TensorRef)}


def _materialise(path: Path, name, ref: _TensorRef, data: dict) -> np.ndarray:
    flat = data.get(ref.storage_key)
    if flat is None:
        raise TorchFileError(f"{path}: tensor {name!r} refers to a storage the file does not hold")
    if not ref.size:
        return np.array(flat[ref.offset], dtype=flat.dtype.newbyteorder("="))
    last = ref.offset + sum((s - 1) * st for s, st in zip(ref.size, ref.stride))
    if ref.offset < 0 or last >= flat.size or any(st < 0 for st in ref.stride):
        raise TorchFileError(f"{path}: tensor {name!r} reaches outside its storage")
    strides = tuple(st * flat.itemsize for st in ref.stride)
    view = np.lib.stride_tricks.as_strided(flat[ref.offset :], shape=ref.size, strides=strides, writeable=False)
    return np.ascontiguousarray(view, dtype=flat.dtype.newbyteorder("="))
