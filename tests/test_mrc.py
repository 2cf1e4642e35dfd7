"""inspect_mrc / read_mrc_region: what a good MRC header gives, and a one-line InputError for every bad one."""

from __future__ import annotations

import os
import struct
import tempfile
import time

import mrcfile
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tilesegment.errors import InputError
from tilesegment.geometry import Box
from tilesegment.mrc import HEADER_BYTES, SUPPORTED_MODES, MrcInfo, inspect_mrc, read_mrc_region

from .conftest import mrc_file, sample, write_mrc

MODE_DTYPES = {0: np.int8, 1: np.int16, 2: np.float32, 6: np.uint16, 12: np.float16}

# byte offsets of int32 header fields (MRC2014)
NX, NY, NZ, MODE, MX, MY, MZ, MAPC, MAPR, MAPS, ISPG, NSYMBT = 0, 4, 8, 12, 28, 32, 36, 64, 68, 72, 88, 92


def patch(path, offset: int, value: int, fmt: str = "<i") -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(struct.pack(fmt, value))


def expect_error(path, *words: str) -> InputError:
    with pytest.raises(InputError) as info:
        inspect_mrc(path)
    exc = info.value
    assert str(path) in exc.what
    assert exc.what.strip() and exc.fix and exc.fix.strip()
    assert "\n" not in exc.message
    for word in words:
        assert word.lower() in exc.message.lower(), exc.message
    return exc


# --- good files -------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", sorted(SUPPORTED_MODES))
def test_inspect_reads_shape_dtype_voxel_and_origin(tmp_path, mode):
    data = sample((5, 6, 7), MODE_DTYPES[mode])
    path = mrc_file(tmp_path / "a.mrc", data, voxel=(1.5, 2.5, 3.5), origin=(10.0, 20.0, 30.0))
    info = inspect_mrc(path)
    assert isinstance(info, MrcInfo)
    assert info.shape == (5, 6, 7)
    assert info.mode == mode
    assert np.dtype(info.dtype) == np.dtype(MODE_DTYPES[mode])
    assert info.data_offset == HEADER_BYTES
    assert info.voxel_size == pytest.approx((3.5, 2.5, 1.5))  # (z, y, x)
    assert info.origin == pytest.approx((30.0, 20.0, 10.0))
    assert info.path == path


def test_inspect_accepts_pathlike(tmp_path):
    path = mrc_file(tmp_path / "a.mrc", sample((3, 4, 5), np.float32))
    assert inspect_mrc(tmp_path / "a.mrc").path == path


def test_no_voxel_size_in_header_is_none(tmp_path):
    path = mrc_file(tmp_path / "a.mrc", sample((3, 4, 5), np.float32), voxel=0.0)
    assert inspect_mrc(path).voxel_size is None


def test_zero_sampling_is_no_voxel_size_not_an_error(tmp_path):
    path = mrc_file(tmp_path / "a.mrc", sample((3, 4, 5), np.float32))
    patch(path, MX, 0)  # voxel = cella / mx: a division by zero in the header
    with np.errstate(all="raise"):
        assert inspect_mrc(path).voxel_size is None


def test_extended_header_moves_the_data(tmp_path):
    data = sample((4, 5, 6), np.int16)
    ext = np.frombuffer(np.random.default_rng(1).bytes(1000), dtype="V1")
    path = mrc_file(tmp_path / "a.mrc", data, ext=ext)
    info = inspect_mrc(path)
    assert info.data_offset == HEADER_BYTES + 1000
    np.testing.assert_array_equal(read_mrc_region(info, Box.from_shape(info.shape)), data)


