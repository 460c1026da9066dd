"""The header parser: every bad input gives our typed error naming the file and tensor."""

import json
import struct

import ml_dtypes
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st
from safetensors.numpy import load_file, save_file

from helpers import write_raw, write_st
from quantscope.backend.errors import CheckpointError, HeaderError, QuantscopeError
from quantscope.backend.safetensors_file import SafetensorsFile


def good_header(nbytes=16):
    return {"__metadata__": {"format": "pt"},
            "a": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, nbytes]}}


def test_reads_file_written_by_safetensors_itself(tmp_path):
    arrays = {"w": np.arange(12, dtype=np.float32).reshape(3, 4), "i": np.arange(5, dtype=np.int64),
              "h": np.linspace(-1, 1, 6, dtype=np.float16).reshape(2, 3)}
    save_file(arrays, tmp_path / "m.safetensors", metadata={"format": "pt"})
    f = SafetensorsFile(tmp_path / "m.safetensors")
    assert f.metadata == {"format": "pt"}
    assert sorted(f.names) == ["h", "i", "w"]
    for k, v in arrays.items():
        np.testing.assert_array_equal(f.read(k), v)
    np.testing.assert_array_equal(f.read("w", rows=(1, 3)), arrays["w"][1:3])
    assert not f.read("w").flags.writeable


def test_reads_a_file_mlx_saved_without_metadata(tmp_path):
    # mx.save_safetensors (and so nn.Module.save_weights) writes "__metadata__": null when given
    # none; safetensors and mx.load read it, and so must we (it was "header failed validation")
    import mlx.core as mx
    w = np.arange(12, dtype=np.float32).reshape(3, 4)
    mx.save_safetensors(str(tmp_path / "w.safetensors"), {"w": mx.array(w)})
    raw = (tmp_path / "w.safetensors").read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    assert json.loads(raw[8:8 + n])["__metadata__"] is None  # what mlx wrote
    f = SafetensorsFile(tmp_path / "w.safetensors")
    assert not f.metadata and f.names == ["w"]
    np.testing.assert_array_equal(f.read("w"), w)
    np.testing.assert_array_equal(load_file(tmp_path / "w.safetensors")["w"], w)  # the reference reader agrees


def test_every_byte_dtype_roundtrips(tmp_path):
    rng = np.random.default_rng(0)
    arrays = {}
    for name, t in [("bf16", ml_dtypes.bfloat16), ("e4m3", ml_dtypes.float8_e4m3fn),
                    ("e5m2", ml_dtypes.float8_e5m2), ("f64", np.float64), ("u16", np.uint16),
                    ("i16", np.int16), ("u64", np.uint64), ("b", np.bool_), ("u8", np.uint8), ("i8", np.int8)]:
        arrays[name] = rng.normal(size=(3, 5)).astype(t) if t not in (np.bool_,) else rng.normal(size=(3, 5)) > 0
    write_st(tmp_path / "d.safetensors", arrays)
    f = SafetensorsFile(tmp_path / "d.safetensors")
    for k, v in arrays.items():
        got = f.read(k)
        assert got.dtype == v.dtype
        np.testing.assert_array_equal(got.view(np.uint8), v.view(np.uint8))
    # bf16 matches what the safetensors package itself decodes (its numpy path rejects fp8)
    save_file({"bf16": arrays["bf16"]}, tmp_path / "b.safetensors")
    ref = load_file(tmp_path / "b.safetensors")["bf16"]
    np.testing.assert_array_equal(SafetensorsFile(tmp_path / "b.safetensors").read("bf16").astype(np.float32),
                                  ref.astype(np.float32))


