"""The GGUF writer against gguf-py's reader: every value type, tensor layout, alignment,
splitting, determinism and the one-read fan-out into several files."""

import hashlib
import struct

import numpy as np
import pytest
from gguf import GGUFReader, GGUFValueType

from mmconvert.convert.tensors import array_tensor
from mmconvert.formats import quants
from mmconvert.formats.gguf_writer import (
    GGUFTensor,
    Metadata,
    ValueType,
    layout_gguf,
    split_name,
    write_gguf,
)


def make_ref(name, data, dtype, calls=None):
    def get():
        if calls is not None:
            calls.append(name)
        return data, dtype

    return array_tensor(name, name, None, get, data.shape, dtype)


def tensor(name, data, src_dtype, ggml_type, calls=None):
    ref = make_ref(name, data, src_dtype, calls)
    return GGUFTensor(name, data.shape, ggml_type, quants.encoded_nbytes(data.shape, ggml_type),
                      ref, quants.encoder_for(src_dtype, ggml_type))


def field_value(reader, key):
    f = reader.get_field(key)
    return None if f is None else f.contents()


def all_types_metadata() -> Metadata:
    md = Metadata()
    md.string("general.architecture", "test")
    md.add("t.u8", ValueType.UINT8, 255)
    md.add("t.i8", ValueType.INT8, -128)
    md.add("t.u16", ValueType.UINT16, 65535)
    md.add("t.i16", ValueType.INT16, -32768)
    md.uint32("t.u32", 4_000_000_000)
    md.int32("t.i32", -2_000_000_000)
    md.float32("t.f32", 0.25)
    md.boolean("t.bool", True)
    md.string("t.str", "héllo 你好 🙂")
    md.add("t.u64", ValueType.UINT64, 2**64 - 1)
    md.add("t.i64", ValueType.INT64, -(2**63))
    md.add("t.f64", ValueType.FLOAT64, 0.1)
    md.array("t.arr_str", ValueType.STRING, ["a", "", "ü", "<|im_end|>"])
    md.array("t.arr_i32", ValueType.INT32, [1, -2, 3])
    md.array("t.arr_u32", ValueType.UINT32, np.array([7, 8], dtype=np.int64))
    md.array("t.arr_f32", ValueType.FLOAT32, [1.5, -2.0])
    md.array("t.arr_bool", ValueType.BOOL, [True, False])
    md.array("t.arr_empty", ValueType.INT32, [])
    return md


def test_every_value_type_round_trips(tmp_path):
    write_gguf(tmp_path, layout_gguf("m", all_types_metadata(), []), progress=False)
    r = GGUFReader(tmp_path / "m.gguf")
    expected = {
        "t.u8": (GGUFValueType.UINT8, 255), "t.i8": (GGUFValueType.INT8, -128),
        "t.u16": (GGUFValueType.UINT16, 65535), "t.i16": (GGUFValueType.INT16, -32768),
        "t.u32": (GGUFValueType.UINT32, 4_000_000_000), "t.i32": (GGUFValueType.INT32, -2_000_000_000),
        "t.f32": (GGUFValueType.FLOAT32, 0.25), "t.bool": (GGUFValueType.BOOL, True),
        "t.str": (GGUFValueType.STRING, "héllo 你好 🙂"),
        "t.u64": (GGUFValueType.UINT64, 2**64 - 1), "t.i64": (GGUFValueType.INT64, -(2**63)),
    }
    for key, (vtype, value) in expected.items():
        assert r.get_field(key).types == [vtype], key
        assert field_value(r, key) == value, key
    assert field_value(r, "t.f64") == pytest.approx(0.1, abs=0)
    arrays = {"t.arr_str": (GGUFValueType.STRING, ["a", "", "ü", "<|im_end|>"]),
              "t.arr_i32": (GGUFValueType.INT32, [1, -2, 3]),
              "t.arr_u32": (GGUFValueType.UINT32, [7, 8]),
              "t.arr_f32": (GGUFValueType.FLOAT32, [1.5, -2.0]),
              "t.arr_bool": (GGUFValueType.BOOL, [True, False]),
              "t.arr_empty": (GGUFValueType.INT32, [])}
    for key, (item_type, value) in arrays.items():
        f = r.get_field(key)
        assert f.types[0] == GGUFValueType.ARRAY, key
        if value:
            assert f.types[1] == item_type, key
        assert field_value(r, key) == value, key
    assert len(r.tensors) == 0


