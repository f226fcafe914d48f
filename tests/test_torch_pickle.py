"""flaxchat.export.torch_pickle: torch.save-format checkpoints without torch.

The default tier needs no torch: it round-trips our own files and reads fixtures that real
torch 2.13 wrote (tests/data/torch_pickle/, regenerate with make_fixtures.py there). The
``torch``-marked test compares live against torch when it is installed.
"""

import collections
import io
import os
import pickle
import struct
import zipfile

import ml_dtypes
import numpy as np
import pytest

from flaxchat.export import torch_pickle as tp
from flaxchat.export.torch_pickle import TorchPickleError, load_state_dict, save_state_dict

FIXTURES = os.path.join(os.path.dirname(__file__), "data", "torch_pickle")
DTYPES = [np.float32, np.float16, ml_dtypes.bfloat16, np.float64, np.int64, np.int32, np.int16,
          np.int8, np.uint8, np.bool_, np.uint16, np.uint32, np.uint64, ml_dtypes.float8_e4m3fn]
SHAPES = [(), (0,), (5,), (2, 3, 4), (3, 0, 2)]


def _sample(dtype, shape, seed=0):
    vals = np.random.default_rng(seed).standard_normal(shape) * 10
    return (vals > 0) if dtype is np.bool_ else np.abs(vals).astype(dtype)


def _same(a, b):
    return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()


def _expected():
    with np.load(os.path.join(FIXTURES, "expected.npz")) as z:
        out = {k: z[k] for k in z.files}
    for k in out.pop("__bf16_keys__"):
        out[k] = out[k].view(ml_dtypes.bfloat16)
    return out


def _rezip(src, dst, patch=lambda name, data: data, drop=()):
    """Copy a torch zip entry by entry, optionally rewriting entries (for corrupt inputs)."""
    with zipfile.ZipFile(src) as zi, zipfile.ZipFile(dst, "w", zipfile.ZIP_STORED) as zo:
        for name in zi.namelist():
            if name not in drop:
                zo.writestr(name, patch(name, zi.read(name)))
    return dst


def _archive(tmp_path, pkl: bytes, **records):
    path = tmp_path / "crafted.pt"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("archive/data.pkl", pkl)
        for name, data in records.items():
            z.writestr(f"archive/data/{name}", data)
    return path


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
def test_round_trip_every_dtype_and_shape(tmp_path, dtype):
    sd = {f"t{i}": _sample(dtype, s, i) for i, s in enumerate(SHAPES)}
    save_state_dict(sd, tmp_path / "m.pt")
    out = load_state_dict(tmp_path / "m.pt")
    assert list(out) == list(sd) and all(_same(out[k], sd[k]) for k in sd)
    assert all(v.flags.writeable and v.flags.c_contiguous for v in out.values())


def test_round_trip_file_object_noncontiguous_and_big_endian():
    base = np.arange(12, dtype=np.float32).reshape(3, 4)
    sd = {"T": base.T, "step": base[::2, 1::2], "be": np.arange(4, dtype=">i4"),
          "_orig_mod.w": np.ones((2, 2), np.float32)}
    buf = io.BytesIO()
    save_state_dict(sd, buf)
    out = load_state_dict(io.BytesIO(buf.getvalue()))
    assert list(out) == list(sd)
    for k, v in sd.items():
        assert out[k].shape == v.shape and np.array_equal(out[k], v)
    assert out["be"].dtype == np.dtype("<i4")
    assert zipfile.ZipFile(buf).namelist()[0] == "archive/data.pkl"
    bare = io.BytesIO()
    save_state_dict({"": np.arange(5, dtype=np.int32)}, bare, bare_tensor=True)
    assert _same(load_state_dict(bare)[""], np.arange(5, dtype=np.int32))
    with pytest.raises(TorchPickleError, match="exactly one entry"):
        save_state_dict({"a": np.ones(1), "b": np.ones(1)}, io.BytesIO(), bare_tensor=True)
    empty = io.BytesIO()
    save_state_dict({}, empty)
    assert load_state_dict(empty) == {}


def test_layout_matches_torch_writer(tmp_path):
    sd = {"a": np.ones((3, 5), np.float32), "b": np.zeros(3, ml_dtypes.bfloat16),
          "e": np.zeros(0, np.int8)}
    save_state_dict(sd, tmp_path / "model_000123.pt")
    raw = (tmp_path / "model_000123.pt").read_bytes()
    with zipfile.ZipFile(tmp_path / "model_000123.pt") as z:
        assert z.testzip() is None
        names = [n.split("/", 1)[1] for n in z.namelist()]
        assert {n.split("/")[0] for n in z.namelist()} == {"model_000123"}
        assert names == ["data.pkl", ".format_version", ".storage_alignment", "byteorder",
                         "data/0", "data/1", "data/2", "version", ".data/serialization_id"]
        for info in z.infolist():
            assert info.compress_type == zipfile.ZIP_STORED
            nlen, xlen = struct.unpack("<HH", raw[info.header_offset + 26:info.header_offset + 30])
            assert (info.header_offset + 30 + nlen + xlen) % 64 == 0, info.filename
        assert z.read("model_000123/version") == b"3\n"
        assert z.read("model_000123/byteorder") == b"little"
    # torch's pickler output for this dict (checked byte-identical against torch 2.13)
    pkl = zipfile.ZipFile(tmp_path / "model_000123.pt").read("model_000123/data.pkl")
    assert pkl.startswith(b"\x80\x02ccollections\nOrderedDict\n") and b"ctorch\nBFloat16Storage\n" in pkl