def test_e8m0_and_fp4_values(tmp_path):
    # E8M0: byte s means 2**(s-127); F4 (E2M1) packs two per byte, low nibble first.
    e8 = np.array([127, 128, 126, 0], np.uint8)
    f4 = np.array([0x21, 0xF7], np.uint8)  # codes 1,2,7,15 -> 0.5, 1.0, 6.0, -6.0
    hdr = {"s": {"dtype": "F8_E8M0", "shape": [4], "data_offsets": [0, 4]},
           "q": {"dtype": "F4", "shape": [4], "data_offsets": [4, 6]}}
    write_raw(tmp_path / "x.safetensors", hdr, e8.tobytes() + f4.tobytes())
    f = SafetensorsFile(tmp_path / "x.safetensors")
    np.testing.assert_array_equal(f.read("s").astype(np.float64), [1.0, 2.0, 0.5, 2.0 ** -127])
    np.testing.assert_array_equal(f.read("q").astype(np.float32), [0.5, 1.0, 6.0, -6.0])


def test_unpadded_header_and_unsorted_offsets_are_fine(tmp_path):
    # mx.save_safetensors writes unpadded headers and non-sorted offsets.
    hdr = {"b": {"dtype": "U8", "shape": [2], "data_offsets": [3, 5]},
           "a": {"dtype": "U8", "shape": [3], "data_offsets": [0, 3]}}
    write_raw(tmp_path / "u.safetensors", hdr, bytes([1, 2, 3, 4, 5]))
    f = SafetensorsFile(tmp_path / "u.safetensors")
    assert f.read("b").tolist() == [4, 5]
    assert f.metadata is None


def test_scalars_and_empty_tensors(tmp_path):
    hdr = {"s": {"dtype": "F32", "shape": [], "data_offsets": [0, 4]},
           "e": {"dtype": "F32", "shape": [0, 3], "data_offsets": [4, 4]}}
    write_raw(tmp_path / "s.safetensors", hdr, struct.pack("<f", 2.5))
    f = SafetensorsFile(tmp_path / "s.safetensors")
    assert f.read("s").item() == 2.5
    assert f.read("e").shape == (0, 3)