def test_bad_metadata_is_refused():
    md = Metadata()
    md.uint32("a", 1)
    with pytest.raises(KeyError):
        md.uint32("a", 2)
    with pytest.raises(ValueError):
        md.add("b", ValueType.ARRAY, [1])  # no item type
    md.uint32("c", -1)
    with pytest.raises(ValueError, match="out of range"):
        md.encode()


def test_tensors_layout_and_values(tmp_path):
    rng = np.random.default_rng(0)
    f32 = rng.standard_normal((5, 64)).astype(np.float32)
    bf16 = (rng.standard_normal((3, 64)).astype(np.float32).view(np.uint32) >> 16).astype(np.uint16)
    vec = rng.standard_normal(7).astype(np.float32)
    tensors = [tensor("a.weight", f32, "F32", "F32"), tensor("b.weight", f32, "F32", "F16"),
               tensor("c.weight", bf16, "BF16", "BF16"), tensor("d.weight", f32, "F32", "Q8_0"),
               tensor("e.bias", vec, "F32", "F32")]
    md = Metadata()
    md.string("general.architecture", "test")
    files = layout_gguf("m", md, tensors)
    assert [f.name for f in files] == ["m.gguf"]
    write_gguf(tmp_path, files, progress=False)
    r = GGUFReader(tmp_path / "m.gguf")
    by_name = {t.name: t for t in r.tensors}
    assert list(by_name) == ["a.weight", "b.weight", "c.weight", "d.weight", "e.bias"]
    assert [int(x) for x in by_name["a.weight"].shape] == [64, 5]  # ggml ne: reversed
    np.testing.assert_array_equal(np.asarray(by_name["a.weight"].data), f32)
    np.testing.assert_array_equal(np.asarray(by_name["b.weight"].data), f32.astype(np.float16))
    np.testing.assert_array_equal(np.asarray(by_name["c.weight"].data).view(np.uint16).reshape(3, 64),
                                  bf16)
    np.testing.assert_array_equal(np.asarray(by_name["d.weight"].data).reshape(5, -1),
                                  quants.quantize(f32, "Q8_0"))
    np.testing.assert_array_equal(np.asarray(by_name["e.bias"].data), vec)
    data_start = len(files[0].header)
    assert data_start % 32 == 0
    for _, offset in files[0].tensors:
        assert offset % 32 == 0 and offset >= data_start
    assert (tmp_path / "m.gguf").stat().st_size == files[0].size


def test_custom_alignment(tmp_path):
    vec = np.arange(3, dtype=np.float32)
    md = Metadata()
    md.string("general.architecture", "test")
    files = layout_gguf("m", md, [tensor("a", vec, "F32", "F32"), tensor("b", vec, "F32", "F32")],
                        alignment=64)
    write_gguf(tmp_path, files, progress=False)
    r = GGUFReader(tmp_path / "m.gguf")
    assert field_value(r, "general.alignment") == 64
    assert all(off % 64 == 0 for _, off in files[0].tensors)
    np.testing.assert_array_equal(np.asarray(r.tensors[1].data), vec)


def test_header_bytes_follow_the_spec():
    md = Metadata()
    md.uint32("k", 7)
    (f,) = layout_gguf("m", md, [])
    assert f.header[:4] == b"GGUF"
    assert struct.unpack("<IQQ", f.header[4:24]) == (3, 0, 1)
    assert f.header[24:24 + 8 + 1] == struct.pack("<Q", 1) + b"k"
    assert struct.unpack("<II", f.header[33:41]) == (ValueType.UINT32, 7)


