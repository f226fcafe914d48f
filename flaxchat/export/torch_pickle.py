"""Read and write PyTorch ``torch.save`` checkpoints of flat state dicts, without torch.

nanochat's checkpoint_manager stores weights as ``model_XXXXXX.pt`` =
``torch.save(model.state_dict())``. To export flaxchat models in that format, and import
nanochat checkpoints where torch is not installed (including the default test tier), this
module speaks the format directly for ``dict[str, numpy.ndarray]``:

* a stored (uncompressed) zip laid out like torch's miniz-based PyTorchStreamWriter
  (byte-identical to torch.save's output apart from the random serialization id):
  ``<archive>/data.pkl``, ``.format_version``, ``.storage_alignment``, ``byteorder``,
  ``data/<key>`` (raw little-endian bytes, 64-byte aligned), ``version``,
  ``.data/serialization_id``;
* ``data.pkl``: pickle protocol 2 of an OrderedDict of
  ``torch._utils._rebuild_tensor_v2(storage, offset, size, stride, False, OrderedDict())``
  with storages as persistent ids ``('storage', torch.FloatStorage, key, 'cpu', numel)``;
  dtypes torch pickles via UntypedStorage (uint16/32/64, float8) use ``_rebuild_tensor_v3``.

Loading uses a restricted unpickler that resolves only those few globals, so a checkpoint
can never run code; anything else raises ``TorchPickleError``.
"""

from __future__ import annotations

import collections
import functools
import io
import math
import os
import pickle
import secrets
import struct
import zipfile
import zlib

import ml_dtypes
import numpy as np


class TorchPickleError(ValueError):
    """A torch checkpoint could not be read or written (one-line message naming the file)."""


# torch storage class -> numpy dtype (torch.storage._dtype_to_storage_type_map()).
_STORAGE_DTYPES = {f"{k}Storage": np.dtype(v) for k, v in dict(
    Double="<f8", Float="<f4", Half="<f2", BFloat16=ml_dtypes.bfloat16, Long="<i8", Int="<i4",
    Short="<i2", Char="i1", Byte="u1", Bool="?", ComplexFloat="<c8", ComplexDouble="<c16").items()}
# dtypes torch pickles as UntypedStorage (numel in bytes) + a torch dtype global (v3).
_V3_DTYPES = {k: np.dtype(v) for k, v in dict(
    uint16="<u2", uint32="<u4", uint64="<u8", float8_e4m3fn=ml_dtypes.float8_e4m3fn,
    float8_e5m2=ml_dtypes.float8_e5m2).items()}
_SAVE_KIND = {d.name: ("v2", n) for n, d in _STORAGE_DTYPES.items()}
_SAVE_KIND.update({d.name: ("v3", n) for n, d in _V3_DTYPES.items()})
_ALIGN = 64  # torch's default storage alignment (recorded in .storage_alignment)
_ZIP64_LIMIT = 0xFFFFFFFF  # miniz uses zip64 fields for sizes/offsets >= this (tests lower it)
_CHUNK = 1 << 26


def _contiguous_strides(shape) -> tuple[int, ...]:
    strides, acc = [], 1
    for n in reversed(shape):  # torch's rule: stride[i] = stride[i+1] * max(size[i+1], 1)
        strides.append(acc)
        acc *= max(n, 1)
    return tuple(reversed(strides))


# ---------------------------------------------------------------- writing


class _Global:
    """A torch global, pickled as ``GLOBAL 'module name'`` without importing torch."""

    def __init__(self, module: str, name: str):
        self.module, self.name = module, name

    def __call__(self, *args):  # save_reduce insists on a callable; never called
        raise TypeError(f"{self.module}.{self.name} is a pickling stand-in")


_g = functools.lru_cache(maxsize=None)(_Global)  # one object per name: memo reuse matches torch
_Storage = collections.namedtuple("_Storage", "type_global key numel")


class _Call(tuple):
    """(func, args), pickled as REDUCE: how torch.Tensor.__reduce_ex__ pickles a tensor."""


def _save_global(pickler, obj):
    pickler.write(pickle.GLOBAL + f"{obj.module}\n{obj.name}\n".encode())
    pickler.memoize(obj)