@pytest.mark.parametrize("case, rule, fragment", [
    ("short", "container.too-short", "shorter than the 8-byte"),
    ("lfs", "container.header-too-large", "Git LFS pointer"),
    ("html", "container.header-too-large", "HTML"),
    ("json", "container.header-too-large", "JSON file"),
    ("gguf", "container.header-too-large", "GGUF"),
    ("len-past-file", "container.header-too-large", "bytes the file holds after it"),
    ("not-json", "container.header-json", "not valid JSON"),
    ("not-object", "container.header-json", "not a JSON object"),
    ("bad-utf8", "container.header-json", "UTF-8"),
    ("unknown-dtype", "container.dtype", "unknown dtype 'F12'"),
    ("size-mismatch", "container.size-mismatch", "needs 16 bytes but data_offsets"),
    ("out-of-file", "container.out-of-file", "past the end of the file"),
    ("overlap", "container.overlap", "overlaps tensor"),
    ("gap", "container.gap", "unreferenced data"),
    ("trailing", "container.trailing", "not covered"),
    ("meta-nonstring", "container.metadata", "not a string"),
    ("entry-shape", "container.entry", "not a list of non-negative integers"),
    ("entry-missing", "container.entry", "must be an object"),
    ("offsets-reversed", "container.offsets", "begin <= end"),
    ("entry-null", "container.entry", "must be an object"),
    ("length-too-large", "container.header-json", "the length is 4 bytes too large"),
])
def test_bad_input(tmp_path, case, rule, fragment):
    p = tmp_path / f"{case}.safetensors"
    data16 = bytes(16)
    if case == "short":
        p.write_bytes(b"\x01\x02\x03")
    elif case == "lfs":
        p.write_bytes(b"version https://git-lfs.github.com/spec/v1\noid sha256:0\nsize 12\n")
    elif case == "html":
        p.write_bytes(b"<!DOCTYPE html><html><body>Not found</body></html>")
    elif case == "json":  # config.json given where a .safetensors was meant
        p.write_bytes(b'{\n  "architectures": ["LlamaForCausalLM"],\n  "hidden_size": 384\n}\n')
    elif case == "gguf":
        p.write_bytes(b"GGUF\x03\x00\x00\x00" + bytes(64))
    elif case == "len-past-file":
        write_raw(p, good_header(), data16, length=10_000)
    elif case == "not-json":
        write_raw(p, b'{"a": {"dtype": "F32",', data16)
    elif case == "not-object":
        write_raw(p, b"[1, 2, 3]", data16)
    elif case == "bad-utf8":
        write_raw(p, b'{"\xff\xfe": 1}', data16)
    elif case == "unknown-dtype":
        h = good_header(); h["a"]["dtype"] = "F12"; write_raw(p, h, data16)
    elif case == "size-mismatch":
        h = good_header(); h["a"]["data_offsets"] = [0, 12]; write_raw(p, h, bytes(12))
    elif case == "out-of-file":
        write_raw(p, good_header(), bytes(8))
    elif case == "overlap":
        h = good_header(); h["b"] = {"dtype": "F32", "shape": [2], "data_offsets": [8, 16]}
        write_raw(p, h, data16)
    elif case == "gap":
        h = {"a": {"dtype": "F32", "shape": [2], "data_offsets": [8, 16]}}; write_raw(p, h, data16)
    elif case == "trailing":
        write_raw(p, good_header(), data16 + b"junk")
    elif case == "meta-nonstring":
        h = good_header(); h["__metadata__"] = {"format": "pt", "step": 5}; write_raw(p, h, data16)
    elif case == "entry-shape":
        h = good_header(); h["a"]["shape"] = [2, -2]; write_raw(p, h, data16)
    elif case == "entry-missing":
        h = good_header(); del h["a"]["data_offsets"]; write_raw(p, h, data16)
    elif case == "offsets-reversed":
        h = good_header(); h["a"]["data_offsets"] = [16, 0]; write_raw(p, h, data16)
    elif case == "length-too-large":  # the length field counts 4 bytes of tensor data into the header
        hb = json.dumps(good_header()).encode()
        p.write_bytes(struct.pack("<Q", len(hb) + 4) + hb + b"\xff\xfe\x00\x80" + data16[4:])
    elif case == "entry-null":
        h = good_header(); h["a"] = None; write_raw(p, h, b"")
    with pytest.raises(HeaderError) as ei:
        SafetensorsFile(p)
    err = ei.value
    assert err.rule == rule
    assert str(p) in str(err)
    assert fragment in str(err)
    if case in ("unknown-dtype", "size-mismatch", "out-of-file", "overlap", "entry-shape"):
        assert err.tensor in ("a", "b")
        assert "tensor 'a'" in str(err) or "tensor 'b'" in str(err)


def test_missing_file(tmp_path):
    with pytest.raises(CheckpointError, match="file not found") as ei:
        SafetensorsFile(tmp_path / "nope.safetensors")
    assert "nope.safetensors" in str(ei.value)


def test_header_over_100mb_limit_named(tmp_path):
    p = tmp_path / "big.safetensors"
    with open(p, "wb") as fh:
        fh.write(struct.pack("<Q", 100_000_001))
        fh.truncate(100_000_100)  # sparse: costs no disk
    with pytest.raises(HeaderError, match="100 MB limit"):
        SafetensorsFile(p)


def test_open_reads_no_tensor_data(tmp_path, monkeypatch):
    write_st(tmp_path / "m.safetensors", {"w": np.ones((64, 64), np.float32)})
    import os as _os
    calls = []
    real = _os.pread
    monkeypatch.setattr(_os, "pread", lambda fd, n, off: calls.append((n, off)) or real(fd, n, off))
    f = SafetensorsFile(tmp_path / "m.safetensors")
    assert all(off < f.data_offset for _, off in calls)
    assert sum(n for n, _ in calls) <= f.data_offset
    assert f._mm is None  # no mapping until a tensor is read


