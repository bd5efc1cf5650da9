"""Read and write the MXNet NDArray-list files inside SageMaker KMeans's ``model.tar.gz``.

SageMaker's built-in KMeans saves its model as ``model_algo-1``: an MXNet ``NDArray::Save`` list
holding one float32 array of shape (k, feature_dim). We implement the format with ``struct`` and
numpy only, so Centroid can serve SageMaker-trained models and hand SageMaker-compatible models back
without MXNet.

Layout (all little-endian)::

    u64 0x112 (list magic) | u64 reserved | u64 array count
    per array:
        u32 magic (V1 0xF993FAC8, V2 0xF993FAC9, V3 0xF993FACA)
        i32 storage type (V2/V3 only; 0 = dense)
        i32 ndim | ndim x i64 dims | i32 dev_type | i32 dev_id | i32 type_flag | raw C-order data
    u64 name count | per name: u64 length + bytes

The reader treats every file as hostile: each length is checked against the bytes that remain
*before* anything is allocated, so a corrupt or malicious file raises :class:`ModelFormatError`
instead of crashing or exhausting memory.
"""

from __future__ import annotations

import gzip
import io
import struct
import tarfile
import zlib
from dataclasses import dataclass, field

import numpy as np

LIST_MAGIC = 0x112
V1_MAGIC = 0xF993FAC8
V2_MAGIC = 0xF993FAC9
V3_MAGIC = 0xF993FACA
DENSE_STORAGE = 0
CPU_DEVICE = 1
MAX_NDIM = 32
MODEL_MEMBER = "model_algo-1"
DEFAULT_MAX_BYTES = 1 << 30  # 1 GiB

_TYPE_FLAGS: dict[int, np.dtype] = {
    0: np.dtype("<f4"),
    1: np.dtype("<f8"),
    2: np.dtype("<f2"),
    3: np.dtype("u1"),
    4: np.dtype("<i4"),
    5: np.dtype("i1"),
    6: np.dtype("<i8"),
}
_FLAG_OF_DTYPE = {dtype: flag for flag, dtype in _TYPE_FLAGS.items()}
# The smallest possible serialized array (V1, ndim 0 is rejected, so ndim 1): used to bound counts.
_MIN_ARRAY_BYTES = 4 + 4 + 8 + 4 + 4 + 4


class ModelFormatError(ValueError):
    """The bytes are not a valid (supported) MXNet NDArray list or SageMaker model archive."""


@dataclass(frozen=True)
class NDArrayHeader:
    """Per-array metadata that is not part of the numpy array but is needed to rewrite the file."""

    magic: int = V2_MAGIC
    storage_type: int | None = DENSE_STORAGE  # None for V1 files, which have no such field
    dev_type: int = CPU_DEVICE
    dev_id: int = 0


@dataclass
class NDArrayList:
    """The content of an NDArray-list file; ``names`` is empty or parallel to ``arrays``."""

    arrays: list[np.ndarray]
    names: list[str] = field(default_factory=list)
    headers: list[NDArrayHeader] = field(default_factory=list)
    reserved: int = 0

    def header(self, index: int) -> NDArrayHeader:
        """The stored header of array ``index``, or SageMaker's default (V2, dense, cpu 0)."""
        return self.headers[index] if index < len(self.headers) else NDArrayHeader()


class _Reader:
    """A bounds-checked cursor over bytes; every read fails cleanly when the data runs out."""

    def __init__(self, data: bytes) -> None:
        self._view = memoryview(data)
        self.offset = 0

    @property
    def remaining(self) -> int:
        return len(self._view) - self.offset

    def take(self, size: int, what: str) -> memoryview:
        if size < 0 or size > self.remaining:
            raise ModelFormatError(
                f"truncated file: {what} needs {size} bytes at offset {self.offset}, only {self.remaining} left"
            )
        chunk = self._view[self.offset : self.offset + size]
        self.offset += size
        return chunk

    def unpack(self, fmt: str, what: str) -> tuple[int, ...]:
        return struct.unpack(fmt, self.take(struct.calcsize(fmt), what))

    def u64(self, what: str) -> int:
        return self.unpack("<Q", what)[0]

    def i32(self, what: str) -> int:
        return self.unpack("<i", what)[0]


def read_ndarray_list(data: bytes) -> NDArrayList:
    """Parse an MXNet NDArray-list file (e.g. ``model_algo-1``); ModelFormatError if invalid."""
    reader = _Reader(data)
    magic, reserved, count = reader.unpack("<QQQ", "list header")
    if magic != LIST_MAGIC:
        raise ModelFormatError(f"not an MXNet NDArray list: magic {magic:#x}, expected {LIST_MAGIC:#x}")
    if count > reader.remaining // _MIN_ARRAY_BYTES:
        raise ModelFormatError(f"array count {count} is larger than the file can hold")
    arrays: list[np.ndarray] = []
    headers: list[NDArrayHeader] = []
    for index in range(count):
        header, array = _read_array(reader, index)
        headers.append(header)
        arrays.append(array)
    names = _read_names(reader, count)
    if reader.remaining:
        raise ModelFormatError(f"{reader.remaining} unexpected trailing bytes after the names")
    return NDArrayList(arrays=arrays, names=names, headers=headers, reserved=reserved)


