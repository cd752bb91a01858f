"""The `survey-infer` command line.

Exit status: 0 every unit done; 1 some unit failed; 2 refused before any work (bad input or arguments).
`training`, `deploy` and `catalogs` are reached through lazy imports of their public functions, so the runtime
package never depends on them.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

from survey_infer.errors import RefusedError

EXIT_REFUSED = 2


def _add_run_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--bundle", type=Path, help="model bundle directory (default: the shipped one)")
    parser.add_argument("--engine", default="auto", help="auto|torch|onnxruntime|tensorrt (default: auto)")
    parser.add_argument("--device", default="auto", help="auto|cpu|cuda (default: auto)")
    parser.add_argument("--precision", default="fp32", choices=["fp32", "fp16", "int8"],
                        help="int8: the bundle's quantized ONNX model (`survey-infer quantize`) or an int8 TensorRT "
                             "plan; fp16: TensorRT or torch on a GPU (default fp32)")
    parser.add_argument("--workers", type=int, default=1, help="LocalCluster worker processes (default 1)")
    parser.add_argument("--threads-per-worker", type=int, help="threads per worker (default: cores / workers)")
    parser.add_argument("--in-process", action="store_true",
                        help="LocalCluster workers as threads of this process: faster, no fault isolation")
    parser.add_argument("--engine-threads", type=int, help="threads per inference call (default: cores left per thread)")
    parser.add_argument("--scheduler", help="address of a running Dask scheduler instead of a LocalCluster")
    parser.add_argument("--cluster", default="local", choices=["local", "cuda", "slurm", "pbs"],
                        help="local: LocalCluster (default); cuda: dask-cuda, one worker per GPU; slurm|pbs: "
                             "dask-jobqueue batch jobs, one worker each (--jobs, --cores, --memory, ...)")
    parser.add_argument("--jobs", type=int, help="slurm|pbs: batch jobs, one Dask worker each (default 1)")
    parser.add_argument("--cores", type=int, help="slurm|pbs: cores (worker threads) per job (default 1)")
    parser.add_argument("--memory", help="slurm|pbs: memory per job, e.g. 16GB (default 4GB)")
    parser.add_argument("--walltime", help="slurm|pbs: job time limit, HH:MM:SS (default 01:00:00)")
    parser.add_argument("--queue", help="slurm|pbs: partition / queue")
    parser.add_argument("--account", help="slurm|pbs: account / project to charge")
    parser.add_argument("--interface", help="slurm|pbs: network interface of scheduler and workers, e.g. lo or ib0")
    parser.add_argument("--worker-wait", type=float, metavar="SECONDS",
                        help="slurm|pbs: refuse the run if no worker joined after this long (default: wait)")
    parser.add_argument("--rows-per-unit", type=int, help="rows per unit of work (multiple of the store's blocks)")
    parser.add_argument("--max-in-flight", type=int, help="units in flight at once (default 2 per worker thread)")
    parser.add_argument("--retries", type=int, default=2, help="retries of a failing unit (default 2)")
    parser.add_argument("--overwrite", action="store_true", help="replace a different run in --output")
    parser.add_argument("--no-catalog", action="store_true", help="skip building the HATS catalog")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--task-option", action="append", default=[], metavar="KEY=VALUE",
                        help="a task option, e.g. 'samples=200' (mass_profiles: posterior samples per galaxy); repeatable")
    parser.add_argument("--ood-threshold", type=float, metavar="Q",
                        help="flag rows ood above this quantile (0-1) of the bundle's held-out in-distribution "
                             "ood_score distribution (default: the bundle's threshold, its 0.99 quantile)")


def _add_ingest_parser(sub: argparse._SubParsersAction) -> None:
    ingest = sub.add_parser("ingest", help="turn FITS images and catalogs into a survey store")
    kinds = ingest.add_subparsers(dest="kind", required=True)
    tiles = kinds.add_parser("tiles", help="multi-band FITS tiles with WCS + a source catalog -> a tiles store",
                             description="Cutouts are cut from the tiles at run time, at each bundle's framing.")
    tiles.add_argument("store", type=Path, help="the tiles store to write (Zarr v3)")
    tiles.add_argument("--images", action="append", required=True, metavar="BAND=FILE[,BAND=FILE...]",
                       help="the bands of one tile, e.g. 'g=a_g.fits,r=a_r.fits.bz2,i=a_i.fits[1]'; once per tile")
    tiles.add_argument("--sources", type=Path, required=True, help="source catalog (.fits, .ecsv, .parquet, .csv)")
    tiles.add_argument("--ra-col", default="ra", help="RA column, deg (default ra)")
    tiles.add_argument("--dec-col", default="dec", help="Dec column, deg (default dec)")
    tiles.add_argument("--id-col", default="object_id", help="integer object id column (default object_id)")
    tiles.add_argument("--size-col", help="half-light radius column, e.g. 'petroR50[1]' (default: measured on the tile)")
    tiles.add_argument("--size-unit", default="arcsec", help="unit of --size-col when the catalog gives none")
    tiles.add_argument("--keep", action="append", default=[], metavar="COLUMN",
                       help="copy this catalog column into the store (e.g. lum_g for log M*); repeatable")
    tiles.add_argument("--reproject", action="store_true",
                       help="resample bands on another pixel grid onto the first band's (default: refuse them)")
    tiles.add_argument("--overwrite", action="store_true")

    kin = kinds.add_parser("kinematics", help="a star table (positions + line-of-sight velocities) -> a kinematics store",
                           description="Reads FITS, ECSV, CSV or Parquet (astropy); one row per star. Galaxy-level "
                                       "columns (ra, dec, distance, r_half) come from --galaxies, or from the star "
                                       "table where they are constant per galaxy.")  # fmt: skip
    kin.add_argument("table", type=Path, help="the star table")
    kin.add_argument("--output", type=Path, required=True, help="the kinematics store to write (Zarr v3)")
    kin.add_argument("--galaxies", type=Path, help="a galaxy table (same galaxy id column) with ra, dec, distance")
    kin.add_argument("--galaxy-id-col", default="galaxy_id", help="integer galaxy id column (default galaxy_id)")
    kin.add_argument("--x-col", default="x", help="projected x about the galaxy centre (default x)")
    kin.add_argument("--y-col", default="y", help="projected y about the galaxy centre (default y)")
    kin.add_argument("--v-col", default="v_los", help="line-of-sight velocity, km/s (default v_los)")
    kin.add_argument("--v-err-col", default="v_err", help="velocity error, km/s (default v_err)")
    kin.add_argument("--position-unit", choices=["kpc", "arcsec"], default="kpc",
                     help="unit of x, y (and r_half) when the table gives none (default kpc)")
    kin.add_argument("--ra-col", default="ra", help="galaxy RA, deg (default ra)")
    kin.add_argument("--dec-col", default="dec", help="galaxy Dec, deg (default dec)")
    kin.add_argument("--distance-col", default="distance_mpc",
                     help="galaxy distance, Mpc (default distance_mpc; needed for arcsec positions)")
    kin.add_argument("--r-half-col", help="galaxy half-light radius column, kept in the store (optional)")
    kin.add_argument("--galaxies-per-unit", type=int, default=256, help="galaxies per unit of work (default 256)")
    kin.add_argument("--overwrite", action="store_true")

    ifu = kinds.add_parser("ifu", help="MUSE-format FITS cubes (+ HST photometry maps) -> an ifu store (task sfh)",
                           description="Reads DATA and STAT (variance) extensions with a 3-D WCS whose third axis "
                                       "is wavelength (AWAV/WAVE); flux units converted to 1e-20 erg/s/cm2/A; "
                                       "NaN spaxels kept (flagged nan_pixels by a run). One cube = one catalog row.")  # fmt: skip
    ifu.add_argument("cubes", type=Path, nargs="+", help="FITS cube(s), then the store to write (Zarr v3) last")
    ifu.add_argument("--photometry", action="append", default=[], metavar="BAND=FILE[,BAND=FILE...]",
                     help="HST images on the cube's spaxel grid (F275W, F336W, F438W, F555W, F814W; f_lambda, an "
                          "ERR or IVAR extension if any), once per cube in order")
    ifu.add_argument("--redshift", type=float, action="append", default=[], help="each cube's redshift (default 0)")
    ifu.add_argument("--spaxels-per-batch", type=int, default=256, help="spaxels read per batch (default 256)")
    ifu.add_argument("--overwrite", action="store_true")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="survey-infer", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run a task over a survey store")
    run.add_argument("task", help="task id (see `survey-infer bundles`)")
    run.add_argument("--input", type=Path, required=True, help="input survey store (Zarr v3)")
    run.add_argument("--output", type=Path, required=True, help="output directory")
    _add_run_arguments(run)

    mock = sub.add_parser("mock", help="write a mock survey store with its truth")
    mock.add_argument("kind", choices=["cutouts", "clusters", "kinematics", "ifu"],
                      help="cutouts: mock galaxies (SDSS); clusters: mock M31 star clusters (HST, star_clusters); "
                           "kinematics: mock dwarf galaxies' stars (mass_profiles)")
    mock.add_argument("store", type=Path)
    mock.add_argument("--n", type=int, default=1000)
    mock.add_argument("--size", type=int, choices=[69, 128], default=69)
    mock.add_argument("--seed", type=int, default=0)
    mock.add_argument("--bands", default=None,
                      help="cutouts: SDSS bands, e.g. g or ugriz (default g); clusters: F336W,F475W,F814W (default) "
                           "or F336W,F438W,F814W")
    mock.add_argument("--maps", action="store_true", help="also write resolved truth maps (STORE.truth_maps.zarr)")
    mock.add_argument("--rows-per-unit", type=int, default=4096, help="rows per store block (one unit of work)")
    mock.add_argument("--rows-per-batch", type=int, default=256, help="rows per inner chunk (one read)")
    mock.add_argument("--grid", choices=["tiny", "small", "full"], default="small",
                      help="kinematics: the halo DF grid, tiny (8 DFs), small (24 DFs, ~1 min to build) or full "
                           "(the training grid, 104 DFs)")
    mock.add_argument("--position-unit", choices=["kpc", "arcsec"], default="kpc", help="kinematics: unit of x, y")
    mock.add_argument("--cubes", type=int, default=4, help="ifu: mock cubes (default 4)")
    mock.add_argument("--spaxels", type=int, default=24, help="ifu: spaxels per cube side (default 24)")
    mock.add_argument("--overwrite", action="store_true")

    train = sub.add_parser("train", help="train a bundle on simulated data (needs the training code)")
    train.add_argument("task", choices=["mass_to_light"])
    train.add_argument("--output", type=Path, required=True, help="directory to write the bundle into")
    train.add_argument("--n-train", type=int, default=20000)
    train.add_argument("--n-val", type=int, default=2000)
    train.add_argument("--epochs", type=int, default=20)
    train.add_argument("--size", type=int, choices=[69, 128], default=69)
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--name", default="base")
    train.add_argument("--version", type=int, default=1)
    train.add_argument("--images-only", action="store_true",
                       help="no per-object inputs (default: image + distance, L_g, size)")
    train.add_argument("--width", type=int, default=32, help="channels of the first convolution (default 32)")
    train.add_argument("--batch-size", type=int, default=64)
    train.add_argument("--time-budget", type=float, help="seconds: start no epoch that would end later")
    train.add_argument("--overwrite", action="store_true", help="replace an existing bundle directory")

    _add_ingest_parser(sub)

    export = sub.add_parser("export", help="export a bundle's model.onnx (deploy)",
                            description="Checked with onnx.checker and by ONNX Runtime against PyTorch float32 on "
                                        "random inputs of two batch sizes (and real rows with --check-store).")  # fmt: skip
    export.add_argument("bundle", type=Path)
    export.add_argument("--check-store", type=Path, help="also check on real rows of this cutouts store")
    export.add_argument("--check-rows", type=int, default=256, help="rows of --check-store to check (default 256)")

    submit = sub.add_parser("submit", help="write a batch script (sbatch/qsub) that runs one whole `run` as one job, "
                                           "and submit it",
                            description="For sites that forbid long-lived schedulers on login nodes: the job runs "
                                        "`survey-infer run` with its own LocalCluster (or --cluster cuda) on the node "
                                        "it gets. --cores/--memory/--walltime/--queue/--account size the job.")  # fmt: skip
    submit.add_argument("task", help="task id (see `survey-infer bundles`)")
    submit.add_argument("--input", type=Path, required=True, help="input survey store (Zarr v3)")
    submit.add_argument("--output", type=Path, required=True, help="output directory")
    _add_run_arguments(submit)
    submit.add_argument("--system", choices=["slurm", "pbs"], help="batch system (default: slurm if sbatch is on PATH, else pbs)")
    submit.add_argument("--gpus", type=int, help="GPUs to ask for (slurm --gres=gpu:N, pbs ngpus=N)")
    submit.add_argument("--job-name", default="survey-infer", help="batch job name (default survey-infer)")
    submit.add_argument("--setup", action="append", default=[], metavar="SHELL",
                        help="a shell line run before the job's command, e.g. 'module load cuda'; repeatable")
    submit.add_argument("--script", type=Path, help="where to write the script (default OUTPUT.job.sh beside --output)")
    submit.add_argument("--dry-run", action="store_true", help="print the script; write and submit nothing")

    build_engine = sub.add_parser("build-engine", help="build and cache a bundle's TensorRT plan for this GPU (deploy)",
                                  description="Builds from the bundle's model.onnx with one optimisation profile "
                                              "(batch 1 / opt / max) and caches it under the key ONNX sha256, TensorRT "
                                              "version, compute capability, precision, profile; a cached plan whose "
                                              "key matches is kept.")  # fmt: skip
    build_engine.add_argument("bundle", type=Path)
    build_engine.add_argument("--precision", choices=["fp16", "fp32", "int8"], default="fp16", help="default fp16")
    build_engine.add_argument("--max-batch", type=int, default=1024, help="largest batch of the profile (default 1024)")
    build_engine.add_argument("--opt-batch", type=int, help="batch the kernels are tuned for (default min(256, max))")
    build_engine.add_argument("--calibration", type=Path, help="int8: a cutouts store to calibrate on")
    build_engine.add_argument("--force", action="store_true", help="rebuild even if a matching plan is cached")

    quantize = sub.add_parser("quantize", help="write a bundle's INT8 model.int8.onnx for the CPU (deploy)")
    quantize.add_argument("bundle", type=Path)
    quantize.add_argument("--calibration", type=Path, required=True, help="cutouts store to calibrate on")
    quantize.add_argument("--rows", type=int, default=1024, help="calibration rows (default 1024)")
    quantize.add_argument("--check-rows", type=int, default=1024,
                          help="further rows on which int8 is compared with fp32 (default 1024)")

    trust = sub.add_parser("trust", help="give a bundle its ood score and recalibrated errors (needs the training code)",
                           description="Adds the features output (re-exports ONNX, re-quantizes INT8), fits the "
                                       "out-of-distribution score on fresh in-distribution mocks and recalibrates "
                                       "the *_err columns; see training/trust.py.")  # fmt: skip
    trust.add_argument("bundle", type=Path)
    trust.add_argument("--n-fit", type=int, default=8000, help="mocks the mean and covariance are fitted on (default 8000)")
    trust.add_argument("--n-held-out", type=int, default=8000,
                       help="further mocks for the threshold and the error recalibration (default 8000)")
    trust.add_argument("--engine", default="onnxruntime", help="engine the mocks run through (default onnxruntime)")
    trust.add_argument("--transform", choices=["sqrt", "none"],
                       help="feature transform before the Mahalanobis distance (default: the task's, training/trust.py)")
    trust.add_argument("--int8-calibration", type=Path,
                       help="cutouts store to re-quantize an INT8 model on (default: the one the bundle records)")

    sub.add_parser("bundles", help="list the shipped model bundles")

    catalog = sub.add_parser("catalog", add_help=False,
                             help="query a run's outputs: info, cone, xmatch, sql, show (see `catalog --help`)")
    catalog.add_argument("catalog_args", nargs=argparse.REMAINDER)

    demo = sub.add_parser("demo", help="mock a small survey and run every task on it with the shipped bundles")
    demo.add_argument("--output", type=Path, default=Path("survey-infer-demo"))
    demo.add_argument("--n", type=int, default=4000)
    demo.add_argument("--workers", type=int, default=1)
    return parser


def _configure_logging(verbose: bool) -> None:
    level = logging.INFO if verbose else logging.WARNING
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    import distributed  # noqa: F401  (it sets its loggers' levels on import: import first, then quiet them)

    for noisy in ("distributed", "hats_import", "lsdb"):  # their INFO chatter drowns the progress bar
        logging.getLogger(noisy).setLevel(level if verbose else logging.ERROR)


def _task_options(items: list[str]) -> dict[str, str]:
    options = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise RefusedError(f"--task-option {item!r} is not KEY=VALUE (e.g. samples=200)")
        options[key.strip()] = value.strip()
    return options


def cmd_run(args: argparse.Namespace) -> int:
    from survey_infer.cluster import client_for
    from survey_infer.config import RunConfig
    from survey_infer.pipeline import plan_run, run_pipeline

    config = RunConfig(
        task=args.task, input=args.input, output=args.output, bundle=args.bundle, engine=args.engine,
        device=args.device, precision=args.precision, workers=args.workers, threads_per_worker=args.threads_per_worker, in_process=args.in_process,
        engine_threads=args.engine_threads, scheduler=args.scheduler, rows_per_unit=args.rows_per_unit,
        max_in_flight=args.max_in_flight, retries=args.retries, overwrite=args.overwrite,
        build_catalog=not args.no_catalog, progress=not args.no_progress, task_options=_task_options(args.task_option), ood_threshold=args.ood_threshold,
        cluster=args.cluster, jobs=args.jobs, cores=args.cores, memory=args.memory, walltime=args.walltime,
        queue=args.queue, account=args.account, interface=args.interface, worker_wait=args.worker_wait,
    )  # fmt: skip
    if not config.scheduler and not config.batch_cluster:  # the workers run here: an engine that cannot is refused now
        from survey_infer.engines.base import unavailable_reason

        reason = unavailable_reason(config.engine, config.device, config.precision)
        if reason:
            raise RefusedError(f"--engine {config.engine}: {reason}")
    plan = plan_run(config)
    with client_for(config) as client:
        result = run_pipeline(config, client, plan)
    _print_run_summary(result.record, config.output)
    return result.exit_code


def _print_run_summary(record: dict, out_dir: Path) -> None:
    units, rows, timings = record["units"], record["rows"], record["timings"]
    engine = record.get("engine") or {}
    print(f"{record['task']}: {record['status']}  units {units['done']}/{units['total']} done "
          f"({units['skipped']} skipped, {units['failed']} failed)  rows in {rows['in']} out {rows['out']} "
          f"flagged {rows['flagged']}  engine {engine.get('name') if isinstance(engine, dict) else engine}  "
          f"{timings['rows_per_second']:.0f} rows/s")  # fmt: skip
    for failure in record["failures"]:
        print(f"  FAILED unit {failure['unit']} rows {failure['rows']}: {failure['error']}", file=sys.stderr)
    trust = record.get("trust") or {}
    if trust.get("enabled"):
        print(f"  ood: {trust['rows_flagged_ood']} rows above ood_score {trust['threshold']:.4g} "
              f"(quantile {trust['quantile']:g}, from the {trust['source']})")  # fmt: skip
    if record.get("catalog", {}).get("error"):
        print(f"  catalog build failed: {record['catalog']['error']}", file=sys.stderr)
    print(f"  outputs: {out_dir}/parts, {out_dir}/catalog, {out_dir}/run.json")


def cmd_mock(args: argparse.Namespace) -> int:
    from training.mock import write_mock_clusters, write_mock_cutouts

    tick = time.time()
    if args.kind == "ifu":
        from training.mock_ifu import truth_cubes_path, write_mock_ifu

        try:
            store = write_mock_ifu(args.store, args.cubes, size=args.spaxels, seed=args.seed, overwrite=args.overwrite)
        except ValueError as exc:
            raise RefusedError(f"mock ifu: {exc}") from exc
        print(f"wrote {args.cubes} mock cubes of {args.spaxels}x{args.spaxels} spaxels to {store} (truth: "
              f"{truth_cubes_path(store)}, {store}.truth.parquet) in {time.time() - tick:.1f} s")  # fmt: skip
        return 0
    if args.kind == "kinematics":
        from training.mock_kinematics import write_mock_kinematics

        try:
            store = write_mock_kinematics(args.store, args.n, seed=args.seed, grid=args.grid,
                                          position_unit=args.position_unit, overwrite=args.overwrite)  # fmt: skip
        except ValueError as exc:
            raise RefusedError(f"mock kinematics: {exc}") from exc
        print(f"wrote {args.n} mock galaxies to {store} (truth: {store}.truth.parquet) in {time.time() - tick:.1f} s")
        return 0
    if args.kind == "clusters":
        bands = tuple(args.bands.split(",")) if args.bands else None
        rows_per_unit = args.rows_per_unit if args.rows_per_unit != 4096 else 1024
        try:
            store = write_mock_clusters(args.store, args.n, seed=args.seed, bands=bands, rows_per_unit=rows_per_unit,
                                        rows_per_batch=args.rows_per_batch, overwrite=args.overwrite)  # fmt: skip
        except ValueError as exc:
            raise RefusedError(f"mock clusters: {exc}") from exc
        print(f"wrote {args.n} mock clusters to {store} (truth: {store}.truth.parquet) in {time.time() - tick:.1f} s")
        return 0
    store = write_mock_cutouts(args.store, args.n, size=args.size, seed=args.seed, bands=tuple(args.bands or "g"),
                               maps=args.maps, rows_per_unit=args.rows_per_unit, rows_per_batch=args.rows_per_batch,
                               overwrite=args.overwrite)  # fmt: skip
    print(f"wrote {args.n} cutouts to {store} (truth: {store}.truth.parquet) in {time.time() - tick:.1f} s")
    return 0


def cmd_ingest(args: argparse.Namespace) -> int:
    from survey_infer.tiles import ingest_tiles, parse_images_spec

    tick = time.time()
    if args.kind == "ifu":
        from survey_infer.ifu import ingest_ifu

        if len(args.cubes) < 2:
            raise RefusedError("ingest ifu: give one or more FITS cubes, then the store to write")
        *cube_files, store = args.cubes
        summary = ingest_ifu(cube_files, store, photometry=[[p] for p in args.photometry] or None,
                             redshifts=args.redshift or None, spaxels_per_batch=args.spaxels_per_batch,
                             overwrite=args.overwrite)  # fmt: skip
        print(f"wrote {summary['store']} in {time.time() - tick:.1f} s: {len(summary['cubes'])} cube(s)")
        for name, cube in summary["cubes"].items():
            print(f"  {name}: (L, Y, X) = {tuple(cube['shape'])}, {cube['wavelength'][0]:.1f}-{cube['wavelength'][1]:.1f} A, "
                  f"z = {cube['redshift']}; " + "; ".join(summary["notes"][name]))  # fmt: skip
        return 0
    if args.kind == "kinematics":
        from survey_infer.kinematics import ingest_kinematics

        summary = ingest_kinematics(
            args.table, args.output, galaxy_id_col=args.galaxy_id_col, x_col=args.x_col, y_col=args.y_col,
            v_col=args.v_col, v_err_col=args.v_err_col, position_unit=args.position_unit, galaxies_path=args.galaxies,
            ra_col=args.ra_col, dec_col=args.dec_col, distance_col=args.distance_col, r_half_col=args.r_half_col,
            galaxies_per_unit=args.galaxies_per_unit, overwrite=args.overwrite,
        )  # fmt: skip
        print(f"wrote {summary['store']} in {time.time() - tick:.1f} s: {summary['galaxies']} galaxies, "
              f"{summary['stars']} stars (positions in {summary['position_unit']})")  # fmt: skip
        return 0
    summary = ingest_tiles(args.store, [parse_images_spec(spec) for spec in args.images], args.sources,
                           ra_col=args.ra_col, dec_col=args.dec_col, id_col=args.id_col, size_col=args.size_col,
                           size_unit=args.size_unit, keep=tuple(args.keep), reproject=args.reproject,
                           overwrite=args.overwrite)  # fmt: skip
    print(f"wrote {summary['store']} in {time.time() - tick:.1f} s: {len(summary['tiles'])} tiles, bands "
          f"{','.join(summary['bands'])}, {summary['sources']} sources ({summary['off_tile']} on no tile, kept "
          f"and flagged off_tile)")  # fmt: skip
    for tile_id, count in summary["tiles"].items():
        print(f"  {tile_id}: {count} sources")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from deploy.export import export_onnx
    from training.train import train_mass_to_light

    bundle_dir = train_mass_to_light(args.output, n_train=args.n_train, n_val=args.n_val, size=args.size,
                                     epochs=args.epochs, seed=args.seed, name=args.name, version=args.version,
                                     width=args.width, batch_size=args.batch_size, time_budget_s=args.time_budget,
                                     use_meta=not args.images_only, overwrite=args.overwrite)  # fmt: skip
    export_onnx(bundle_dir)
    print(f"wrote bundle {bundle_dir}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from deploy.export import export_onnx

    print(f"wrote {export_onnx(args.bundle, check_store=args.check_store, check_rows=args.check_rows)}")
    return 0


JOB_RESOURCES = ("cores", "memory", "walltime", "queue", "account")


def _run_argv(args: argparse.Namespace) -> list[str]:
    """The `survey-infer run` arguments equivalent to ``args`` (a parsed `submit`), without the job's own."""
    probe = argparse.ArgumentParser(add_help=False)
    _add_run_arguments(probe)
    argv = ["run", args.task, "--input", str(args.input), "--output", str(args.output)]
    for action in probe._actions:
        value = getattr(args, action.dest, None)
        if action.dest in JOB_RESOURCES or value == action.default or value is None:
            continue
        flag = action.option_strings[-1]
        if isinstance(action, argparse._StoreTrueAction):
            argv.append(flag)
        elif isinstance(action, argparse._AppendAction):
            for item in value:
                argv += [flag, str(item)]
        else:
            argv += [flag, str(value)]
    return argv


