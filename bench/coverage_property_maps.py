"""Per-pixel coverage of property_maps' 68% and 95% intervals on held-out mocks (issue 12).

    python bench/coverage_property_maps.py [--n 1000]

Held-out mocks at the accuracy bench's reserved seeds (accuracy_property_maps.test_seeds), pixels inside 2
half-mass radii that are non-empty in the truth; interval = +-1 and +-1.96 x the bundle's per-map error scale
x the network's sigma. Prints the table and the command; writes bench/results/coverage_property_maps.txt.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import accuracy_property_maps as apm  # noqa: E402

from survey_infer.bundle import default_bundle_path  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "coverage_property_maps.txt"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=1000)
    parser.add_argument("--bundle", type=Path, default=None)
    args = parser.parse_args(argv)
    bundle_dir = args.bundle or default_bundle_path("property_maps")
    images, true, _, _ = apm.simulate(args.n, 64, apm.test_seeds(args.n))
    region = apm.half_mass_ellipse_mask(true[:, 0])
    bundle, pred, sigma, _, _ = apm.run_bundle(bundle_dir, images)
    scale = bundle.output_spec.get("maps_err", {}).get("scale", [1.0] * len(apm.MAP_NAMES))
    lines = [f"property_maps per-pixel coverage: bundle {bundle.id}, {args.n} held-out mocks, pixels inside 2 "
             "half-mass radii, non-empty in the truth (nominal 0.683 and 0.950)",
             f"{'map':<18} {'68%':>6} {'95%':>6} {'pixels':>9}"]  # fmt: skip
    for k, name in enumerate(apm.MAP_NAMES):
        ok = region & np.isfinite(true[:, k])
        z = np.abs(true[:, k][ok] - pred[:, k][ok]) / (scale[k] * sigma[:, k][ok])
        lines.append(f"{name:<18} {np.mean(z < 1.0):6.3f} {np.mean(z < 1.959964):6.3f} {int(ok.sum()):9d}")
    lines.append("command: python bench/coverage_property_maps.py " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:])))
    print("\n".join(lines))
    RESULTS.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