@pytest.mark.parametrize("row_gap", [0, 4 * 2**10])  # each row's span alone / a plane's rows as one run
@pytest.mark.parametrize("box", [Box((1, 2, 3), (4, 9, 7)), Box((0, 0, 10), (5, 11, 13)), Box((2, 3, 0), (3, 4, 13))])
def test_local_reads_of_close_and_distant_rows_give_the_same_region(tmp_path, monkeypatch, row_gap, box):
    from tilesegment import mrc

    data = sample((5, 11, 13), np.float32)
    info = inspect_mrc(mrc_file(tmp_path / "a.mrc", data))
    monkeypatch.setattr(mrc, "LOCAL_ROW_GAP", row_gap)
    np.testing.assert_array_equal(read_mrc_region(info, box), data[box.slices()])


@pytest.mark.skipif(not hasattr(os, "posix_fadvise"), reason="no posix_fadvise on this platform")
@pytest.mark.parametrize("row_gap, box, advised", [(4 * 2**10, Box((1, 2, 3), (4, 9, 7)), True),  # a block's narrow box
                                                    (0, Box((1, 2, 3), (4, 9, 7)), False),  # rows one by one
                                                    (4 * 2**10, Box((0, 0, 0), (5, 11, 13)), False)])  # convert's slab
def test_narrow_plane_runs_are_read_without_read_ahead(tmp_path, monkeypatch, row_gap, box, advised):
    # a plane's rows read as one run hold all the block needs there: the kernel should fetch no more;
    # a slab as wide as the volume reads on through the file, where read-ahead helps
    from tilesegment import mrc

    data = sample((5, 11, 13), np.float32)
    info = inspect_mrc(mrc_file(tmp_path / "a.mrc", data))
    monkeypatch.setattr(mrc, "LOCAL_ROW_GAP", row_gap)
    advice, real = [], os.posix_fadvise
    monkeypatch.setattr(os, "posix_fadvise", lambda fd, offset, length, what: advice.append(what) or real(fd, offset, length, what))
    np.testing.assert_array_equal(read_mrc_region(info, box), data[box.slices()])
    assert (os.POSIX_FADV_RANDOM in advice) == advised


def test_big_endian_file(tmp_path):
    data = sample((4, 5, 6), ">i2")
    path = mrc_file(tmp_path / "be.mrc", data)
    with open(path, "rb") as f:
        assert f.read()[212:214] == b"\x11\x11"  # the machine stamp really says big-endian
    info = inspect_mrc(path)
    assert np.dtype(info.dtype) == np.dtype(">i2")
    assert info.voxel_size == pytest.approx((3.5, 2.5, 1.5))
    region = read_mrc_region(info, Box((1, 2, 3), (3, 5, 6)))
    assert region.dtype.isnative and region.dtype == np.int16
    np.testing.assert_array_equal(region, data[1:3, 2:5, 3:6])


def test_map_signature_without_trailing_space_is_accepted(tmp_path):
    # mrcfile checks only 'MAP'; some writers put 'MAP\0'
    path = mrc_file(tmp_path / "a.mrc", sample((3, 4, 5), np.float32))
    with open(path, "r+b") as f:
        f.seek(208)
        f.write(b"MAP\0")
    assert inspect_mrc(path).shape == (3, 4, 5)


def test_axis_order_000_is_read_as_standard(tmp_path):
    data = sample((3, 4, 5), np.float32)
    path = mrc_file(tmp_path / "a.mrc", data)
    for offset in (MAPC, MAPR, MAPS):
        patch(path, offset, 0)
    info = inspect_mrc(path)
    np.testing.assert_array_equal(read_mrc_region(info, Box.from_shape(info.shape)), data)


def test_trailing_bytes_after_the_data_are_ignored(tmp_path):
    data = sample((3, 4, 5), np.float32)
    path = mrc_file(tmp_path / "a.mrc", data)
    with open(path, "ab") as f:
        f.write(b"\xff" * 100)
    info = inspect_mrc(path)
    np.testing.assert_array_equal(read_mrc_region(info, Box.from_shape(info.shape)), data)


# --- mode 0: signed or unsigned bytes, by IMOD's rule ----------------------------------------

IMOD_STAMP_AT, IMOD_FLAGS_AT, DMIN, DMAX = 152, 156, 76, 80


