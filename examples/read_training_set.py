"""Read a training set made by `pipeline training-set` with Polars, DuckDB and deltalake.

    python examples/read_training_set.py train.parquet [--expect-rows N]
    python examples/read_training_set.py train_delta/  [--expect-rows N]

A `.parquet` path is a Parquet file, anything else a Delta table. Prints what the set was
built from (the `pipeline.training_set` metadata: mode, feature table and version read,
features that are not point-in-time correct) and checks that the libraries agree.
"""

import argparse
import json
import sys

import duckdb
import polars as pl
import pyarrow.parquet as pq
from deltalake import DeltaTable

KEY = "pipeline.training_set"


def read_parquet(path: str):
    meta = json.loads(pq.read_metadata(path).metadata[KEY.encode()])
    with_polars = pl.read_parquet(path)
    with_duckdb = duckdb.connect().sql(f"SELECT * FROM read_parquet('{path}')").pl()
    with_arrow = pl.from_arrow(pq.read_table(path))
    return meta, [("polars", with_polars), ("duckdb", with_duckdb), ("pyarrow", with_arrow)]


def read_delta(path: str):
    table = DeltaTable(path)
    meta = json.loads(table.history(1)[0][KEY])
    with_deltalake = pl.from_arrow(table.to_pyarrow_table())
    with_polars = pl.read_delta(path)
    con = duckdb.connect()
    # DuckDB's delta extension is downloaded at run time; the Arrow dataset works offline.
    con.register("training_set", table.to_pyarrow_dataset())
    with_duckdb = con.sql("SELECT * FROM training_set").pl()
    return meta, [("deltalake", with_deltalake), ("polars", with_polars), ("duckdb", with_duckdb)]


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("path")
    ap.add_argument("--expect-rows", type=int)
    args = ap.parse_args()

    reader = read_parquet if args.path.endswith(".parquet") else read_delta
    meta, frames = reader(args.path)
    print(f"{args.path}: {meta['mode']} time, {meta['feature_table']}", end="")
    if meta.get("feature_table_version") is not None:
        print(f" at version {meta['feature_table_version']}", end="")
    print(f", spine {meta['spine']}")
    for feature, why in meta["not_point_in_time_correct"].items():
        print(f"  not point-in-time correct: {feature}: {why}")
    name, first = frames[0]
    print(first.head(5))

    failures = []
    # DuckDB names UTC `Etc/UTC`; the instants are the same.
    utc = lambda df: df.with_columns(pl.col(pl.Datetime).dt.convert_time_zone("UTC")).sort(df.columns)
    base = utc(first)
    for other_name, other in frames[1:]:
        if not base.equals(utc(other)):
            failures.append(f"{name} and {other_name} disagree")
    if args.expect_rows is not None and first.height != args.expect_rows:
        failures.append(f"expected {args.expect_rows} rows, found {first.height}")
    if meta["rows"] != first.height:
        failures.append(f"metadata says {meta['rows']} rows, the table has {first.height}")
    for f in failures:
        print("FAIL:", f, file=sys.stderr)
    if not failures:
        libs = " = ".join(n for n, _ in frames)
        print(f"training set ok: {first.height} rows, {libs}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
