"""`survey-infer catalog ...`: query what a run wrote (info, cone, xmatch, sql, show).

Results go to a file whose format follows ``--format`` (csv, parquet, ecsv, votable) or, for csv/ecsv without
``--output``, to standard output. Exit status 0 on success, 2 when the query is refused (bad arguments, not a
run, unknown column), with the reason on standard error.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import astropy.units as u
from astropy.table import Table

FORMATS = {"csv": "ascii.csv", "ecsv": "ascii.ecsv", "votable": "votable", "parquet": "parquet"}
EXIT_REFUSED = 2


def angle(text: str) -> u.Quantity:
    """'10arcsec', '0.5 deg', '3arcmin' or a bare number of arcsec."""
    try:
        value = u.Quantity(text)
    except (TypeError, ValueError):
        raise argparse.ArgumentTypeError(f"not an angle: {text!r} (e.g. 10arcsec, 0.5deg)") from None
    if value.unit == u.dimensionless_unscaled:
        value = value.value * u.arcsec
    if not value.unit.is_equivalent(u.deg):
        raise argparse.ArgumentTypeError(f"not an angle: {text!r} (e.g. 10arcsec, 0.5deg)")
    return value


def _add_output(parser: argparse.ArgumentParser, default_format: str = "csv") -> None:
    parser.add_argument("--format", choices=sorted(FORMATS), default=default_format)
    parser.add_argument("--output", "-o", type=Path, help="file to write (default: standard output for csv/ecsv)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="survey-infer catalog", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    info = sub.add_parser("info", help="what a run is: task, bundle, engine, rows, columns with units")
    info.add_argument("run", type=Path)

    cone = sub.add_parser("cone", help="rows within a radius of a position")
    cone.add_argument("run", type=Path)
    cone.add_argument("--ra", type=float, required=True, help="degrees")
    cone.add_argument("--dec", type=float, required=True, help="degrees")
    cone.add_argument("--radius", type=angle, required=True, help="e.g. 10arcsec, 2arcmin (a number: arcsec)")
    cone.add_argument("--columns", help="comma-separated columns to keep (ra, dec always kept)")
    cone.add_argument("--where", action="append", default=[], metavar="'COLUMN OP VALUE'",
                      help="filter, e.g. 'ml_g > 2' or 'distance < 0.2 Gpc' (repeatable)")
    _add_output(cone)

    xmatch = sub.add_parser("xmatch", help="cross-match a run with a HATS catalog or a table file")
    xmatch.add_argument("run", type=Path)
    xmatch.add_argument("other", type=Path, help="HATS catalog directory, or FITS/ECSV/VOTable/CSV/Parquet table")
    xmatch.add_argument("out", type=Path, help="output file (format from --format)")
    xmatch.add_argument("--radius", type=angle, default=angle("1arcsec"))
    xmatch.add_argument("--n-neighbors", type=int, default=1, help="matches per row, nearest first (default 1)")
    xmatch.add_argument("--ra-col", default="ra", help="RA column of a table file (degrees)")
    xmatch.add_argument("--dec-col", default="dec", help="Dec column of a table file (degrees)")
    xmatch.add_argument("--format", choices=sorted(FORMATS), default="parquet")

    sql = sub.add_parser("sql", help="DuckDB SQL over the catalog; the table is named 'objects'")
    sql.add_argument("run", type=Path)
    sql.add_argument("query")
    _add_output(sql)

    show = sub.add_parser("show", help="draw an object's maps (or a cube's SFH) to a PNG")
    show.add_argument("run", type=Path)
    show.add_argument("id", help="object_id (maps) or cube id (SFH)")
    show.add_argument("--png", type=Path, required=True)
    return parser


def parse_where(text: str) -> tuple[str, str, object]:
    """'ml_g > 2' -> ('ml_g', '>', 2.0); 'distance < 0.2 Gpc' -> a Quantity; quoted text -> a string."""
    for op in ("<=", ">=", "==", "!=", "<", ">"):
        if op in text:
            column, value = (part.strip() for part in text.split(op, 1))
            break
    else:
        raise ValueError(f"--where {text!r}: expected 'COLUMN OP VALUE' with OP one of <, <=, >, >=, ==, !=")
    if value[:1] in "'\"" and value[-1:] == value[:1]:
        return column, op, value[1:-1]
    try:
        quantity = u.Quantity(value)
    except (TypeError, ValueError):
        raise ValueError(f"--where {text!r}: the value must be a number, a number with a unit or 'quoted text'") from None
    return column, op, quantity.value if quantity.unit == u.dimensionless_unscaled else quantity


def write_table(table: Table, fmt: str, output: Path | None) -> None:
    """Write ``table`` as ``fmt`` to ``output`` (stdout for csv/ecsv when no output is given)."""
    table = Table(table)  # plain Table: units stay as column metadata, which every writer understands
    if output is None:
        if fmt not in ("csv", "ecsv"):
            raise ValueError(f"--format {fmt} needs --output FILE")
        table.write(sys.stdout, format=FORMATS[fmt])
        return
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = output.with_name(output.name + ".tmp")
    table.write(tmp, format=FORMATS[fmt], overwrite=True)
    tmp.replace(output)  # never a half-written result under the final name


def cmd_info(args) -> None:
    from catalogs.run import open_run

    print(json.dumps(open_run(args.run, require_complete=False).info(), indent=2))


def cmd_cone(args) -> None:
    from catalogs.run import open_run

    selection = open_run(args.run).cone(args.ra, args.dec, args.radius)
    for text in args.where:
        selection = selection.where(*parse_where(text))
    if args.columns:
        selection = selection.select([c.strip() for c in args.columns.split(",") if c.strip()])
    write_table(selection.to_astropy(), args.format, args.output)


def cmd_xmatch(args) -> None:
    from catalogs.run import open_run

    matched = open_run(args.run).xmatch(args.other, radius=args.radius, n_neighbors=args.n_neighbors,
                                        ra_column=args.ra_col, dec_column=args.dec_col)  # fmt: skip
    table = matched.to_astropy()
    write_table(table, args.format, args.out)
    print(f"{len(table)} matches within {args.radius} written to {args.out}", file=sys.stderr)


def cmd_sql(args) -> None:
    from catalogs.run import open_run
    from catalogs.selection import to_qtable

    run = open_run(args.run)
    write_table(to_qtable(run.sql(args.query), run.units), args.format, args.output)


def cmd_show(args) -> None:
    from catalogs.plots import draw_maps, draw_sfh
    from catalogs.run import open_run
    from survey_infer import paths

    run = open_run(args.run)
    if args.id.lstrip("-").isdigit() and paths.maps_path(run.path).exists():
        draw_maps(run.maps(int(args.id)), args.png)
    else:
        draw_sfh(run.sfh(args.id), args.png)
    print(f"wrote {args.png}", file=sys.stderr)


COMMANDS = {"info": cmd_info, "cone": cmd_cone, "xmatch": cmd_xmatch, "sql": cmd_sql, "show": cmd_show}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        COMMANDS[args.command](args)
    except (FileNotFoundError, KeyError, ValueError, TypeError) as exc:
        message = exc.args[0] if isinstance(exc, KeyError) and exc.args else exc
        print(f"survey-infer catalog: refused: {message}", file=sys.stderr)
        return EXIT_REFUSED
    return 0