def byte_file(path, values: np.ndarray, endian: str = "<", stamp: int | None = None, flags: int = 0,
              dmin: float | None = None, dmax: float | None = None) -> str:
    """A mode-0 file holding the bytes of ``values``; its header stamped by IMOD (or not), with the
    minimum and maximum given (or mrcfile's own statistics of the bytes read as signed)."""
    with mrcfile.new(str(path), overwrite=True) as mrc:
        if endian == ">":
            mrc.set_data(np.zeros((2, 2, 2), ">i2"))  # the header becomes big-endian, and stays so
        mrc.set_data(values.view(np.int8))
    if stamp is not None:
        patch(path, IMOD_STAMP_AT, stamp, endian + "i")
        patch(path, IMOD_FLAGS_AT, flags, endian + "i")
    if dmin is not None:
        patch(path, DMIN, dmin, endian + "f")
        patch(path, DMAX, dmax, endian + "f")
    return str(path)


@pytest.mark.parametrize("endian", ["<", ">"])
@pytest.mark.parametrize("flags, dtype", [(0, np.uint8), (1, np.int8), (4, np.uint8), (5, np.int8)])
def test_an_imod_stamped_byte_file_says_whether_its_bytes_are_signed(tmp_path, endian, flags, dtype):
    values = np.arange(5 * 6 * 7, dtype=np.uint8).reshape(5, 6, 7)  # 0..209: half of them above 127
    path = byte_file(tmp_path / "b.mrc", values, endian, stamp=1146047817, flags=flags)
    info = inspect_mrc(path)
    assert np.dtype(info.dtype) == np.dtype(dtype) and info.mode == 0
    np.testing.assert_array_equal(read_mrc_region(info, Box.from_shape(info.shape)), values.view(dtype))


@pytest.mark.parametrize("dmin, dmax, dtype", [
    (None, None, np.int8),  # mrcfile's statistics of signed bytes: -128..127
    (0.0, 255.0, np.uint8),  # no signed byte reaches 255
    (0.0, 100.0, np.int8),  # either: the standard's signed
    (-10.0, 250.0, np.uint8),  # neither: the closer reading
    (-120.0, 130.0, np.int8),
    (float("nan"), float("nan"), np.int8),
])
def test_a_byte_file_without_imod_stamp_is_unsigned_only_where_its_range_says_so(tmp_path, dmin, dmax, dtype):
    values = sample((4, 5, 6), np.int8).view(np.uint8)
    info = inspect_mrc(byte_file(tmp_path / "b.mrc", values, dmin=dmin, dmax=dmax))
    assert np.dtype(info.dtype) == np.dtype(dtype)
    np.testing.assert_array_equal(read_mrc_region(info, Box.from_shape(info.shape)), values.view(dtype))


def test_an_imod_stamp_on_wider_modes_changes_nothing(tmp_path):
    path = mrc_file(tmp_path / "a.mrc", sample((3, 4, 5), np.int16))
    patch(path, IMOD_STAMP_AT, 1146047817)
    patch(path, IMOD_FLAGS_AT, 0)
    assert np.dtype(inspect_mrc(path).dtype) == np.int16


# --- read_mrc_region --------------------------------------------------------------------------

REGIONS = [Box((0, 0, 0), (9, 11, 13)), Box((0, 0, 0), (1, 1, 1)), Box((8, 10, 12), (9, 11, 13)),
           Box((2, 3, 4), (7, 8, 9)), Box((3, 0, 0), (4, 11, 13)), Box((0, 5, 0), (9, 6, 13)), Box((0, 0, 12), (9, 11, 13))]