# -- fuzzing -------------------------------------------------------------------------------------

def _valid_file_bytes():
    h = {"__metadata__": {"format": "pt"},
         "x": {"dtype": "F16", "shape": [2, 3], "data_offsets": [0, 12]},
         "y": {"dtype": "I32", "shape": [2], "data_offsets": [12, 20]}}
    hb = json.dumps(h).encode()
    return struct.pack("<Q", len(hb)) + hb + bytes(range(20))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_fuzz_mutated_headers_only_raise_our_error(tmp_path, data):
    raw = bytearray(_valid_file_bytes())
    n_mut = data.draw(st.integers(1, 6))
    for _ in range(n_mut):
        kind = data.draw(st.sampled_from(["flip", "insert", "delete", "truncate"]))
        if not raw:
            break
        pos = data.draw(st.integers(0, len(raw) - 1))
        if kind == "flip":
            raw[pos] = data.draw(st.integers(0, 255))
        elif kind == "insert":
            raw[pos:pos] = data.draw(st.binary(min_size=1, max_size=8))
        elif kind == "delete":
            del raw[pos:pos + data.draw(st.integers(1, 8))]
        else:
            del raw[pos:]
    p = tmp_path / "fuzz.safetensors"
    p.write_bytes(bytes(raw))
    try:
        f = SafetensorsFile(p)
    except QuantscopeError:
        return
    for name in f.names:  # whatever parsed must be readable without crashing
        f.read(name)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(header=st.recursive(
    st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats() | st.text(max_size=8),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=6), children, max_size=4),
    max_leaves=20))
def test_fuzz_arbitrary_json_headers(tmp_path, header):
    write_raw(tmp_path / "j.safetensors", json.dumps(header).encode(), bytes(32))
    try:
        SafetensorsFile(tmp_path / "j.safetensors")
    except QuantscopeError:
        pass


