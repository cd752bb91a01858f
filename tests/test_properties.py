"""Property-based tests (hypothesis) of store validation and ingest: whatever the input, either a clean refusal
(StoreError/RefusedError whose message names the array, file or column) or a correct run; never another
exception.
"""

from __future__ import annotations

import re
import tempfile
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import pyarrow.parquet as pq
import pytest
import zarr
from astropy.io import fits
from astropy.table import Table
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from survey_infer.config import RunConfig
from survey_infer.errors import RefusedError, StoreError
from survey_infer.flags import FLAG_BITS
from survey_infer.outputs import prepare_output_dir
from survey_infer.pipeline import plan_run
from survey_infer.store import open_cutouts
from survey_infer.tiles import ingest_tiles, open_tiles
from survey_infer.worker import process_unit

FAST = settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@contextmanager
def quiet_tmp_dir() -> Iterator[Path]:
    """A temporary directory, with the warnings that damaged inputs raise (units, dtypes, overflow) silenced."""
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield Path(tmp)


def ingest_or_refusal(ingest: Callable[[], Any], store: Path, names_what: Callable[[str], bool]) -> tuple[bool, Any]:
    """Run an ingest. A refusal (StoreError) must name what is wrong (``names_what(message)``) and leave nothing
    at ``store``; (False, None) then. (True, what the ingest returned) when it ingested."""
    try:
        result = ingest()
    except StoreError as exc:
        message = str(exc)
        assert names_what(message), message
        assert not store.exists(), message  # a refused ingest writes nothing
        event("refused: " + re.sub(r"/\S+", "PATH", message)[:40])
        return False, None
    event("ingested")
    return True, result


DTYPES = ["float32", "float16", "float64", "int16", "uint8", "int64"]


@pytest.fixture(scope="module")
def bundle(tmp_path_factory) -> Path:
    from tests.conftest import make_tiny_bundle

    return make_tiny_bundle(tmp_path_factory.mktemp("prop_bundle") / "tiny")


# ------------------------------------------------------------------------------- cutouts: store validation


@st.composite
def cutouts_layouts(draw) -> dict:
    """A Zarr v3 group that may or may not be a valid cutouts store."""
    n = draw(st.integers(1, 12))
    return {
        "marker": draw(st.sampled_from(["ok"] * 6 + ["missing", "format2", "kind_tiles", "kind_bogus", "not_a_dict"])),
        "images": draw(st.sampled_from(["ok"] * 6 + ["missing", "ndim3", "ndim5"])),
        "image_dtype": draw(st.sampled_from(["float32"] * 4 + DTYPES)),
        "channels": draw(st.integers(1, 2)),
        "size": draw(st.sampled_from([8, 69, 69])),
        "n": n,
        "rows_per_block": draw(st.integers(1, n)),
        "columns": {name: draw(st.sampled_from(["ok"] * 8 + ["missing", "short", "dtype", "misaligned"]))
                    for name in ("object_id", "ra", "dec", "lum_g")},  # fmt: skip
    }


def write_layout(path: Path, layout: dict) -> None:
    group = zarr.open_group(str(path), mode="w", zarr_format=3)
    marker = {"ok": {"format": 1, "kind": "cutouts"}, "missing": None, "format2": {"format": 2, "kind": "cutouts"},
              "kind_tiles": {"format": 1, "kind": "tiles"}, "kind_bogus": {"format": 1, "kind": "bogus"},
              "not_a_dict": "cutouts"}[layout["marker"]]  # fmt: skip
    if marker is not None:
        group.attrs["survey_infer"] = marker
    n, block = layout["n"], layout["rows_per_block"]
    shape = {"ok": (n, layout["channels"], layout["size"], layout["size"]), "ndim3": (n, layout["size"], layout["size"]),
             "ndim5": (n, 1, 1, layout["size"], layout["size"]), "missing": None}[layout["images"]]  # fmt: skip
    if shape is not None:
        images = group.create_array("images", shape=shape, chunks=(block, *shape[1:]), dtype=layout["image_dtype"])
        images[:] = np.ones(shape, dtype=layout["image_dtype"])
    expected = {"object_id": "int64", "ra": "float64", "dec": "float64", "lum_g": "float64"}
    for name, state in layout["columns"].items():
        if state == "missing":
            continue
        length = n + 1 if state == "short" else n
        dtype = "U4" if state == "dtype" and name != "lum_g" else expected[name]
        chunks = (max(1, block - 1) if block > 1 else n + 1,) if state == "misaligned" else (block,)
        if dtype == "U4":
            array = group.create_array(name, shape=(length,), chunks=chunks, dtype=np.dtypes.StringDType())
            array[:] = np.array(["x"] * length, dtype=object)
        else:
            array = group.create_array(name, shape=(length,), chunks=chunks, dtype=dtype)
            array[:] = np.arange(length).astype(dtype)