@pytest.mark.parametrize("dtype", ["<i1", "<i2", "<f4", "<u2", "<f2", ">i2", ">f4", ">u2", ">f2"])
@pytest.mark.parametrize("ext_bytes", [0, 372])
def test_read_region_matches_mrcfile(tmp_path, dtype, ext_bytes):
    data = sample((9, 11, 13), dtype, seed=len(dtype) + ext_bytes)
    ext = np.zeros(ext_bytes, dtype="V1") if ext_bytes else None
    path = mrc_file(tmp_path / "a.mrc", data, ext=ext)
    info = inspect_mrc(path)
    assert np.dtype(info.dtype) == np.dtype(dtype)
    with mrcfile.open(path, permissive=True) as mrc:
        reference = np.array(mrc.data)
    assert reference.dtype == np.dtype(dtype)
    for box in REGIONS:
        region = read_mrc_region(info, box)
        assert region.dtype.isnative
        assert region.dtype == np.dtype(dtype).newbyteorder("=")
        assert region.shape == box.shape
        np.testing.assert_array_equal(region, reference[box.slices()])
        # bitwise too (float NaN and -0.0 included)
        assert region.tobytes() == np.ascontiguousarray(reference[box.slices()]).astype(region.dtype).tobytes()


def test_read_region_does_not_keep_the_file_mapped(tmp_path):
    data = sample((4, 5, 6), np.float32)
    path = mrc_file(tmp_path / "a.mrc", data)
    info = inspect_mrc(path)
    region = read_mrc_region(info, Box.from_shape(info.shape))
    assert not isinstance(region, np.memmap) and not isinstance(region.base, np.memmap)
    region[:] = 0  # a private copy: changing it leaves the file alone
    np.testing.assert_array_equal(read_mrc_region(info, Box.from_shape(info.shape)), data)


# --- errors -----------------------------------------------------------------------------------


def test_missing_file(tmp_path):
    expect_error(tmp_path / "nope.mrc", "no such file")


def test_directory(tmp_path):
    (tmp_path / "d.mrc").mkdir()
    expect_error(tmp_path / "d.mrc", "directory")


def test_random_bytes_are_not_an_mrc(tmp_path):
    path = tmp_path / "noise.mrc"
    path.write_bytes(np.random.default_rng(0).bytes(5000))
    expect_error(path, "not an MRC file")


def test_other_format(tmp_path):
    path = tmp_path / "img.tif"
    path.write_bytes(b"II*\0" + bytes(4000))
    expect_error(path, "MAP")


@pytest.mark.parametrize("size", [0, 1, 100, 1023])
def test_shorter_than_a_header(tmp_path, size):
    path = tmp_path / "short.mrc"
    path.write_bytes(b"\0" * size)
    expect_error(path, f"{size} bytes", "1024")


@pytest.mark.parametrize("cut", [1, 4, 1000])
def test_truncated_data(tmp_path, cut):
    path = mrc_file(tmp_path / "a.mrc", sample((6, 7, 8), np.float32))
    size = os.path.getsize(path)
    os.truncate(path, size - cut)
    expect_error(path, "truncated", str(size - cut))


def test_truncated_to_the_header(tmp_path):
    path = mrc_file(tmp_path / "a.mrc", sample((6, 7, 8), np.float32))
    os.truncate(path, HEADER_BYTES)
    expect_error(path, "truncated")


def test_truncated_inside_the_extended_header(tmp_path):
    path = mrc_file(tmp_path / "a.mrc", sample((6, 7, 8), np.int16), ext=np.zeros(2000, dtype="V1"))
    os.truncate(path, HEADER_BYTES + 500)
    expect_error(path, "truncated", "extended header")


@pytest.mark.parametrize("ext", [None, np.zeros(512, dtype="V1")])
def test_2d_image(tmp_path, ext):
    path = mrc_file(tmp_path / "img.mrc", sample((1, 64, 64), np.float32), ext=ext)
    expect_error(path, "2D", "nz=1", "tomogram")


@pytest.mark.parametrize("mode", [3, 4, 101, 7, -1, 2**31 - 1])
def test_unsupported_mode(tmp_path, mode):
    path = mrc_file(tmp_path / "a.mrc", sample((4, 5, 6), np.float32))
    patch(path, MODE, mode)
    exc = expect_error(path, f"mode {mode}")
    for supported in SUPPORTED_MODES:
        assert f"{supported} (" in exc.fix


