"""Real-image smoke test: SDSS g-band galaxies through survey_infer.stamps and the shipped mass_to_light bundle.

The real-data tests skip where the shared SDSS images are absent; the synthetic tests always run.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from survey_infer.bundle import default_bundle_path, load_bundle
from survey_infer.engines import EngineUnavailable, make_engine
from survey_infer.flags import FLAG_BITS, NO_ESTIMATE, flag_reasons, image_flags
from survey_infer.stamps import (
    FOV_IN_HALF_LIGHT_RADII,
    cut_stamp,
    find_bright_sources,
    prepare_stamp,
    read_fits_image,
    resample,
    stamp_fov_px,
)
from survey_infer.tasks import get_task

SDSS_DIR = Path(__file__).resolve().parents[2] / "shared" / "realdata" / "images_sdss_astropydata"
G_IMAGE = SDSS_DIR / "reprojected_sdss_g.fits.bz2"
# The three large galaxies in the field (pixel x, y), as seen by eye.
KNOWN_GALAXIES = [(163, 131), (278, 188), (82, 95)]


def _gaussian(shape: tuple[int, int], x: float, y: float, sigma: float, flux: float) -> np.ndarray:
    yy, xx = np.indices(shape)
    return flux * np.exp(-0.5 * ((xx - x) ** 2 + (yy - y) ** 2) / sigma**2) / (2 * np.pi * sigma**2)


@pytest.fixture(scope="module")
def synthetic_image() -> np.ndarray:
    rng = np.random.default_rng(1)
    image = rng.normal(0.0, 1.0, (200, 300))
    image += _gaussian(image.shape, 80, 100, 6.0, 2e4)  # galaxies: r_half = 1.177 sigma
    image += _gaussian(image.shape, 220, 60, 4.0, 8e3)
    image += _gaussian(image.shape, 200, 150, 0.7, 3e4)  # a bright point source
    return image


def test_find_bright_sources_synthetic(synthetic_image):
    sources = find_bright_sources(synthetic_image, n_max=5)
    assert [(round(s.x), round(s.y)) for s in sources] == [(80, 100), (220, 60)]  # brightest first, no star
    assert sources[0].r_half_px == pytest.approx(1.177 * 6.0, rel=0.2)
    assert sources[1].r_half_px == pytest.approx(1.177 * 4.0, rel=0.2)


def test_cut_and_prepare_stamp_synthetic(synthetic_image):
    assert stamp_fov_px(2.0) == 2.0 * FOV_IN_HALF_LIGHT_RADII
    inside = cut_stamp(synthetic_image, (80, 100), 150, 69)
    assert inside.shape == (69, 69) and np.isfinite(inside).all()
    prepared = prepare_stamp(inside)
    assert prepared.shape == (1, 69, 69) and prepared.dtype == np.float32
    assert prepared.min() == -1.0 and prepared.max() == 1.0
    assert np.unravel_index(np.argmax(prepared[0]), (69, 69)) == (34, 34)  # centred like the mocks

    edge = cut_stamp(synthetic_image, (10, 100), 60, 69)  # 20 of 60 px off the left edge
    assert np.isnan(edge[:, :22]).all() and np.isfinite(edge[:, 24:]).all()
    prepared_edge = prepare_stamp(edge)
    assert np.array_equal(np.isnan(prepared_edge[0]), np.isnan(edge))
    assert np.nanmin(prepared_edge) >= -1.0 and np.nanmax(prepared_edge) <= 1.0

    off = cut_stamp(synthetic_image, (-500, -500), 60, 69)  # wholly off the image
    assert off.shape == (69, 69) and np.isnan(off).all() and np.isnan(prepare_stamp(off)).all()

    flags = image_flags(np.stack([prepared, prepared_edge, prepare_stamp(off), prepare_stamp(np.zeros((69, 69)))]))
    assert flag_reasons(flags) == ["", "nan_pixels", "nan_pixels,empty_cutout", "empty_cutout"]


def test_resample_keeps_mean_surface_brightness():
    image = np.arange(100.0).reshape(10, 10)
    assert resample(image, 10) == pytest.approx(image)
    assert resample(image, 5) == pytest.approx(image.reshape(5, 2, 5, 2).mean(axis=(1, 3)))
    assert resample(image, 7).mean() == pytest.approx(image.mean())


@pytest.fixture(scope="module")
def sdss_g():
    if not G_IMAGE.is_file():
        pytest.skip(f"real SDSS images not present: {G_IMAGE} (shared/realdata is not checked out here)")
    return read_fits_image(G_IMAGE)


def test_finds_the_large_galaxies(sdss_g):
    image, wcs = sdss_g
    assert image.shape == (496, 682) and wcs.has_celestial
    sources = find_bright_sources(image, n_max=8)
    assert 5 <= len(sources) <= 8
    found = [(s.x, s.y) for s in sources]
    for x, y in KNOWN_GALAXIES:
        assert min(np.hypot(x - fx, y - fy) for fx, fy in found) < 5, (x, y)
    big = [s for s in sources if min(np.hypot(s.x - x, s.y - y) for x, y in KNOWN_GALAXIES) < 5]
    assert all(s.r_half_px > 8 for s in big)


def _run_bundle(images: np.ndarray):
    bundle = load_bundle(default_bundle_path("mass_to_light"), task="mass_to_light")
    task = get_task("mass_to_light")
    columns = {name: np.full(len(images), np.nan) for name in task.input_columns(bundle)}  # no redshifts
    inputs, flags = task.prepare(images, columns, bundle)
    try:
        engine = make_engine("onnxruntime", bundle, threads=1)
    except EngineUnavailable:
        engine = make_engine("torch", bundle, threads=1)
    outputs = task.postprocess(engine.run(inputs), columns, flags, bundle)
    return bundle, task, outputs, flags


def test_mass_to_light_on_real_galaxies(sdss_g):
    image, _ = sdss_g
    sources = find_bright_sources(image, n_max=8)
    size = 69
    stamps = [cut_stamp(image, (s.x, s.y), stamp_fov_px(s.r_half_px), size) for s in sources]
    good = np.array([np.isfinite(st).all() for st in stamps])
    assert good.sum() >= 4  # the rest run off the image
    stamps += [
        cut_stamp(image, (5, 250), 60, size),  # half off the left edge: partly NaN
        cut_stamp(image, (-1000, -1000), 60, size),  # wholly off the image: all NaN
        np.zeros((size, size)),  # blank
    ]
    images = np.stack([prepare_stamp(st) for st in stamps])
    bundle, task, out, flags = _run_bundle(images)
    assert images.shape[1:] == tuple(bundle.input_spec["image"]["shape"])
    n = len(sources)

    for s, ml, err, flag in zip(sources, out["ml_g"], out["ml_g_err"], flag_reasons(flags)):
        print(f"x={s.x:5.0f} y={s.y:5.0f} r_half={s.r_half_px:5.1f}px ml_g={ml:.3f} +- {err:.3f} flags={flag}")

    ml, err = out["ml_g"][:n], out["ml_g_err"][:n]
    assert np.all(np.isfinite(ml[good])) and np.all((ml[good] >= 0) & (ml[good] <= 6))
    assert np.all(np.isfinite(err[good])) and np.all(err[good] > 0)
    assert np.all(flags[:n][good] & NO_ESTIMATE == 0)
    assert np.all(flags[:n][~good] & FLAG_BITS["nan_pixels"])
    # No distance or luminosity for these galaxies: meta inputs (if the bundle has any) are flagged
    # missing_metadata and filled with the training mean; log_mstar is null (no_luminosity).
    uses_meta = bool(task.meta_spec(bundle))
    assert np.all(((flags & FLAG_BITS["missing_metadata"]) != 0) == uses_meta)
    assert np.all(flags & FLAG_BITS["no_luminosity"]) and np.isnan(out["log_mstar"]).all()

    bad = slice(n, None)
    assert flag_reasons(flags[bad] & (FLAG_BITS["nan_pixels"] | FLAG_BITS["empty_cutout"])) == [
        "nan_pixels", "nan_pixels,empty_cutout", "empty_cutout"]  # fmt: skip
    # postprocess nulls every output of a row with a NO_ESTIMATE bit
    no_estimate = np.concatenate([~good, [True] * 3])
    assert np.array_equal((flags & NO_ESTIMATE) != 0, no_estimate)
    assert np.isnan(out["ml_g"][no_estimate]).all() and np.isnan(out["ml_g_err"][no_estimate]).all()