def _names_a_culprit(message: str, path: Path) -> bool:
    culprits = ["images", "object_id", "ra", "dec", "lum_g", "kind", "format", "survey_infer", str(path)]
    return any(name in message for name in culprits)


@FAST
@given(layout=cutouts_layouts())
def test_cutouts_store_validation_refuses_cleanly_or_accepts_a_consistent_store(layout, bundle):
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")  # zarr warns about string dtypes in v3
        path = Path(tmp) / "store.zarr"
        write_layout(path, layout)
        try:
            info = open_cutouts(path)
        except StoreError as exc:
            assert _names_a_culprit(str(exc), path), str(exc)
            event("refused by open_cutouts")
            return
        assert layout["marker"] == "ok" and layout["images"] == "ok"
        assert info.n_rows == layout["n"] and info.image_shape == (layout["channels"], layout["size"], layout["size"])
        assert layout["image_dtype"] in ("float32", "float16")
        for name in ("object_id", "ra", "dec"):
            assert layout["columns"][name] in ("ok", "misaligned")
        try:
            plan = plan_run(RunConfig(task="mass_to_light", input=path, output=Path(tmp) / "out", bundle=bundle))
        except RefusedError as exc:
            assert _names_a_culprit(str(exc), path), str(exc)
            event("refused by plan_run")
            return
        event("planned")
        assert info.image_shape == (1, 69, 69)
        assert sum(stop - start for start, stop in plan.spec.unit_bounds) == layout["n"]


# ------------------------------------------------------------------------- cutouts: NaN/inf values, a real run


@st.composite
def cutout_values(draw) -> dict:
    n = draw(st.integers(1, 40))
    patterns = draw(st.lists(st.sampled_from(["ok", "one_nan", "one_inf", "all_nan", "neg_inf", "zero", "huge"]),
                             min_size=n, max_size=n))  # fmt: skip
    return {"n": n, "patterns": patterns, "dtype": draw(st.sampled_from(["float32", "float16"])),
            "rows_per_unit": draw(st.sampled_from([4, 8, 64])),
            "meta_nan": draw(st.lists(st.booleans(), min_size=n, max_size=n))}  # fmt: skip


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(values=cutout_values())
def test_nan_and_inf_pixels_are_flagged_and_every_row_comes_out_once(values, bundle):
    from survey_infer.store import create_cutouts_store, write_block

    n, rows_per_unit = values["n"], values["rows_per_unit"]
    rng = np.random.default_rng(n)
    images = rng.uniform(0.1, 1.0, (n, 1, 69, 69))
    for i, pattern in enumerate(values["patterns"]):
        if pattern == "one_nan":
            images[i, 0, 3, 5] = np.nan
        elif pattern == "one_inf":
            images[i, 0, 7, 7] = np.inf
        elif pattern == "all_nan":
            images[i] = np.nan
        elif pattern == "neg_inf":
            images[i, 0, :, 0] = -np.inf
        elif pattern == "zero":
            images[i] = 0.0
        elif pattern == "huge":
            images[i, 0, 10, 10] = 1e30  # inf once stored as float16
    meta = np.where(values["meta_nan"], np.nan, 100.0)
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # float16 overflow of 'huge'
        store, out = Path(tmp) / "s.zarr", Path(tmp) / "out"
        batch = min(rows_per_unit, 4)
        group = create_cutouts_store(store, n, (1, 69, 69), {"distance_mpc": "float64", "lum_g": "float64",
                                     "size_kpc": "float64"}, survey={"bands": ["g"]}, rows_per_unit=rows_per_unit,
                                     rows_per_batch=batch, image_dtype=values["dtype"])  # fmt: skip
        write_block(group, 0, images.astype(values["dtype"]), {"object_id": np.arange(n) * 7 + 3,
                    "ra": np.linspace(10, 11, n), "dec": np.linspace(-5, -4, n), "distance_mpc": meta,
                    "lum_g": meta * 1e8, "size_kpc": meta / 50})  # fmt: skip
        plan = plan_run(RunConfig(task="mass_to_light", input=store, output=out, bundle=bundle, engine="torch"))
        prepare_output_dir(out, resume=False)
        for unit in plan.todo:
            process_unit(plan.spec, unit)
        table = pq.read_table(sorted((out / "parts").glob("*.parquet"))).to_pandas().set_index("object_id")
    assert sorted(table.index) == list(np.arange(n) * 7 + 3)  # every row exactly once
    stored = images.astype(values["dtype"])
    for i, pattern in enumerate(values["patterns"]):
        row = table.loc[i * 7 + 3]
        if not np.isfinite(stored[i]).all():
            assert row["flag"] & FLAG_BITS["nan_pixels"] and np.isnan(row["ml_g"]), (pattern, row)
        elif pattern == "zero":
            assert row["flag"] & FLAG_BITS["empty_cutout"] and np.isnan(row["ml_g"])
        else:
            assert np.isfinite(row["ml_g"]) and row["ml_g"] > 0, (pattern, row)
            assert bool(row["flag"] & FLAG_BITS["missing_metadata"]) == values["meta_nan"][i]