def test_complex_file_written_by_mrcfile(tmp_path):
    data = (sample((3, 4, 5), np.float32) + 1j).astype(np.complex64)
    path = mrc_file(tmp_path / "c.mrc", data)
    expect_error(path, "mode 4")


@pytest.mark.parametrize("offset", [NX, NY, NZ])
@pytest.mark.parametrize("value", [2**31 - 1, 100_000])
def test_dimension_larger_than_the_file(tmp_path, offset, value):
    path = mrc_file(tmp_path / "a.mrc", sample((4, 5, 6), np.float32))
    patch(path, offset, value)
    expect_error(path, "truncated", str(value))


@pytest.mark.parametrize("offset", [NX, NY, NZ])
@pytest.mark.parametrize("value", [0, -1, -(2**31)])
def test_impossible_dimension(tmp_path, offset, value):
    path = mrc_file(tmp_path / "a.mrc", sample((4, 5, 6), np.float32))
    patch(path, offset, value)
    expect_error(path, "impossible dimensions", str(value))


@pytest.mark.parametrize("order", [(3, 2, 1), (2, 1, 3), (1, 3, 2), (1, 2, 0), (7, 8, 9)])
def test_non_standard_axis_order(tmp_path, order):
    path = mrc_file(tmp_path / "a.mrc", sample((4, 5, 6), np.float32))
    for offset, value in zip((MAPC, MAPR, MAPS), order):
        patch(path, offset, value)
    expect_error(path, "axis order", "/".join(map(str, order)))


def test_negative_extended_header(tmp_path):
    path = mrc_file(tmp_path / "a.mrc", sample((4, 5, 6), np.float32))
    patch(path, NSYMBT, -8)
    expect_error(path, "negative extended-header size")


def test_huge_extended_header_is_refused_fast(tmp_path):
    # mrcfile allocates nsymbt bytes before reading them: a corrupt header must not cost 2 GiB and seconds
    path = mrc_file(tmp_path / "a.mrc", sample((4, 5, 6), np.float32))
    patch(path, NSYMBT, 2**31 - 1)
    started = time.perf_counter()
    expect_error(path, "extended header", str(2**31 - 1))
    assert time.perf_counter() - started < 0.5


def test_unknown_machine_stamp_falls_back_to_the_mode(tmp_path):
    # a wrong machine stamp on a big-endian file: like mrcfile, find the byte order from the mode
    data = sample((4, 5, 6), ">f4")
    path = mrc_file(tmp_path / "be.mrc", data)
    with open(path, "r+b") as f:
        f.seek(212)
        f.write(b"\0\0\0\0")
    info = inspect_mrc(path)
    assert info.shape == (4, 5, 6) and np.dtype(info.dtype) == np.dtype(">f4")
    np.testing.assert_array_equal(read_mrc_region(info, Box.from_shape(info.shape)), data)


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads any file")
def test_unreadable_file(tmp_path):
    path = mrc_file(tmp_path / "a.mrc", sample((4, 5, 6), np.float32))
    os.chmod(path, 0)
    try:
        expect_error(path, "not a readable MRC file")
    finally:
        os.chmod(path, 0o644)


# --- fuzzing: nothing but InputError, whatever the header says ---------------------------------


@pytest.fixture(scope="module")
def fuzz_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("fuzz")


def _valid_header_and_data() -> bytes:
    with tempfile.TemporaryDirectory() as tmp:
        path = mrc_file(os.path.join(tmp, "v.mrc"), sample((3, 4, 5), np.int16))
        with open(path, "rb") as f:
            return f.read()