def cmd_submit(args: argparse.Namespace) -> int:
    from deploy.submit import batch_script, default_system, submit_script
    from survey_infer.config import RunConfig
    from survey_infer.pipeline import plan_run

    if args.cluster not in ("local", "cuda"):
        raise RefusedError(f"submit runs the whole job inside one batch job: --cluster local or cuda, not {args.cluster}")
    for name in ("jobs", "interface", "worker_wait"):
        if getattr(args, name) is not None:
            raise RefusedError(f"--{name.replace('_', '-')} does not apply to submit (one job, its own cluster)")
    # Refuse now, on the login node, what the job would refuse (store, bundle, output, arguments).
    probe = RunConfig(task=args.task, input=args.input, output=args.output, bundle=args.bundle, engine=args.engine,
                      device=args.device, precision=args.precision, workers=args.workers,
                      threads_per_worker=args.threads_per_worker, rows_per_unit=args.rows_per_unit,
                      overwrite=args.overwrite, task_options=_task_options(args.task_option),
                      ood_threshold=args.ood_threshold, cores=args.cores, memory=args.memory, walltime=args.walltime,
                      queue=args.queue, account=args.account, cluster="slurm")  # fmt: skip
    probe.cluster = "local"
    plan_run(probe)
    system = args.system or default_system()
    script_path = args.script or args.output.parent / f"{args.output.name}.job.sh"
    text = batch_script(system, _run_argv(args) + ["--no-progress"], job_name=args.job_name, gpus=args.gpus,
                        log_path=args.output.parent / f"{args.output.name}.job-%j.log" if system == "slurm"
                        else args.output.parent / f"{args.output.name}.job.log",
                        setup=args.setup, **probe.job_resources())  # fmt: skip
    if args.dry_run:
        print(text, end="")
        return 0
    script_path.parent.mkdir(parents=True, exist_ok=True)
    script_path.write_text(text)
    job_id = submit_script(system, script_path)
    print(f"wrote {script_path}; submitted {system} job {job_id}")
    return 0


