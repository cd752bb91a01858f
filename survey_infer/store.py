"""Survey stores (Zarr v3): writing, opening and validating the `cutouts` kind.

A store is a Zarr v3 group whose attrs carry ``{"survey_infer": {"format": 1, "kind": KIND}}`` and the
survey's description. For `cutouts`, ``images`` is (N, C, H, W) float32/float16 and every per-object column is
a 1-D array of length N that shares the images' row blocks. One block of rows (a shard, or a chunk where the
array is not sharded) is one unit of work; inside a block, the inner chunks are the batches read one at a
time, so reading the next batch overlaps inference of the current one.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import zarr
from zarr.codecs import BloscCodec

from survey_infer.errors import StoreError

STORE_FORMAT = 1
STORE_KINDS = ("cutouts", "tiles", "ifu", "kinematics")
IMAGE_ARRAY = "images"
REQUIRED_COLUMNS = {"object_id": np.dtype("int64"), "ra": np.dtype("float64"), "dec": np.dtype("float64")}
IMAGE_DTYPES = (np.dtype("float32"), np.dtype("float16"))
DEFAULT_ROWS_PER_UNIT = 4096
DEFAULT_ROWS_PER_BATCH = 256


IMAGE_CODECS = {  # name -> the images' compressor (None: uncompressed); bench/million.py measures them
    "blosc-lz4": lambda: BloscCodec(cname="lz4", clevel=3, shuffle="shuffle"),
    "blosc-zstd": lambda: BloscCodec(cname="zstd", clevel=1, shuffle="shuffle"),
    "none": lambda: None,
}
DEFAULT_IMAGE_CODEC = "blosc-lz4"


def _compressor(name: str = DEFAULT_IMAGE_CODEC) -> BloscCodec | None:
    if name not in IMAGE_CODECS:
        raise StoreError(f"unknown images codec {name!r}; one of {', '.join(IMAGE_CODECS)}")
    return IMAGE_CODECS[name]()


class RowBlockStore:
    """A store whose rows the pipeline cuts into units of ``rows_per_unit`` (cutouts, kinematics)."""

    path: Path

    @property
    def unit_bounds(self) -> None:
        """None: units come from ``rows_per_unit`` (see the pipeline), not from the store."""
        return None

    def fingerprint(self) -> str:
        return store_fingerprint(self.path)


@dataclass(frozen=True)
class CutoutStoreInfo(RowBlockStore):
    """What the pipeline needs to know about a validated `cutouts` store."""

    path: Path
    n_rows: int
    image_shape: tuple[int, int, int]
    image_dtype: np.dtype
    rows_per_block: int
    rows_per_read: int
    columns: dict[str, np.dtype]
    attrs: dict[str, Any] = field(default_factory=dict)

    @property
    def bands(self) -> list[str]:
        return list(self.attrs.get("bands", []))

    kind: str = "cutouts"

    @property
    def columns_path(self) -> Path:
        """The group that holds the per-object columns."""
        return self.path

    def describe(self) -> dict[str, Any]:
        return {"image_shape": list(self.image_shape)}


def store_fingerprint(path: Path) -> str:
    """sha256 of a store's identity: its path and metadata documents (not its pixels).

    Used to tell whether an output directory holds a run of this same input.
    """
    digest = hashlib.sha256()
    digest.update(str(path.resolve()).encode())
    for meta in sorted(path.glob("**/zarr.json")):
        digest.update(str(meta.relative_to(path)).encode())
        digest.update(meta.read_bytes())
    return digest.hexdigest()


def create_cutouts_store(
    path: str | Path,
    n_rows: int,
    image_shape: tuple[int, int, int],
    columns: dict[str, np.dtype | str],
    *,
    survey: dict[str, Any],
    rows_per_unit: int = DEFAULT_ROWS_PER_UNIT,
    rows_per_batch: int = DEFAULT_ROWS_PER_BATCH,
    image_dtype: str = "float32",
    image_codec: str = DEFAULT_IMAGE_CODEC,
    overwrite: bool = False,
) -> zarr.Group:
    """Create an empty `cutouts` store; the caller fills it block by block (see `write_block`).

    ``survey`` holds the description (name, bands, pixel_scale, zero points, preprocessing...) and is stored
    both under ``survey`` and flattened into the top-level attrs that the format names.
    """
    rows_per_batch = max(1, min(rows_per_batch, n_rows))
    if rows_per_unit > n_rows:  # a small store is one unit: the smallest multiple of the batch that holds it
        rows_per_unit = -(-n_rows // rows_per_batch) * rows_per_batch
    if rows_per_unit % rows_per_batch:
        raise StoreError(f"rows_per_unit ({rows_per_unit}) must be a multiple of rows_per_batch ({rows_per_batch})")
    group = zarr.open_group(str(path), mode="w" if overwrite else "w-", zarr_format=3)
    group.attrs.update(
        {
            "survey_infer": {"format": STORE_FORMAT, "kind": "cutouts"},
            "survey": survey,
            "bands": list(survey.get("bands", [])),
            "pixel_scale": survey.get("pixel_scale"),
            "preprocessing": survey.get("preprocessing", {}),
        }
    )
    group.create_array(
        IMAGE_ARRAY,
        shape=(n_rows, *image_shape),
        chunks=(rows_per_batch, *image_shape),
        shards=(rows_per_unit, *image_shape),
        dtype=image_dtype,
        compressors=_compressor(image_codec),
        fill_value=np.nan if np.dtype(image_dtype).kind == "f" else 0,  # unwritten rows read as NaN: flagged
    )
    for name, dtype in {**REQUIRED_COLUMNS, **columns}.items():
        dtype = np.dtype(dtype)
        fill = np.nan if dtype.kind == "f" else 0
        group.create_array(name, shape=(n_rows,), chunks=(rows_per_unit,), dtype=dtype, fill_value=fill)
    return group


def write_block(group: zarr.Group, start: int, images: np.ndarray, columns: dict[str, np.ndarray]) -> None:
    """Write rows [start, start+len) of the images and every given column (aligned to whole blocks)."""
    stop = start + len(images)
    group[IMAGE_ARRAY][start:stop] = images
    for name, values in columns.items():
        group[name][start:stop] = values


def _open_group(path: Path) -> zarr.Group:
    if not path.exists():
        raise StoreError(f"store {path} does not exist")
    if not path.is_dir():
        raise StoreError(f"store {path} is not a directory (a Zarr v3 group was expected)")
    try:
        group = zarr.open_group(str(path), mode="r")
    except Exception as exc:  # zarr raises several types for "not a group"
        raise StoreError(f"store {path} is not a Zarr group: {exc}") from exc
    if group.metadata.zarr_format != 3:
        raise StoreError(f"store {path} is Zarr format {group.metadata.zarr_format}; Zarr v3 was expected")
    return group


def _kind_of(group: zarr.Group, path: Path) -> str:
    marker = group.attrs.get("survey_infer")
    if not isinstance(marker, dict) or "kind" not in marker:
        raise StoreError(
            f"store {path} is not a survey-infer store: its attrs lack "
            f'{{"survey_infer": {{"format": {STORE_FORMAT}, "kind": ...}}}}'
        )
    if marker.get("format") != STORE_FORMAT:
        raise StoreError(f"store {path} has survey_infer format {marker.get('format')!r}; format {STORE_FORMAT} was expected")
    if marker["kind"] not in STORE_KINDS:
        raise StoreError(f"store {path} has unknown kind {marker['kind']!r}; one of {STORE_KINDS} was expected")
    return marker["kind"]


def store_kind(path: str | Path) -> str:
    """The kind of a survey-infer store, refusing anything that is not one."""
    return _kind_of(_open_group(Path(path)), Path(path))


def open_store(path: Path, kind: str) -> zarr.Group:
    """The store's group (opened once), refused unless it is a survey-infer store of ``kind``."""
    group = _open_group(path)
    actual = _kind_of(group, path)
    if actual != kind:
        raise StoreError(f"store {path} is of kind {actual!r}; a {kind!r} store was expected")
    return group