class _Pickler(pickle._Pickler):  # the pure-Python pickler's dispatch table is extensible
    dispatch = {**pickle._Pickler.dispatch, _Global: _save_global,
                _Call: lambda pickler, obj: pickler.save_reduce(*obj, obj=obj)}

    def persistent_id(self, obj):
        if isinstance(obj, _Storage):
            return ("storage", obj.type_global, obj.key, "cpu", obj.numel)
        return None


def _write_zip(f, records) -> None:
    """Write (name, bytes-like) records as torch's miniz writer does: stored, zeroed
    timestamps, data descriptors (flag 0x808), an 'FB' extra field padding each payload to
    a 64-byte boundary, zip64 fields past 4 GiB and an always-present zip64 end record."""
    pos, central = 0, []
    for name, data in records:
        n, mv = name.encode(), memoryview(data).cast("B")
        size, crc = mv.nbytes, zlib.crc32(mv)
        big_size, big_off = size >= _ZIP64_LIMIT, pos >= _ZIP64_LIMIT
        vals = ([size, size] if big_size else []) + ([pos] if big_off else [])
        x64 = struct.pack(f"<HH{len(vals)}Q", 1, 8 * len(vals), *vals) if vals else b""
        pad = -(pos + 30 + len(n) + len(x64) + 4) % _ALIGN
        extra = x64 + b"FB" + struct.pack("<H", pad) + b"Z" * pad
        flags = 0x808 if size else 0x800  # miniz writes no data descriptor for empty records
        f.write(struct.pack("<IHHHHHIIIHH", 0x04034B50, 0, flags, 0, 0, 0, 0, 0, 0, len(n),
                            len(extra)) + n + extra)
        f.write(mv)
        desc = struct.pack("<IIQQ" if vals else "<IIII", 0x08074B50, crc, size, size) if size else b""
        f.write(desc)
        s32, o32 = (0xFFFFFFFF if big_size else size), (0xFFFFFFFF if big_off else pos)
        central.append(struct.pack("<IHHHHHHIIIHHHHHII", 0x02014B50, 0, 0, flags, 0, 0, 0,
                                   crc, s32, s32, len(n), len(x64), 0, 0, 0, 0, o32) + n + x64)
        pos += 30 + len(n) + len(extra) + size + len(desc)
    cd, count = b"".join(central), len(central)
    f.write(cd + struct.pack("<IQHHIIQQQQ", 0x06064B50, 44, 0x031E, 45, 0, 0, count, count,
                             len(cd), pos)
            + struct.pack("<IIQI", 0x07064B50, 0, pos + len(cd), 1)
            + struct.pack("<IHHHHIIH", 0x06054B50, 0, 0, min(count, 0xFFFF), min(count, 0xFFFF),
                          min(len(cd), 0xFFFFFFFF), min(pos, 0xFFFFFFFF), 0))