def test_release_drops_only_whole_pages_inside_a_tensor_and_reads_stay_right(tmp_path):
    import mmap

    page = mmap.PAGESIZE
    a = np.arange(3 * page + 100, dtype=np.float32).reshape(-1, 4)  # rows of 16 bytes
    b = np.arange(2 * page, dtype=np.uint8)
    p = tmp_path / "m.safetensors"
    save_file({"a": a, "b": b}, str(p))
    f = SafetensorsFile(p)
    before = f.read("a").copy()

    class Spy:  # the real mapping's length, and the ranges asked to be dropped
        def __init__(self, mm):
            self.mm, self.calls = mm, []

        def __len__(self):
            return len(self.mm)

        def madvise(self, option, start=0, length=None):
            self.calls.append((start, length))
            self.mm.madvise(option, start, length)

    spy = f._mm = Spy(f._mm)
    info = f.info("a")
    f.release_tensor("a")
    f.release_tensor("a", (10, 700))
    for start, length in spy.calls:  # whole pages, all inside the tensor's bytes
        assert start % page == 0 and length % page == 0 and length > 0
        assert info.start <= start and start + length <= info.end
    (s0, l0), (s1, l1) = spy.calls
    assert s0 == -(-info.start // page) * page and s0 + l0 == info.end // page * page
    assert s1 >= info.start + 10 * 16 and s1 + l1 <= info.start + 700 * 16
    f.release_tensor("a", (0, 1))  # less than a page: nothing to drop
    assert len(spy.calls) == 2
    f._mm = spy.mm
    np.testing.assert_array_equal(f.read("a"), before)  # mapped again from the page cache
    np.testing.assert_array_equal(f.read("b"), b)


def test_a_pickle_is_named_but_a_header_length_ending_in_0x80_is_not():
    import pickle

    from quantscope.backend.safetensors_file import _likely_cause
    for proto in (2, 3, 4, 5):
        assert "pickle" in _likely_cause(pickle.dumps({"w": [1.0, 2.0]}, protocol=proto)[:64])
    # 50,000,000 is 0x02FAF080: a corrupt length whose low byte is 0x80 is no pickle
    assert "pickle" not in _likely_cause(struct.pack("<Q", 50_000_000) + b'{"a": {"dtype": "F32"')
    assert "pickle" not in _likely_cause(struct.pack("<Q", 0x0280) + b'{"a": {"dtype": "F32"')
    assert "pickle" not in _likely_cause(struct.pack("<Q", 0x010280) + b'{"a": {"dtype": "F32"')  # 66,176 bytes


def test_a_name_twice_in_the_header_is_said_as_such(tmp_path):
    # the last entry of a name wins a JSON parse: the first's bytes were then called a gap or an
    # overlap with another tensor, the cause unsaid
    def e(a, b):
        return f'{{"dtype": "F32", "shape": [2], "data_offsets": [{a}, {b}]}}'
    raw = f'{{"__metadata__": {{"format": "pt"}}, "a": {e(0, 8)}, "b": {e(8, 16)}, "a": {e(16, 24)}}}'.encode()
    path = write_raw(tmp_path / "x.safetensors", raw, np.zeros(6, np.float32).tobytes())
    with pytest.raises(HeaderError) as exc:
        SafetensorsFile(path)
    assert exc.value.tensor == "a" and "appears twice" in str(exc.value) and exc.value.rule == "container.duplicate-key"


def test_a_short_text_file_is_said_to_be_text_not_truncated(tmp_path):
    (tmp_path / "t.safetensors").write_bytes(b"hello\n")
    with pytest.raises(HeaderError, match="a text file, not safetensors"):
        SafetensorsFile(tmp_path / "t.safetensors")
    (tmp_path / "e.safetensors").write_bytes(b"")
    with pytest.raises(HeaderError, match="empty or truncated"):
        SafetensorsFile(tmp_path / "e.safetensors")


def test_a_file_changed_on_disk_after_opening_is_refused_not_read(tmp_path):
    """A file cut short while open (re-quantized into the same folder, re-downloaded): bytes of
    the mapping past its new end killed the window with a bus error. Reads now check it first."""
    import os

    from quantscope.backend.errors import CheckpointError
    p = tmp_path / "m.safetensors"
    write_st(p, {"a": np.arange(4096, dtype=np.float32), "b": np.ones(4096, np.float32)})
    f = SafetensorsFile(p)
    assert f.read("b").sum() == 4096
    with open(p, "r+b") as fh:
        fh.truncate(p.stat().st_size // 2)
    import time
    time.sleep(0.06)  # (a file is looked at no more often than every 50 ms: see _check_unchanged)
    with pytest.raises(CheckpointError, match="changed on disk since it was opened") as ei:
        f.read("b")
    assert ei.value.file == str(p) and ei.value.tensor == "b" and "bytes" in ei.value.message
    with pytest.raises(CheckpointError, match="changed on disk"):
        f.raw_bytes("a")
    f.close()
    q = tmp_path / "q.safetensors"
    write_st(q, {"a": np.arange(16, dtype=np.float32)})
    g = SafetensorsFile(q)
    os.remove(q)
    time.sleep(0.06)
    with pytest.raises(CheckpointError, match="moved or deleted"):
        g.read("a")
    g.close()


def test_a_name_holding_a_lone_surrogate_is_named(tmp_path):
    # "\ud800" escaped in the header parses in Python but is no Unicode: the error said only
    # "header failed validation"
    hb = b'{"a\\ud800b": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}'
    p = write_raw(tmp_path / "s.safetensors", hb + b" " * (-len(hb) % 8), b"\0" * 4)
    with pytest.raises(HeaderError, match="lone surrogate") as e:
        SafetensorsFile(p)
    assert e.value.tensor is not None and "ud800" in e.value.tensor and e.value.rule == "container.header-json"