# ------------------------------------------------------------------------------------- tiles: ingest


@st.composite
def tile_inputs(draw) -> dict:
    n = draw(st.integers(0, 12) | st.integers(1, 4))
    return {
        "wcs": draw(st.sampled_from(["tan"] * 4 + ["none", "linear", "singular", "ra_only"])),
        "shape": draw(st.sampled_from([(32, 32)] * 3 + [(40, 24), (1, 32), (32,)])),
        "n": n,
        "coords": draw(st.lists(st.sampled_from(["in"] * 8 + ["off"] * 2 + ["nan", "inf", "dec_over_90"]), min_size=n, max_size=n)),
        "ids": draw(st.sampled_from(["ok"] * 4 + ["text"] + ["dup", "float", "text", "text_bad", "missing"])),
        "ra_col": draw(st.sampled_from(["ra"] * 6 + ["missing"])),
        "format": draw(st.sampled_from([".ecsv", ".fits", ".parquet", ".csv"])),
        "size": draw(st.sampled_from([None, "nan_some", "ok"])),
    }


def _header(kind: str) -> fits.Header:
    header = fits.Header()
    if kind == "none":
        return header
    header["CTYPE1"], header["CTYPE2"] = ("RA---TAN", "DEC--TAN") if kind != "linear" else ("LINEAR", "LINEAR")
    if kind == "ra_only":
        del header["CTYPE2"]
    header["CRVAL1"], header["CRVAL2"], header["CRPIX1"], header["CRPIX2"] = 150.0, 2.0, 16.0, 16.0
    scale = 0.396 / 3600
    header["CD1_1"], header["CD1_2"] = -scale, 0.0
    header["CD2_1"], header["CD2_2"] = (0.0, scale) if kind != "singular" else (-scale, 0.0)
    return header


@FAST
@given(inputs=tile_inputs())
def test_tiles_ingest_refuses_cleanly_or_keeps_every_source_once(inputs):
    with quiet_tmp_dir() as tmp:
        image = tmp / "tile_g.fits"
        fits.PrimaryHDU(np.random.default_rng(0).normal(0, 1, inputs["shape"]).astype(np.float32),
                        header=_header(inputs["wcs"])).writeto(image)  # fmt: skip
        n = inputs["n"]
        step = 0.396 / 3600
        place = {"in": (150.0, 2.0), "off": (151.0, 3.0), "nan": (np.nan, 2.0), "inf": (np.inf, 2.0),
                 "dec_over_90": (150.0, 91.0)}  # fmt: skip
        ra = np.array([place[c][0] + i * step for i, c in enumerate(inputs["coords"])], float)
        dec = np.array([place[c][1] for c in inputs["coords"]], float)
        ids = np.arange(n, dtype=np.int64) + 100
        if inputs["ids"] == "dup" and n > 1:
            ids[1] = ids[0]
        columns = {"ra" if inputs["ra_col"] == "ra" else "RA_J2000": ra, "dec": dec}
        columns["object_id"] = {"ok": ids, "dup": ids, "float": ids + 0.5, "text": ids.astype(str),
                                "text_bad": np.array([f"id{i}" for i in ids]), "missing": None}[inputs["ids"]]  # fmt: skip
        if inputs["size"]:
            columns["r_half_arcsec"] = np.where(np.arange(n) % 2 & (inputs["size"] == "nan_some"), np.nan, 1.5)
        table = Table({k: v for k, v in columns.items() if v is not None})
        sources = tmp / f"sources{inputs['format']}"
        table.write(sources)
        store = tmp / "tiles.zarr"
        names = (str(image), str(sources), "band g", "'ra'", "'dec'", "'object_id'", "'r_half_arcsec'")
        ingested, summary = ingest_or_refusal(
            lambda: ingest_tiles(store, [{"g": str(image)}], sources, size_col="r_half_arcsec" if inputs["size"] else None),
            store, lambda message: any(name in message for name in names))  # fmt: skip
        if not ingested:
            return
        assert inputs["wcs"] == "tan" and len(inputs["shape"]) == 2 and inputs["ra_col"] == "ra"
        assert n > 0 and set(inputs["coords"]) <= {"in", "off"}
        assert inputs["ids"] in ("ok", "text") or (inputs["ids"] == "dup" and n == 1)
        info = open_tiles(store)
        sources_group = zarr.open_group(str(store), mode="r")["sources"]
        assert sorted(np.asarray(sources_group["object_id"][:])) == sorted(ids)  # every source once
        assert summary["sources"] == info.n_rows == n
        assert summary["off_tile"] + sum(summary["tiles"].values()) == n
        assert summary["off_tile"] >= inputs["coords"].count("off")  # a degree away: on no tile, kept