def save_state_dict(tensors: dict[str, np.ndarray], path_or_fileobj, *,
                    bare_tensor: bool = False) -> None:
    """Write ``tensors`` so that ``torch.load`` (weights_only) returns an OrderedDict of CPU
    tensors with the same keys, dtypes, shapes and values. ``bare_tensor=True`` writes the
    single entry as ``torch.save(tensor)`` (nanochat's tokenizer/token_bytes.pt). A path is
    written atomically (temp file + fsync + os.replace); a file object sequentially."""
    if bare_tensor and len(tensors) != 1:
        raise TorchPickleError(f"bare_tensor=True needs exactly one entry, got {len(tensors)}")
    arrays, state = [], collections.OrderedDict()
    for i, (key, value) in enumerate(tensors.items()):
        a = np.asarray(value)
        kind = _SAVE_KIND.get(a.dtype.name)
        if not isinstance(key, str) or kind is None:
            raise TorchPickleError(f"cannot save {key!r} ({a.dtype}): keys must be str and "
                                   f"dtypes one of {sorted(_SAVE_KIND)}; cast it first")
        a = a.astype(a.dtype.newbyteorder("<"), order="C", copy=False)  # keeps 0-d as 0-d
        args = (0, a.shape, _contiguous_strides(a.shape), False, collections.OrderedDict())
        if kind[0] == "v2":
            storage = _Storage(_g("torch", kind[1]), str(i), a.size)
            state[key] = _Call((_g("torch._utils", "_rebuild_tensor_v2"), (storage, *args)))
        else:
            storage = _Storage(_g("torch.storage", "UntypedStorage"), str(i), a.nbytes)
            state[key] = _Call((_g("torch._utils", "_rebuild_tensor_v3"),
                                (storage, *args, _g("torch", kind[1]))))
        arrays.append(a.reshape(-1).view(np.uint8))
    pkl = io.BytesIO()
    _Pickler(pkl, protocol=2).dump(next(iter(state.values())) if bare_tensor else state)
    is_path = isinstance(path_or_fileobj, (str, os.PathLike))
    # torch names the archive after the file's basename minus its extension
    archive = os.path.splitext(os.path.basename(path_or_fileobj))[0] if is_path else "archive"
    sid = f"{secrets.randbits(64):020d}{secrets.randbits(64):020d}"
    records = [("data.pkl", pkl.getvalue()), (".format_version", b"1"),
               (".storage_alignment", str(_ALIGN).encode()), ("byteorder", b"little")]
    records += [(f"data/{i}", a) for i, a in enumerate(arrays)]
    records += [("version", b"3\n"), (".data/serialization_id", sid.encode())]
    records = [(f"{archive}/{name}", data) for name, data in records]
    if not is_path:
        return _write_zip(path_or_fileobj, records)
    path = os.fspath(path_or_fileobj)
    tmp = f"{path}.{secrets.token_hex(4)}.tmp"  # same directory, so os.replace is atomic
    try:
        with open(tmp, "xb") as f:  # open() honours the umask (mkstemp would force 0600)
            _write_zip(f, records)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


# ---------------------------------------------------------------- reading


class _Ref(tuple):
    """An allowed torch global, resolved to inert data: ('storage'|'dtype', name)."""


class _Unpickler(pickle.Unpickler):
    def __init__(self, file, fname, zf, prefix):
        super().__init__(file)
        self.fname, self.zf, self.prefix = fname, zf, prefix
        self.storages, self.handed_out = {}, set()

    def _fail(self, what):
        return TorchPickleError(f"{self.fname}: {what}")

    def find_class(self, module, name):
        if (module, name) == ("collections", "OrderedDict"):
            return collections.OrderedDict
        if module == "torch._utils" and name in ("_rebuild_tensor_v2", "_rebuild_tensor_v3"):
            return self._rebuild
        if module == "torch._utils" and name == "_rebuild_parameter":  # keep_vars=True dicts
            return lambda data, requires_grad, hooks: data
        if module in ("torch", "torch.storage") and name == "UntypedStorage":
            return _Ref(("storage", name))
        if module == "torch" and name.endswith("Storage"):
            if name not in _STORAGE_DTYPES:
                raise self._fail(f"unsupported storage torch.{name}; convert those tensors to "
                                 f"one of {sorted(_STORAGE_DTYPES)} before saving")
            return _Ref(("storage", name))
        if module == "torch" and name in _V3_DTYPES:
            return _Ref(("dtype", name))
        raise self._fail(f"refusing to unpickle global {module}.{name}: only plain tensor "
                         "state dicts (torch.save(model.state_dict())) are supported")

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"
                and isinstance(pid[1], _Ref) and pid[1][0] == "storage"):
            raise self._fail(f"unexpected persistent id {pid!r:.80}")
        _, (_, stype), key, _location, numel = pid  # location ('cuda:0', ...) is irrelevant
        if key not in self.storages:
            dtype = _STORAGE_DTYPES.get(stype, np.dtype("u1"))  # UntypedStorage counts bytes
            name, nbytes = f"{self.prefix}data/{key}", numel * dtype.itemsize
            try:
                info = self.zf.getinfo(name)
            except KeyError:
                raise self._fail(f"missing storage record {name}; the file is incomplete") from None
            if info.file_size < nbytes:
                raise self._fail(f"truncated storage {name} (expected {nbytes} bytes); "
                                 "re-copy or re-save the checkpoint")
            buf = memoryview(bytearray(nbytes))  # writable: whole-storage tensors need no copy
            with self.zf.open(info) as fh:  # chunked, so big tensors get no transient 2nd copy
                for i in range(0, nbytes, _CHUNK):
                    if fh.readinto(buf[i:i + _CHUNK]) != len(buf[i:i + _CHUNK]):
                        raise self._fail(f"truncated storage {name}; re-copy the checkpoint")
            self.storages[key] = np.frombuffer(buf, dtype)
        return self.storages[key]

    def _rebuild(self, storage, offset, size, stride, requires_grad, hooks, *rest):
        if rest and isinstance(rest[0], _Ref) and rest[0][0] == "dtype":  # v3: typed view
            storage = storage.view(_V3_DTYPES[rest[0][1]])
        size, stride = tuple(size), tuple(stride)
        if len(size) != len(stride) or min((offset,) + size + stride) < 0:
            raise self._fail(f"bad tensor geometry offset={offset} size={size} stride={stride}")
        last = offset + sum((n - 1) * s for n, s in zip(size, stride))
        if math.prod(size) and last >= storage.size:
            raise self._fail(f"tensor of size {size} overruns its {storage.size}-element "
                             "storage; the file is truncated or corrupt")
        ptr = storage.__array_interface__["data"][0]  # same for v3 views of one storage
        if (offset == 0 and math.prod(size) == storage.size and ptr not in self.handed_out
                and stride == _contiguous_strides(size)):
            self.handed_out.add(ptr)  # later views of this storage get copies
            return storage.reshape(size)
        return np.lib.stride_tricks.as_strided(
            storage[offset:], size, [s * storage.itemsize for s in stride], writeable=False).copy()