def test_zip64_records_round_trip(tmp_path, monkeypatch):
    monkeypatch.setattr(tp, "_ZIP64_LIMIT", 100)  # exercise the >4 GiB code paths on tiny data
    sd = {"a": np.arange(300, dtype=np.float32), "e": np.zeros(0, np.int8), "b": np.ones(3, np.int64)}
    save_state_dict(sd, tmp_path / "z.pt")
    assert zipfile.ZipFile(tmp_path / "z.pt").testzip() is None
    out = load_state_dict(tmp_path / "z.pt")
    assert all(_same(out[k], sd[k]) for k in sd)


def test_save_is_atomic(tmp_path, monkeypatch):
    path = tmp_path / "model.pt"
    path.write_bytes(b"previous checkpoint")

    def broken(f, records):
        f.write(b"PK partial")
        raise OSError("disk full")

    monkeypatch.setattr(tp, "_write_zip", broken)
    with pytest.raises(OSError, match="disk full"):
        save_state_dict({"a": np.ones(3, np.float32)}, path)
    assert path.read_bytes() == b"previous checkpoint"
    assert os.listdir(tmp_path) == ["model.pt"]
    with pytest.raises(TorchPickleError, match="object"):
        save_state_dict({"a": np.array(["x"], dtype=object)}, path)
    with pytest.raises(TorchPickleError, match="keys must be str"):
        save_state_dict({1: np.ones(1)}, path)
    assert path.read_bytes() == b"previous checkpoint"


def test_load_real_torch_fixtures():
    expected = _expected()
    sd = load_state_dict(os.path.join(FIXTURES, "state_dict.pt"))
    plain = load_state_dict(os.path.join(FIXTURES, "plain_dict.pt"))
    assert list(sd) == [k for k in expected if not k.startswith("plain.")]
    assert list(plain) == ["w", "b"]
    for k, v in {**sd, **{f"plain.{k}": v for k, v in plain.items()}}.items():
        assert _same(v, expected[k]), k
        assert v.flags.c_contiguous and v.flags.writeable
    assert sd["bf16"].dtype == ml_dtypes.bfloat16 and sd["scalar"].shape == ()
    assert sd["view_T"].shape == (6, 4) and sd["view_scalar"].shape == ()
    sd["base"][0, 0] = -1  # views came back as copies, not aliases
    assert sd["view_T"][0, 0] == 0


def test_load_ignores_storage_location(tmp_path):
    def to_cuda(name, data):  # nanochat saves from GPU: storages carry location 'cuda:0'
        return data.replace(b"X\x03\x00\x00\x00cpu", b"X\x06\x00\x00\x00cuda:0") if name.endswith(".pkl") else data
    path = _rezip(os.path.join(FIXTURES, "state_dict.pt"), tmp_path / "cuda.pt", to_cuda)
    assert b"cuda:0" in zipfile.ZipFile(path).read("state_dict/data.pkl")
    expected = _expected()
    assert all(_same(v, expected[k]) for k, v in load_state_dict(path).items())


class _Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.mark.parametrize("pkl", [
    "evil",
    b"\x80\x02cbuiltins\neval\nX\x04\x00\x00\x001+1q\x00\x85R.",
    b"\x80\x02ctorch.nn.modules.linear\nLinear\n)R.",
])
def test_malicious_pickle_is_refused(tmp_path, pkl):
    marker = tmp_path / "pwned"
    if pkl == "evil":
        pkl = pickle.dumps({"w": _Evil(marker)}, protocol=2)
    path = _archive(tmp_path, pkl)
    with pytest.raises(TorchPickleError, match="refusing to unpickle global") as err:
        load_state_dict(path)
    assert str(path) in str(err.value) and "\n" not in str(err.value)
    assert not marker.exists()


def test_allowed_global_cannot_be_abused(tmp_path):
    # a storage-type reference is inert data: calling it is a corrupt-file error
    path = _archive(tmp_path, b"\x80\x02ctorch\nFloatStorage\n)R.")
    with pytest.raises(TorchPickleError, match="corrupt data.pkl"):
        load_state_dict(path)