@st.composite
def star_tables(draw) -> dict:
    """A star table with random damage: NaN/inf/negative values, a missing or text column, varying galaxy-level
    columns, galaxies listed out of order."""
    n_gal = draw(st.integers(1, 4))
    counts = draw(st.lists(st.integers(0, 5), min_size=n_gal, max_size=n_gal))
    return {
        "counts": counts,
        "damage": draw(st.sampled_from(["none", "nan_x", "inf_v", "neg_err", "missing_v_err", "text_x",
                                        "ra_varies", "dec_over_90", "shuffled", "float_ids"])),
        "format": draw(st.sampled_from([".ecsv", ".fits", ".parquet", ".csv"])),
    }  # fmt: skip


@FAST
@given(inputs=star_tables())
def test_kinematics_ingest_refuses_cleanly_or_keeps_every_star_once(inputs):
    from survey_infer.kinematics import ingest_kinematics, open_kinematics

    with quiet_tmp_dir() as tmp:
        rng = np.random.default_rng(0)
        gid = np.repeat(np.arange(len(inputs["counts"])) * 7 + 3, inputs["counts"])
        n, damage = len(gid), inputs["damage"]
        columns = {"galaxy_id": gid, "x": rng.normal(0, 0.3, n), "y": rng.normal(0, 0.3, n),
                   "v_los": rng.normal(0, 10, n), "v_err": rng.uniform(1, 3, n), "ra": 150.0 + gid * 0.01,
                   "dec": np.full(n, 2.0), "distance_mpc": np.full(n, 0.1)}  # fmt: skip
        if n and damage == "nan_x":
            columns["x"][n // 2] = np.nan
        if n and damage == "inf_v":
            columns["v_los"][0] = np.inf
        if n and damage == "neg_err":
            columns["v_err"][-1] = -1.0
        if damage == "missing_v_err":
            del columns["v_err"]
        if damage == "text_x":
            columns["x"] = np.array([f"x{i}" for i in range(n)])
        if n > 1 and damage == "ra_varies" and gid[0] == gid[1]:
            columns["ra"] = columns["ra"] + np.arange(n) * 0.1
        if damage == "dec_over_90":
            columns["dec"] = np.full(n, 91.0)
        if damage == "float_ids":
            columns["galaxy_id"] = gid + 0.5
        order = rng.permutation(n) if damage == "shuffled" else np.arange(n)
        table = Table({k: np.asarray(v)[order] for k, v in columns.items()})
        path = tmp / f"stars{inputs['format']}"
        table.write(path)
        store = tmp / "kin.zarr"
        ingested, _ = ingest_or_refusal(
            lambda: ingest_kinematics(path, store), store,
            lambda message: str(path) in message or re.search(r"'(x|y|v_los|v_err|ra|dec|galaxy_id)'", message)
            or "no galaxies" in message or "a kinematics store needs" in message)  # fmt: skip
        if not ingested:
            return
        assert n > 0 and damage in ("none", "shuffled", "ra_varies"), damage
        info = open_kinematics(store)
        group = zarr.open_group(str(store), mode="r")
        assert info.n_rows == len(np.unique(gid)) and info.n_stars == n
        np.testing.assert_array_equal(group["galaxies/star_count"][:], np.bincount(np.unique(gid, return_inverse=True)[1]))
        stored = np.sort(np.asarray(group["stars/v_los"][:]))
        np.testing.assert_allclose(stored, np.sort(columns["v_los"]))  # every star once, nothing altered


@st.composite
def muse_cubes(draw) -> dict:
    """A MUSE-format cube with random damage: NaN/inf patterns, a missing STAT, negative variances, a cube of the
    wrong dimensionality, a spectral axis in frequency, a flux unit that is not a flux density."""
    return {
        "shape": draw(st.sampled_from([(30, 3, 4), (30, 1, 1), (30, 4), (1, 3, 3)])),
        "nan": draw(st.sampled_from(["none", "spaxel", "pixels", "all", "inf"])),
        "stat": draw(st.sampled_from(["ok", "missing", "negative", "zero"])),
        "ctype3": draw(st.sampled_from(["AWAV", "WAVE", "FREQ", None])),
        "bunit": draw(st.sampled_from(["10**(-20)*erg/s/cm**2/Angstrom", "erg/s/cm2/Angstrom", "Jy", None])),
    }


@FAST
@given(inputs=muse_cubes())
def test_ifu_ingest_refuses_cleanly_or_keeps_every_spaxel(inputs):
    from survey_infer.ifu import ingest_ifu, open_ifu

    with quiet_tmp_dir() as tmp:
        rng = np.random.default_rng(1)
        shape = inputs["shape"]
        data = rng.uniform(1.0, 2.0, shape).astype(np.float32)
        var = rng.uniform(0.01, 0.02, shape).astype(np.float32)
        if len(shape) == 3:
            {"spaxel": lambda: data.__setitem__((slice(None), 0, 0), np.nan),
             "pixels": lambda: data.__setitem__((slice(2, 5), -1, -1), np.nan),
             "all": lambda: data.fill(np.nan),
             "inf": lambda: data.__setitem__((0, 0, 0), np.inf),
             "none": lambda: None}[inputs["nan"]]()  # fmt: skip
        var = {"ok": var, "missing": None, "negative": -var, "zero": np.zeros_like(var)}[inputs["stat"]]
        header = fits.Header()
        cards = {"CTYPE1": "RA---TAN", "CTYPE2": "DEC--TAN", "CUNIT1": "deg", "CUNIT2": "deg", "CRVAL1": 150.0,
                 "CRVAL2": 2.0, "CRPIX1": 1.0, "CRPIX2": 1.0, "CD1_1": -5.5e-5, "CD2_2": 5.5e-5, "CRPIX3": 1.0,
                 "CRVAL3": 6e14 if inputs["ctype3"] == "FREQ" else 4750.0,
                 "CD3_3": 1e11 if inputs["ctype3"] == "FREQ" else 1.25,
                 "CUNIT3": "Hz" if inputs["ctype3"] == "FREQ" else "Angstrom"}  # fmt: skip
        if inputs["ctype3"]:
            cards["CTYPE3"] = inputs["ctype3"]
        if inputs["bunit"]:
            cards["BUNIT"] = inputs["bunit"]
        for k, v in cards.items():
            header[k] = v
        hdus = [fits.PrimaryHDU(), fits.ImageHDU(data, header=header, name="DATA")]
        if var is not None:
            stat_header = header.copy()
            squared = {"10**(-20)*erg/s/cm**2/Angstrom": "10**(-40)*erg**2/s**2/cm**4/Angstrom**2",
                       "erg/s/cm2/Angstrom": "erg**2/s**2/cm**4/Angstrom**2"}  # fmt: skip
            if inputs["bunit"] in squared:
                stat_header["BUNIT"] = squared[inputs["bunit"]]
            hdus.append(fits.ImageHDU(var, header=stat_header, name="STAT"))
        cube = tmp / "cube.fits"
        fits.HDUList(hdus).writeto(cube)
        store = tmp / "ifu.zarr"
        ingested, _ = ingest_or_refusal(lambda: ingest_ifu([cube], store), store,
                                        lambda message: str(cube) in message or "cube" in message)  # fmt: skip
        if not ingested:
            return
        info = open_ifu(store)
        assert info.n_rows == 1
        flux = zarr.open_group(str(store), mode="r")[f"cubes/{info.cubes[0].name}/flux"]
        assert flux.shape == shape  # every spaxel kept, NaN ones too
        ivar = zarr.open_group(str(store), mode="r")[f"cubes/{info.cubes[0].name}/ivar"][:]
        assert np.all(np.isfinite(ivar)) and np.all(ivar >= 0)  # bad variances become ivar 0, never NaN or < 0
