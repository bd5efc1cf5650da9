"""Read and write the MXNet NDArray-list files inside SageMaker KMeans's ``model.tar.gz``.

SageMaker's built-in KMeans saves its model as ``model_algo-1``: an MXNet ``NDArray::Save`` list
holding one float32 array of shape (k, feature_dim). Next to it the archive holds
``state_<uuid4>``: another NDArray list with the mini-batch stage's K = k x extra_center_factor
local centers and their weights (see :class:`ModelState`). We implement the format with ``struct``
and numpy only, so Centroid can serve SageMaker-trained models and hand SageMaker-compatible models
back without MXNet.

Layout (all little-endian)::

    u64 0x112 (list magic) | u64 reserved | u64 array count
    per array, one of:
        u32 magic (V1 0xF993FAC8, V2 0xF993FAC9, V3 0xF993FACA)
        i32 storage type (V2/V3 only; 0 = dense)
        i32 ndim | ndim x i64 dims | i32 dev_type | i32 dev_id | i32 type_flag | raw C-order data
    or, in legacy files (MXNet before the V1 magic, 2017), no magic at all:
        u32 ndim | ndim x u32 dims | i32 dev_type | i32 dev_id | i32 type_flag | raw C-order data
    u64 name count | per name: u64 length + bytes

MXNet's ``NDArray::Load`` tells the two apart by the first u32: anything but the V2/V3 magics goes
to ``LegacyLoad``, which takes V1 or else reads that u32 as the legacy ``ndim``
(``LegacyTShapeLoad``). We accept a legacy ndim of 1 to :data:`MAX_NDIM`; ndim 0 was how old
MXNet wrote an empty ("none") array, which holds no data and is refused like V1/V2 ndim 0.

The reader treats every file as hostile: each length is checked against the bytes that remain
*before* anything is allocated, so a corrupt or malicious file raises :class:`ModelFormatError`
instead of crashing or exhausting memory.
"""

from __future__ import annotations

import gzip
import io
import re
import struct
import tarfile
import uuid
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
STATE_PREFIX = "state_"  # + a random uuid4, as SageMaker names it
# The state list's array names: SageMaker stores the weights first, named "1", then the centers, "0".
STATE_WEIGHTS_NAME = "1"
STATE_CENTERS_NAME = "0"
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
# The smallest possible serialized array (legacy, ndim 0 is rejected, so ndim 1 with one u32 dim,
# then dev_type, dev_id and type_flag): used to bound counts.
_MIN_ARRAY_BYTES = 4 + 4 + 4 + 4 + 4
_MAX_LEGACY_DIM = 2**32 - 1
_STATE_NAME = re.compile(r"(?:\./)?state_[^/]+")


class ModelFormatError(ValueError):
    """The bytes are not a valid (supported) MXNet NDArray list or SageMaker model archive."""


@dataclass(frozen=True)
class NDArrayHeader:
    """Per-array metadata that is not part of the numpy array but is needed to rewrite the file.

    ``magic`` is None for a legacy array (no magic, u32 shape); ``storage_type`` is None for
    legacy and V1 arrays, which have no such field."""

    magic: int | None = V2_MAGIC
    storage_type: int | None = DENSE_STORAGE
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

    def u32(self, what: str) -> int:
        return self.unpack("<I", what)[0]


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
    first = reader.u32(f"{what} magic")
    magic: int | None
    if first in (V1_MAGIC, V2_MAGIC, V3_MAGIC):
        magic = first
        storage_type = None if magic == V1_MAGIC else reader.i32(f"{what} storage type")
        if storage_type not in (None, DENSE_STORAGE):
            raise ModelFormatError(f"{what}: sparse storage type {storage_type} is not supported")
        shape = _read_shape(reader, what)
    elif 1 <= first <= MAX_NDIM:  # no magic: a legacy array, and this u32 is its ndim (LegacyTShapeLoad)
        magic, storage_type = None, None
        shape = reader.unpack(f"<{first}I", f"{what} legacy shape")
    elif first == 0:
        raise ModelFormatError(f"{what}: legacy ndim 0 (an empty MXNet array) is not supported")
    else:
        raise ModelFormatError(f"{what}: unsupported NDArray magic {first:#x} (nor a legacy ndim in [1, {MAX_NDIM}])")
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
    if header.magic is None:  # legacy: no magic, u32 ndim and dims
        if max(array.shape) > _MAX_LEGACY_DIM:
            raise ValueError(f"a legacy array's dimensions must fit in 32 bits, got {array.shape}")
        parts = [struct.pack(f"<I{array.ndim}I", array.ndim, *array.shape)]
    else:
        parts = [struct.pack("<I", header.magic)]
        if header.magic != V1_MAGIC:
            parts.append(struct.pack("<i", DENSE_STORAGE if header.storage_type is None else header.storage_type))
        parts.append(struct.pack(f"<i{array.ndim}q", array.ndim, *array.shape))
    parts.append(struct.pack("<iii", header.dev_type, header.dev_id, flag))
    parts.append(np.ascontiguousarray(array, dtype=_TYPE_FLAGS[flag]).tobytes())
    return b"".join(parts)