def _row_block(array: zarr.Array) -> int:
    shards = getattr(array, "shards", None)
    return int((shards or array.chunks)[0])


def open_cutouts(path: str | Path) -> CutoutStoreInfo:
    """Open and validate a `cutouts` store; refuse it with a message naming the array at fault."""
    path = Path(path)
    group = open_store(path, "cutouts")
    arrays = dict(group.arrays())
    if IMAGE_ARRAY not in arrays:
        raise StoreError(f"store {path} has no '{IMAGE_ARRAY}' array; (N, C, H, W) float32 or float16 was expected")
    images = arrays.pop(IMAGE_ARRAY)
    if images.ndim != 4:
        raise StoreError(f"array '{IMAGE_ARRAY}' in {path} has shape {images.shape}; 4 axes (N, C, H, W) were expected")
    if np.dtype(images.dtype) not in IMAGE_DTYPES:
        raise StoreError(f"array '{IMAGE_ARRAY}' in {path} has dtype {images.dtype}; float32 or float16 was expected")
    n_rows = int(images.shape[0])
    rows_per_block = _row_block(images)
    columns: dict[str, np.dtype] = {}
    for name, array in arrays.items():
        if array.ndim != 1 or array.shape[0] != n_rows:
            raise StoreError(
                f"column '{name}' in {path} has shape {array.shape}; ({n_rows},) was expected, "
                f"the length of '{IMAGE_ARRAY}'"
            )
        if _row_block(array) % rows_per_block and rows_per_block % _row_block(array):
            raise StoreError(
                f"column '{name}' in {path} is chunked by {_row_block(array)} rows, which does not align with the "
                f"{rows_per_block}-row blocks of '{IMAGE_ARRAY}'"
            )
        columns[name] = np.dtype(array.dtype)
    for name, dtype in REQUIRED_COLUMNS.items():
        if name not in columns:
            raise StoreError(f"store {path} has no '{name}' column; ({n_rows},) {dtype} was expected")
        if columns[name].kind != dtype.kind:
            raise StoreError(f"column '{name}' in {path} has dtype {columns[name]}; {dtype} was expected")
    return CutoutStoreInfo(
        path=path,
        n_rows=n_rows,
        image_shape=tuple(int(s) for s in images.shape[1:]),
        image_dtype=np.dtype(images.dtype),
        rows_per_block=rows_per_block,
        rows_per_read=int(images.chunks[0]),
        columns=columns,
        attrs=dict(group.attrs),
    )