VALID = _valid_header_and_data()
INT32_FIELDS = [NX, NY, NZ, MODE, 16, 20, 24, MX, MY, MZ, MAPC, MAPR, MAPS, ISPG, NSYMBT, 108, 196, 200, 204, 208, 212, 220]
# values that matter: the edges of int32, small positive/negative sizes, the supported modes
INTERESTING = st.one_of(
    st.integers(-(2**31), 2**31 - 1),
    st.sampled_from([0, 1, 2, 3, 4, 6, 12, 101, -1, 2**31 - 1, -(2**31), 1024, 0x11110000, 0x4444, 0x4144]),
    st.integers(-8, 64),
)


def _check(path: str) -> None:
    """inspect_mrc either raises InputError, or describes data that really are in the file."""
    try:
        info = inspect_mrc(path)
    except InputError as exc:
        assert exc.what and exc.fix and "\n" not in exc.message
        return
    size = os.path.getsize(path)
    assert min(info.shape) >= 1 and info.shape[0] > 1
    assert info.mode in SUPPORTED_MODES
    assert info.data_offset >= HEADER_BYTES
    assert info.data_offset + int(np.prod(info.shape)) * np.dtype(info.dtype).itemsize <= size
    assert info.voxel_size is None or (min(info.voxel_size) > 0 and np.isfinite(info.voxel_size).all())
    region = read_mrc_region(info, Box.from_shape(info.shape))
    assert region.shape == info.shape and region.dtype.isnative


def _write(directory, content: bytes) -> str:
    fd, path = tempfile.mkstemp(suffix=".mrc", dir=directory)
    with os.fdopen(fd, "wb") as f:
        f.write(content)
    return path


FUZZ = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


@FUZZ
@given(content=st.binary(min_size=1024, max_size=1200))
def test_fuzz_random_bytes(fuzz_dir, content):
    path = _write(fuzz_dir, content)
    try:
        _check(path)
    finally:
        os.remove(path)


@FUZZ
@given(content=st.binary(min_size=1024, max_size=1200), mode=st.sampled_from(sorted(SUPPORTED_MODES)), standard_axes=st.booleans())
def test_fuzz_random_bytes_with_a_signature(fuzz_dir, content, mode, standard_axes):
    # random header fields behind a valid signature, machine stamp and mode get past the first checks
    content = bytearray(content)
    content[208:216] = b"MAP \x44\x44\0\0"
    content[MODE:MODE + 4] = struct.pack("<i", mode)
    if standard_axes:
        content[MAPC:MAPS + 4] = struct.pack("<3i", 1, 2, 3)
    path = _write(fuzz_dir, bytes(content))
    try:
        _check(path)
    finally:
        os.remove(path)


@FUZZ
@given(
    fields=st.lists(st.tuples(st.sampled_from(INT32_FIELDS), INTERESTING), min_size=1, max_size=5),
    endian=st.sampled_from(["<", ">"]),
    cut=st.integers(0, len(VALID) - HEADER_BYTES),
    payload=st.binary(max_size=64),
)
def test_fuzz_valid_header_with_corrupt_fields(fuzz_dir, fields, endian, cut, payload):
    content = bytearray(VALID)
    for offset, value in fields:
        content[offset:offset + 4] = struct.pack(endian + "i", value)
    content = bytes(content[:len(content) - cut]) + payload
    path = _write(fuzz_dir, content)
    try:
        _check(path)
    finally:
        os.remove(path)


def test_fuzz_baseline_is_readable(fuzz_dir):
    # the corrupted-header strategy starts from a file that reads back exactly
    path = _write(fuzz_dir, VALID)
    info = inspect_mrc(path)
    assert info.shape == (3, 4, 5)
    np.testing.assert_array_equal(read_mrc_region(info, Box.from_shape(info.shape)), sample((3, 4, 5), np.int16))


def test_conftest_writer_is_read(tmp_path):
    volume = np.arange(2 * 3 * 4, dtype=np.float32).reshape(2, 3, 4)
    info = inspect_mrc(write_mrc(tmp_path / "a.mrc", volume))
    assert info.voxel_size == (10.0, 10.0, 10.0)
    np.testing.assert_array_equal(read_mrc_region(info, Box.from_shape(info.shape)), volume)