def _read_array(reader: _Reader, index: int) -> tuple[NDArrayHeader, np.ndarray]:
    what = f"array {index}"
    (magic,) = reader.unpack("<I", f"{what} magic")
    if magic not in (V1_MAGIC, V2_MAGIC, V3_MAGIC):
        raise ModelFormatError(f"{what}: unsupported NDArray magic {magic:#x}")
    storage_type = None if magic == V1_MAGIC else reader.i32(f"{what} storage type")
    if storage_type not in (None, DENSE_STORAGE):
        raise ModelFormatError(f"{what}: sparse storage type {storage_type} is not supported")
    shape = _read_shape(reader, what)
    dev_type, dev_id, type_flag = reader.unpack("<iii", f"{what} context and type")
    dtype = _TYPE_FLAGS.get(type_flag)
    if dtype is None:
        raise ModelFormatError(f"{what}: unsupported type flag {type_flag}")
    size = int(np.prod(shape, dtype=object)) * dtype.itemsize  # Python ints: no overflow
    raw = reader.take(size, f"{what} data")
    try:
        array = np.frombuffer(raw, dtype=dtype).reshape(shape).copy()
    except ValueError as exc:  # e.g. an empty array whose other dimensions overflow numpy
        raise ModelFormatError(f"{what}: unsupported shape {shape}: {exc}") from exc
    return NDArrayHeader(magic, storage_type, dev_type, dev_id), array


def _read_shape(reader: _Reader, what: str) -> tuple[int, ...]:
    ndim = reader.i32(f"{what} ndim")
    if not 1 <= ndim <= MAX_NDIM:
        raise ModelFormatError(f"{what}: ndim {ndim} is not in [1, {MAX_NDIM}]")
    dims = reader.unpack(f"<{ndim}q", f"{what} shape")
    if any(dim < 0 for dim in dims):
        raise ModelFormatError(f"{what}: negative dimension in shape {dims}")
    return tuple(dims)


def _read_names(reader: _Reader, count: int) -> list[str]:
    name_count = reader.u64("name count")
    if name_count not in (0, count):
        raise ModelFormatError(f"{name_count} names for {count} arrays (must be 0 or {count})")
    names = []
    for index in range(name_count):
        length = reader.u64(f"name {index} length")
        raw = reader.take(length, f"name {index}")
        try:
            names.append(bytes(raw).decode("utf-8"))
        except UnicodeDecodeError as exc:
            raise ModelFormatError(f"name {index} is not valid UTF-8") from exc
    return names


def write_ndarray_list(lst: NDArrayList) -> bytes:
    """Serialize ``lst`` exactly as MXNet does (the inverse of :func:`read_ndarray_list`)."""
    if lst.names and len(lst.names) != len(lst.arrays):
        raise ValueError(f"{len(lst.names)} names for {len(lst.arrays)} arrays")
    out = io.BytesIO()
    out.write(struct.pack("<QQQ", LIST_MAGIC, lst.reserved, len(lst.arrays)))
    for index, array in enumerate(lst.arrays):
        out.write(_array_bytes(np.asarray(array), lst.header(index)))
    out.write(struct.pack("<Q", len(lst.names)))
    for name in lst.names:
        encoded = name.encode("utf-8")
        out.write(struct.pack("<Q", len(encoded)) + encoded)
    return out.getvalue()


def _array_bytes(array: np.ndarray, header: NDArrayHeader) -> bytes:
    flag = _FLAG_OF_DTYPE.get(array.dtype.newbyteorder("<"))
    if flag is None:
        raise ValueError(f"dtype {array.dtype} has no MXNet type flag")
    if not 1 <= array.ndim <= MAX_NDIM:
        raise ValueError(f"arrays must have 1 to {MAX_NDIM} dimensions, got {array.ndim}")
    parts = [struct.pack("<I", header.magic)]
    if header.magic != V1_MAGIC:
        parts.append(struct.pack("<i", DENSE_STORAGE if header.storage_type is None else header.storage_type))
    parts.append(struct.pack(f"<i{array.ndim}q", array.ndim, *array.shape))
    parts.append(struct.pack("<iii", header.dev_type, header.dev_id, flag))
    parts.append(np.ascontiguousarray(array, dtype=_TYPE_FLAGS[flag]).tobytes())
    return b"".join(parts)