@dataclass(frozen=True)
class ModelState:
    """What SageMaker's ``state_<uuid>`` member holds: the mini-batch stage's K local centers,
    (K, d), and their weights, (K,), before the reduction to k centers.

    On disk (as SageMaker writes it) it is an NDArray list of two V2 dense float32 arrays on cpu 0:
    the weights as a (K, 1) column named ``"1"``, then the centers named ``"0"``.
    """

    centers: np.ndarray
    weights: np.ndarray

    def to_ndarray_list(self, feature_dim: int | None = None) -> NDArrayList:
        """The list SageMaker writes; ValueError if the state is not K >= 1 finite float32-range
        centers (of ``feature_dim`` columns, when given) with as many non-negative weights."""
        centers = np.asarray(self.centers, dtype=np.float64)
        weights = np.asarray(self.weights, dtype=np.float64)
        if weights.ndim == 2 and weights.shape[1:] == (1,):
            weights = weights[:, 0]
        if centers.ndim != 2 or 0 in centers.shape:
            raise ValueError(f"state centers must be a non-empty (K, d) matrix, got shape {centers.shape}")
        if feature_dim is not None and centers.shape[1] != feature_dim:
            raise ValueError(f"state centers have {centers.shape[1]} features, the model {feature_dim}")
        if weights.shape != (len(centers),):
            raise ValueError(f"state weights must have shape ({len(centers)},), got {weights.shape}")
        with np.errstate(over="ignore"):
            narrowed = [weights[:, None].astype(np.float32), centers.astype(np.float32)]
        if not all(np.isfinite(array).all() for array in narrowed):
            raise ValueError("state centers and weights must be finite and within the float32 range")
        if (narrowed[0] < 0).any():
            raise ValueError("state weights must be non-negative")
        return NDArrayList(arrays=narrowed, names=[STATE_WEIGHTS_NAME, STATE_CENTERS_NAME])

    @classmethod
    def from_ndarray_list(cls, lst: NDArrayList) -> ModelState:
        """Parse a state list (arrays found by name, either order); ModelFormatError if invalid."""
        if len(lst.arrays) != 2 or sorted(lst.names) != sorted([STATE_WEIGHTS_NAME, STATE_CENTERS_NAME]):
            raise ModelFormatError(
                f"a state list holds 2 arrays named '1' (weights) and '0' (centers), got {len(lst.arrays)} "
                f"named {lst.names}"
            )
        by_name = dict(zip(lst.names, lst.arrays, strict=True))
        weights, centers = by_name[STATE_WEIGHTS_NAME], by_name[STATE_CENTERS_NAME]
        if centers.ndim != 2 or 0 in centers.shape or centers.dtype.kind != "f":
            raise ModelFormatError(f"state centers must be a non-empty float (K, d) matrix, got {centers.shape}")
        if weights.dtype.kind != "f" or weights.shape not in ((len(centers), 1), (len(centers),)):
            raise ModelFormatError(
                f"state weights must be a float ({len(centers)}, 1) column, got {weights.dtype} {weights.shape}"
            )
        if not (np.isfinite(centers).all() and np.isfinite(weights).all()) or (weights < 0).any():
            raise ModelFormatError("state centers and weights must be finite, the weights non-negative")
        return cls(centers=centers, weights=weights.reshape(len(centers)))


