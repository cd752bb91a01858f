"""PNG drawings of a run's products: an object's property maps, a cube's SFH."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from catalogs.run import CubeSFH, ObjectMaps


def _figure(n_panels: int, with_wcs=None):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = min(n_panels, 4)
    rows = int(np.ceil(n_panels / cols))
    fig = plt.figure(figsize=(3.4 * cols, 3.2 * rows))
    axes = [fig.add_subplot(rows, cols, k + 1, projection=with_wcs) for k in range(n_panels)]
    return fig, axes


def _image_panel(fig, ax, name: str, quantity, cmap: str) -> None:
    image = ax.imshow(np.asarray(quantity.value), origin="lower", cmap=cmap)
    ax.set_title(name, fontsize=9)
    fig.colorbar(image, ax=ax, fraction=0.046, label=str(quantity.unit) or "")


def draw_maps(maps: ObjectMaps, png: Path) -> Path:
    """One panel per map, on the sky (the maps' WCS), each with a colour bar in its unit."""
    fig, axes = _figure(len(maps.data), with_wcs=maps.wcs)
    for ax, (name, quantity) in zip(axes, maps.data.items()):
        _image_panel(fig, ax, name, quantity, "viridis")
    fig.suptitle(f"object {maps.object_id}")
    return _save(fig, png)


def draw_sfh(cube: CubeSFH, png: Path) -> Path:
    """The cube's 2-D maps, plus its spatially summed SFH against the age bins."""
    planes = {n: q for n, q in cube.data.items() if q.ndim == 2}
    stacks = {n: q for n, q in cube.data.items() if q.ndim == 3}
    fig, axes = _figure(len(planes) + (1 if stacks else 0))
    for ax, (name, quantity) in zip(axes, planes.items()):
        _image_panel(fig, ax, name, quantity, "magma")
    if stacks:
        ax = axes[-1]
        name, quantity = next(iter(stacks.items()))
        total = np.nansum(np.asarray(quantity.value), axis=(1, 2))
        ages = cube.age_bins_yr if len(cube.age_bins_yr) == len(total) else np.arange(len(total))
        ax.step(ages, total, where="mid")
        ax.set_xscale("log" if len(cube.age_bins_yr) == len(total) else "linear")
        ax.set_xlabel("age (yr)" if len(cube.age_bins_yr) == len(total) else "bin")
        ax.set_title(f"summed {name} [{quantity.unit}]", fontsize=9)
    fig.suptitle(f"cube {cube.cube_id}")
    return _save(fig, png)


def _save(fig, png: Path) -> Path:
    import matplotlib.pyplot as plt

    png = Path(png)
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(png, dpi=90)
    plt.close(fig)
    return png