def write_model_tar(centers: np.ndarray) -> bytes:
    """Build a SageMaker-style ``model.tar.gz`` holding ``model_algo-1`` with ``centers``.

    Mirrors the real artifact: a ustar archive with one 0644 member owned by uid/gid 0, whose
    content is a V2 dense float32 (k, d) array on cpu 0 with no names. Timestamps are fixed at 0
    so the same centers always give the same bytes.
    """
    matrix = np.asarray(centers)
    if matrix.ndim != 2 or 0 in matrix.shape:
        raise ValueError(f"centers must be a non-empty (k, d) matrix, got shape {matrix.shape}")
    payload = write_ndarray_list(NDArrayList(arrays=[matrix.astype(np.float32)]))
    tar_bytes = io.BytesIO()
    with tarfile.open(fileobj=tar_bytes, mode="w", format=tarfile.USTAR_FORMAT) as archive:
        info = tarfile.TarInfo(MODEL_MEMBER)
        info.size, info.mode, info.mtime = len(payload), 0o644, 0
        archive.addfile(info, io.BytesIO(payload))
    return gzip.compress(tar_bytes.getvalue(), mtime=0)


def read_model_tar(
    data: bytes,
    *,
    max_member_bytes: int = DEFAULT_MAX_BYTES,
    max_total_bytes: int = DEFAULT_MAX_BYTES,
) -> np.ndarray:
    """Return the float32 (k, d) centroids from a SageMaker KMeans ``model.tar.gz`` (or plain tar).

    Nothing is extracted to disk. Only a regular file named ``model_algo-1`` (or ``./model_algo-1``)
    is read; links, other paths and duplicates are refused. Decompression is capped at
    ``max_total_bytes`` and the member at ``max_member_bytes``, so a gzip bomb fails fast.
    """
    payload = _model_member(data, max_member_bytes, max_total_bytes)
    arrays = read_ndarray_list(payload).arrays
    if len(arrays) != 1:
        raise ModelFormatError(f"{MODEL_MEMBER} holds {len(arrays)} arrays, expected 1")
    centers = arrays[0]
    if centers.ndim != 2 or 0 in centers.shape or centers.dtype.kind != "f":
        raise ModelFormatError(
            f"{MODEL_MEMBER} must hold a non-empty float (k, d) matrix, got {centers.dtype} {centers.shape}"
        )
    if not np.isfinite(centers).all():
        raise ModelFormatError(f"{MODEL_MEMBER} contains non-finite centroid values")
    with np.errstate(over="ignore"):  # float64 beyond float32's range: refused below, without a RuntimeWarning
        narrowed = centers.astype(np.float32)
    if not np.isfinite(narrowed).all():
        raise ModelFormatError(f"{MODEL_MEMBER} contains centroid values beyond the float32 range (about 3.4e38)")
    return narrowed


def _model_member(data: bytes, max_member_bytes: int, max_total_bytes: int) -> bytes:
    stream = _CappedReader(_decompressed(data), max_total_bytes)
    found: bytes | None = None
    try:
        with tarfile.open(fileobj=stream, mode="r|") as archive:
            for member in archive:
                if member.name not in (MODEL_MEMBER, f"./{MODEL_MEMBER}"):
                    continue
                if not member.isreg():
                    raise ModelFormatError(f"{member.name} is not a regular file")
                if found is not None:
                    raise ModelFormatError(f"the archive holds {MODEL_MEMBER} more than once")
                if member.size > max_member_bytes:
                    raise ModelFormatError(f"{MODEL_MEMBER} is {member.size} bytes, above the {max_member_bytes} limit")
                found = _read_member(archive, member)
        while stream.read(1 << 16):  # drain to the end so gzip verifies its CRC
            pass
    except (tarfile.TarError, OSError, EOFError, zlib.error) as exc:
        raise ModelFormatError(f"not a readable model archive: {exc}") from exc
    if found is None:
        raise ModelFormatError(f"the archive has no {MODEL_MEMBER} member")
    return found


def _read_member(archive: tarfile.TarFile, member: tarfile.TarInfo) -> bytes:
    handle = archive.extractfile(member)
    payload = handle.read() if handle is not None else b""
    if len(payload) != member.size:
        raise ModelFormatError(f"{MODEL_MEMBER} is truncated")
    return payload


def _decompressed(data: bytes) -> io.BufferedIOBase:
    raw = io.BytesIO(data)
    return gzip.GzipFile(fileobj=raw, mode="rb") if data[:2] == b"\x1f\x8b" else raw


class _CappedReader(io.RawIOBase):
    """A read-only stream that fails once more than ``limit`` bytes were read from ``inner``."""

    def __init__(self, inner: io.BufferedIOBase, limit: int) -> None:
        self._inner = inner
        self._left = limit

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: memoryview) -> int:  # type: ignore[override]
        chunk = self._inner.read(min(len(buffer), self._left + 1))
        if len(chunk) > self._left:
            raise ModelFormatError("the archive decompresses beyond the size limit")
        self._left -= len(chunk)
        buffer[: len(chunk)] = chunk
        return len(chunk)