def test_error_messages(tmp_path):
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"\x80\x02not a zip at all")
    with pytest.raises(TorchPickleError, match=r"junk\.pt: not a readable torch.save zip"):
        load_state_dict(junk)
    good = tmp_path / "good.pt"
    save_state_dict({"w": np.arange(64, dtype=np.float32)}, good)
    cut = tmp_path / "cut.pt"
    cut.write_bytes(good.read_bytes()[:300])
    with pytest.raises(TorchPickleError, match="cut.pt"):
        load_state_dict(cut)
    short = _rezip(good, tmp_path / "short.pt", lambda n, d: d[:100] if n.endswith("data/0") else d)
    with pytest.raises(TorchPickleError, match="truncated storage good/data/0"):
        load_state_dict(short)
    flipped = bytearray(good.read_bytes())
    flipped[zipfile.ZipFile(good).getinfo("good/data/0").header_offset + 200] ^= 1  # in the payload
    (tmp_path / "flipped.pt").write_bytes(bytes(flipped))
    with pytest.raises(TorchPickleError, match="Bad CRC-32"):
        load_state_dict(tmp_path / "flipped.pt")
    missing = _rezip(good, tmp_path / "missing.pt", drop=("good/data/0",))
    with pytest.raises(TorchPickleError, match="missing storage record"):
        load_state_dict(missing)
    with zipfile.ZipFile(tmp_path / "nopkl.pt", "w") as z:
        z.writestr("x/other", b"")
    with pytest.raises(TorchPickleError, match="no <archive>/data.pkl"):
        load_state_dict(tmp_path / "nopkl.pt")
    quant = _archive(tmp_path, b"\x80\x02ctorch\nQInt8Storage\n.")
    with pytest.raises(TorchPickleError, match="unsupported storage torch.QInt8Storage"):
        load_state_dict(quant)
    nested = _archive(tmp_path, pickle.dumps({"step": 3}, protocol=2))
    with pytest.raises(TorchPickleError, match="'step' is a int, not a tensor"):
        load_state_dict(nested)


def test_overrunning_view_is_rejected(tmp_path):
    good = tmp_path / "good.pt"
    save_state_dict({"w": np.arange(4, dtype=np.float32)}, good)

    def grow(name, data):  # claim size 5 in a 4-element storage: K\x04\x85 is the (4,) size tuple
        return data.replace(b"K\x00K\x04\x85", b"K\x00K\x05\x85") if name.endswith(".pkl") else data

    bad = _rezip(good, tmp_path / "bad.pt", grow)
    with pytest.raises(TorchPickleError, match="overruns its 4-element storage"):
        load_state_dict(bad)


@pytest.mark.torch
def test_live_against_torch(tmp_path):
    torch = pytest.importorskip("torch")

    def as_np(t):
        if t.dtype == torch.bfloat16:
            return t.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
        if t.dtype == torch.uint16:
            return t.to(torch.int32).numpy().astype(np.uint16)
        return t.numpy()

    sd = {np.dtype(d).name: _sample(d, (3, 4), i) for i, d in enumerate(DTYPES)
          if d not in (np.uint32, np.uint64, ml_dtypes.float8_e4m3fn)}
    sd.update(scalar=np.array(1.5, np.float32), empty=np.zeros((0, 2), np.int64))
    save_state_dict(sd, tmp_path / "ours.pt")
    loaded = torch.load(tmp_path / "ours.pt")  # weights_only=True is the default
    assert type(loaded) is collections.OrderedDict and list(loaded) == list(sd)
    assert all(_same(as_np(loaded[k]), sd[k]) for k in sd)

    base = torch.arange(24, dtype=torch.float32).reshape(4, 6)
    theirs = collections.OrderedDict(base=base, off=base[1:3, 2:5], T=base.t(), s=base[3, 5],
                                     bf=torch.randn(3, 2).to(torch.bfloat16), u16=loaded["uint16"])
    torch.save(theirs, tmp_path / "theirs.pt")
    ours = load_state_dict(tmp_path / "theirs.pt")
    assert all(_same(ours[k], as_np(v.contiguous())) for k, v in theirs.items())

    # byte-identical to torch.save apart from the random serialization id (and its CRC)
    small = collections.OrderedDict(a=base, b=theirs["bf"], s=torch.tensor(3), e=torch.zeros(0))
    (tmp_path / "t").mkdir()
    torch.save(small, tmp_path / "t" / "m.pt")
    save_state_dict({k: as_np(v) for k, v in small.items()}, tmp_path / "m.pt")
    blobs = []
    for p in (tmp_path / "m.pt", tmp_path / "t" / "m.pt"):
        raw, info = bytearray(p.read_bytes()), zipfile.ZipFile(p).getinfo("m/.data/serialization_id")
        sid, crc = zipfile.ZipFile(p).read(info), struct.pack("<I", info.CRC)
        blobs.append(bytes(raw).replace(sid, b"0" * len(sid)).replace(crc, b"\0" * 4))
    assert blobs[0] == blobs[1]

    token_bytes = torch.tensor([0, 1, 3, 2], dtype=torch.int32)  # nanochat: torch.save(tensor)
    torch.save(token_bytes, tmp_path / "tb_torch.pt")
    assert _same(load_state_dict(tmp_path / "tb_torch.pt")[""], token_bytes.numpy())
    save_state_dict({"": token_bytes.numpy()}, tmp_path / "tb.pt", bare_tensor=True)
    assert torch.equal(torch.load(tmp_path / "tb.pt"), token_bytes)
    assert (zipfile.ZipFile(tmp_path / "tb.pt").read("tb/data.pkl")
            == zipfile.ZipFile(tmp_path / "tb_torch.pt").read("tb_torch/data.pkl"))