def write_model_tar(
    centers: np.ndarray, state: ModelState | None = None, *, state_id: uuid.UUID | None = None
) -> bytes:
    """Build a SageMaker-style ``model.tar.gz``: ``model_algo-1`` with ``centers`` and, when
    ``state`` is given, ``state_<uuid4>`` with the local centers and weights.

    Mirrors the real artifact: a ustar archive of 0644 members owned by uid/gid 0; the model is a V2
    dense float32 (k, d) array on cpu 0 with no names, the state as :class:`ModelState` describes.
    The state member's uuid is random unless ``state_id`` is given. Timestamps are fixed at 0, so
    the same inputs (and ``state_id``) always give the same bytes.
    """
    matrix = np.asarray(centers)
    if matrix.ndim != 2 or 0 in matrix.shape:
        raise ValueError(f"centers must be a non-empty (k, d) matrix, got shape {matrix.shape}")
    members = [(MODEL_MEMBER, write_ndarray_list(NDArrayList(arrays=[matrix.astype(np.float32)])))]
    if state is not None:
        payload = write_ndarray_list(state.to_ndarray_list(feature_dim=matrix.shape[1]))
        members.append((f"{STATE_PREFIX}{uuid.uuid4() if state_id is None else state_id}", payload))
    tar_bytes = io.BytesIO()
    with tarfile.open(fileobj=tar_bytes, mode="w", format=tarfile.USTAR_FORMAT) as archive:
        for name, payload in members:
            info = tarfile.TarInfo(name)
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
    is read; links, other paths and duplicates are refused. Other members (such as the
    ``state_<uuid>`` one, present or not) are skipped unread. Decompression is capped at
    ``max_total_bytes`` and the member at ``max_member_bytes``, so a gzip bomb fails fast.
    """
    payload, _ = _archive_members(data, max_member_bytes, max_total_bytes, with_state=False)
    return _centroids(payload)


def read_model_state(
    data: bytes,
    *,
    max_member_bytes: int = DEFAULT_MAX_BYTES,
    max_total_bytes: int = DEFAULT_MAX_BYTES,
) -> ModelState | None:
    """The ``state_<uuid>`` member of a model archive, or None when it has none.

    Same safety rules and caps as :func:`read_model_tar`; the archive must also hold a valid
    ``model_algo-1``, whose feature count the state must share. More than one state member is
    refused.
    """
    payload, states = _archive_members(data, max_member_bytes, max_total_bytes, with_state=True)
    feature_dim = _centroids(payload).shape[1]
    if not states:
        return None
    if len(states) > 1:
        raise ModelFormatError(f"the archive holds {len(states)} state members: {[name for name, _ in states]}")
    ((name, raw),) = states
    try:
        state = ModelState.from_ndarray_list(read_ndarray_list(raw))
    except ModelFormatError as exc:
        raise ModelFormatError(f"{name}: {exc}") from exc
    if state.centers.shape[1] != feature_dim:
        raise ModelFormatError(f"{name} holds {state.centers.shape[1]}-feature centers, the model {feature_dim}")
    return state


def _centroids(payload: bytes) -> np.ndarray:
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


def _archive_members(
    data: bytes, max_member_bytes: int, max_total_bytes: int, *, with_state: bool
) -> tuple[bytes, list[tuple[str, bytes]]]:
    """(``model_algo-1``'s bytes, [(name, bytes) of each ``state_*`` member if ``with_state``])."""
    stream = _CappedReader(_decompressed(data), max_total_bytes)
    found: bytes | None = None
    states: list[tuple[str, bytes]] = []
    try:
        with tarfile.open(fileobj=stream, mode="r|") as archive:
            for member in archive:
                if member.name in (MODEL_MEMBER, f"./{MODEL_MEMBER}"):
                    _check_member(member, max_member_bytes)
                    if found is not None:
                        raise ModelFormatError(f"the archive holds {MODEL_MEMBER} more than once")
                    found = _read_member(archive, member)
                elif with_state and _STATE_NAME.fullmatch(member.name):
                    _check_member(member, max_member_bytes)
                    states.append((member.name, _read_member(archive, member)))
        while stream.read(1 << 16):  # drain to the end so gzip verifies its CRC
            pass
    except (tarfile.TarError, OSError, EOFError, zlib.error) as exc:
        raise ModelFormatError(f"not a readable model archive: {exc}") from exc
    if found is None:
        raise ModelFormatError(f"the archive has no {MODEL_MEMBER} member")
    return found, states


def _check_member(member: tarfile.TarInfo, max_member_bytes: int) -> None:
    if not member.isreg():
        raise ModelFormatError(f"{member.name} is not a regular file")
    if member.size > max_member_bytes:
        raise ModelFormatError(f"{member.name} is {member.size} bytes, above the {max_member_bytes} limit")


def _read_member(archive: tarfile.TarFile, member: tarfile.TarInfo) -> bytes:
    handle = archive.extractfile(member)
    payload = handle.read() if handle is not None else b""
    if len(payload) != member.size:
        raise ModelFormatError(f"{member.name} is truncated")
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