def cmd_build_engine(args: argparse.Namespace) -> int:
    from deploy.build_engine import build_engine

    result = build_engine(args.bundle, precision=args.precision, max_batch=args.max_batch, opt_batch=args.opt_batch,
                          calibration=args.calibration, force=args.force)  # fmt: skip
    what = f"built in {result.seconds:.1f} s ({result.reason})" if result.built else "cached, key matches"
    print(f"{result.path}: {what}; key {json.dumps(result.key.to_json())}")
    return 0


def cmd_quantize(args: argparse.Namespace) -> int:
    from deploy.quantize import quantize_bundle

    path = quantize_bundle(args.bundle, args.calibration, rows=args.rows, check_rows=args.check_rows)
    check = json.loads((args.bundle / "bundle.json").read_text())["int8"]["vs_fp32_on_held_out_rows"]
    print(f"wrote {path}; int8 vs fp32 on {check['rows']} held-out rows: "
          + ", ".join(f"{k} median |diff| {v['median_abs_diff']:.3g} max {v['max_abs_diff']:.3g}"
                      for k, v in check.items() if k != "rows"))  # fmt: skip
    return 0


def cmd_trust(args: argparse.Namespace) -> int:
    from training.trust import fit_trust

    section = fit_trust(args.bundle, n_fit=args.n_fit, n_held_out=args.n_held_out, engine=args.engine,
                        int8_store=args.int8_calibration, transform=args.transform)  # fmt: skip
    print(f"wrote {args.bundle / section['file']}: ood threshold {section['threshold']:.4g} (quantile "
          f"{section['threshold_quantile']} of {section['mocks']['held_out_rows']} held-out mocks), shrinkage "
          f"{section['shrinkage']:.3g}")  # fmt: skip
    for name, r in section["recalibration"]["outputs"].items():
        print(f"  {name}_err scale {r['previous_scale']:.4g} -> {r['scale']:.4g}: coverage 68% "
              f"{r['coverage_before']['68']:.3f} -> {r['coverage_after']['68']:.3f}, 95% "
              f"{r['coverage_before']['95']:.3f} -> {r['coverage_after']['95']:.3f}")  # fmt: skip
    return 0