def check_positions(info: CutoutStoreInfo, rows_per_read: int = 1 << 20) -> None:
    """Refuse a store whose ``ra``/``dec`` hold NaN, inf or out-of-range values: a row without a sky position
    cannot be placed in the run's sky-partitioned catalog. Reads the two columns (16 bytes a row) in pieces."""
    group = zarr.open_group(str(info.path), mode="r")
    limits = {"ra": (-360.0, 720.0), "dec": (-90.0, 90.0)}
    for start in range(0, info.n_rows, rows_per_read):
        stop = min(start + rows_per_read, info.n_rows)
        for name, (low, high) in limits.items():
            values = np.asarray(group[name][start:stop], dtype=np.float64)
            with np.errstate(invalid="ignore"):
                bad = np.flatnonzero(~np.isfinite(values) | (values < low) | (values > high))
            if bad.size:
                raise StoreError(
                    f"column '{name}' in {info.path} has {bad.size} non-finite or out-of-range values in rows "
                    f"{start}-{stop} (first rows {(bad[:5] + start).tolist()}); every row needs a sky position in degrees"
                )


def read_columns(path: Path, start: int, stop: int, names: list[str]) -> dict[str, np.ndarray]:
    """Read rows [start, stop) of the named per-object columns."""
    group = zarr.open_group(str(path), mode="r")
    return {name: np.asarray(group[name][start:stop]) for name in names}


def iter_image_batches(path: Path, start: int, stop: int, rows_per_read: int) -> Iterator[tuple[int, np.ndarray]]:
    """Yield (offset, images) for rows [start, stop) one stored chunk at a time, as float32."""
    images = zarr.open_group(str(path), mode="r")[IMAGE_ARRAY]
    for batch_start in range(start, stop, rows_per_read):
        batch_stop = min(batch_start + rows_per_read, stop)
        yield batch_start - start, np.ascontiguousarray(images[batch_start:batch_stop], dtype=np.float32)