def test_split_names_keys_and_contents(tmp_path):
    data = np.ones((4, 64), dtype=np.float32)  # 1024 bytes each
    tensors = [tensor(f"t{i}", data * i, "F32", "F32") for i in range(5)]
    md = Metadata()
    md.string("general.architecture", "test")
    md.uint32("test.thing", 3)
    files = layout_gguf("model-Q", md, tensors, split_max_bytes=2100)
    names = [f.name for f in files]
    assert names == [split_name("model-Q", i, 3) for i in range(3)]
    assert names[0] == "model-Q-00001-of-00003.gguf"
    write_gguf(tmp_path, files, progress=False)
    seen = []
    for i, name in enumerate(names):
        r = GGUFReader(tmp_path / name)
        assert field_value(r, "split.no") == i
        assert r.get_field("split.no").types == [GGUFValueType.UINT16]
        assert field_value(r, "split.count") == 3
        assert field_value(r, "split.tensors.count") == 5
        assert r.get_field("split.tensors.count").types == [GGUFValueType.INT32]
        # the first shard carries the model's metadata, the others only split keys
        assert (field_value(r, "test.thing") == 3) == (i == 0)
        for t in r.tensors:
            seen.append(t.name)
            np.testing.assert_array_equal(np.asarray(t.data), data * int(t.name[1:]))
    assert seen == [f"t{i}" for i in range(5)]


def test_no_split_under_the_limit():
    data = np.ones((4, 64), dtype=np.float32)
    files = layout_gguf("m", Metadata(), [tensor("a", data, "F32", "F32")], split_max_bytes=10**9)
    assert [f.name for f in files] == ["m.gguf"]


def test_same_input_same_bytes(tmp_path):
    rng = np.random.default_rng(1)
    data = rng.standard_normal((64, 96)).astype(np.float32)

    def write(folder):
        folder.mkdir()
        files = layout_gguf("m", all_types_metadata(),
                            [tensor("w", data, "F32", "Q8_0"), tensor("v", data, "F32", "F16")])
        write_gguf(folder, files, progress=False, workers=2, chunk_bytes=1024)
        return hashlib.sha256((folder / "m.gguf").read_bytes()).hexdigest()

    assert write(tmp_path / "a") == write(tmp_path / "b")


def test_one_read_feeds_every_file(tmp_path):
    """Two files storing the same source (one per outtype) read each slice of it once."""
    data = np.random.default_rng(2).standard_normal((8, 64)).astype(np.float32)
    calls: list[str] = []
    ref = make_ref("w", data, "F32", calls)
    files = []
    for ggml in ("F16", "Q8_0"):
        t = GGUFTensor("w", data.shape, ggml, quants.encoded_nbytes(data.shape, ggml), ref,
                       quants.encoder_for("F32", ggml))
        files += layout_gguf(f"m-{ggml}", Metadata(), [t])
    write_gguf(tmp_path, files, progress=False)
    assert calls == ["w"]
    r16 = GGUFReader(tmp_path / "m-F16.gguf")
    np.testing.assert_array_equal(np.asarray(r16.tensors[0].data), data.astype(np.float16))
    r8 = GGUFReader(tmp_path / "m-Q8_0.gguf")
    np.testing.assert_array_equal(np.asarray(r8.tensors[0].data).reshape(8, -1),
                                  quants.quantize(data, "Q8_0"))


def test_bad_tensors_are_refused():
    data = np.ones((2, 32), dtype=np.float32)
    with pytest.raises(ValueError, match="longer than"):
        layout_gguf("m", Metadata(), [tensor("x" * 64, data, "F32", "F32")])
    with pytest.raises(ValueError, match="duplicate"):
        layout_gguf("m", Metadata(), [tensor("a", data, "F32", "F32")] * 2)