def cmd_bundles(args: argparse.Namespace) -> int:
    from survey_infer.bundle import list_shipped_bundles

    bundles = list_shipped_bundles()
    if not bundles:
        print("no bundles ship with this installation")
    for bundle in bundles:
        training = bundle.meta.get("training", {})
        metrics = {k: training[k] for k in ("val_rmse", "val_r2") if k in training}
        print(f"{bundle.id:32s} task={bundle.task:14s} files={','.join(sorted(bundle.meta['files']))} "
              f"{json.dumps(metrics) if metrics else ''}  {bundle.path}")  # fmt: skip
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from survey_infer.demo import run_demo

    return run_demo(args.output, n=args.n, workers=args.workers)


def cmd_catalog(args: argparse.Namespace) -> int:
    from catalogs.cli import main as catalog_main

    return catalog_main(args.catalog_args)


COMMANDS = {"catalog": cmd_catalog, "run": cmd_run, "ingest": cmd_ingest, "mock": cmd_mock, "train": cmd_train, "export": cmd_export, "submit": cmd_submit, "build-engine": cmd_build_engine, "quantize": cmd_quantize, "trust": cmd_trust, "bundles": cmd_bundles,
            "demo": cmd_demo}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["catalog"]:  # its own parser, so that `catalog --help` and its options reach it whole
        return cmd_catalog(argparse.Namespace(catalog_args=argv[1:]))
    args = build_parser().parse_args(argv)
    _configure_logging(args.verbose)
    try:
        return COMMANDS[args.command](args)
    except RefusedError as exc:
        print(f"survey-infer: refused: {exc}", file=sys.stderr)
        return EXIT_REFUSED


if __name__ == "__main__":
    sys.exit(main())