def load_state_dict(path_or_fileobj) -> dict[str, np.ndarray]:
    """Load a ``torch.save``d flat state dict (dict/OrderedDict of tensors) as C-contiguous
    numpy arrays (bf16 as ml_dtypes.bfloat16). Keys are returned unchanged (strip
    torch.compile's ``_orig_mod.`` yourself); views sharing a storage come back as copies.
    A file holding one bare tensor (``torch.save(tensor)``) loads as ``{"": array}``."""
    is_path = isinstance(path_or_fileobj, (str, os.PathLike))
    fname = os.fspath(path_or_fileobj) if is_path else getattr(path_or_fileobj, "name", "<file>")
    try:
        with zipfile.ZipFile(path_or_fileobj) as zf:
            names = zf.namelist()
            pkls = [n for n in names if n.endswith("/data.pkl") and n.count("/") == 1]
            if not pkls:
                raise TorchPickleError(f"{fname}: zip has no <archive>/data.pkl; not a torch.save file")
            prefix = pkls[0][: -len("data.pkl")]
            if prefix + "byteorder" in names and zf.read(prefix + "byteorder") != b"little":
                raise TorchPickleError(f"{fname}: big-endian checkpoint; re-save it on a "
                                       "little-endian machine")
            with zf.open(pkls[0]) as fh:
                obj = _Unpickler(fh, fname, zf, prefix).load()
    except TorchPickleError:
        raise
    except zipfile.BadZipFile as e:
        raise TorchPickleError(
            f"{fname}: not a readable torch.save zip checkpoint ({e}); it may be truncated, or "
            "a legacy _use_new_zipfile_serialization=False file (re-save it with current torch)"
        ) from None
    except (pickle.UnpicklingError, EOFError, TypeError, ValueError, KeyError, IndexError,
            AttributeError, struct.error) as e:
        raise TorchPickleError(f"{fname}: corrupt data.pkl ({type(e).__name__}: {e})") from None
    if isinstance(obj, np.ndarray):  # torch.save(tensor), e.g. token_bytes.pt
        return {"": obj}
    if not isinstance(obj, dict):
        raise TorchPickleError(f"{fname}: holds a {type(obj).__name__}, not a state dict")
    for key, value in obj.items():
        if not isinstance(key, str) or not isinstance(value, np.ndarray):
            raise TorchPickleError(f"{fname}: entry {key!r} is a {type(value).__name__}, not "
                                   "a tensor; only flat dicts of tensors are supported")
    return dict(obj)
