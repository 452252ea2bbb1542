"""Read the pipeline's Delta tables from Python: deltalake, Polars and DuckDB.

    python examples/read_lake.py ./lake [--expect-clients N]

Shows the latest features per client (the row with the highest _lsn) and the raw
mirror (change log) of the loan table, the same way with each library, and checks that
the three agree.
"""

import argparse
import sys

import duckdb
import polars as pl
from deltalake import DeltaTable


def latest_with_deltalake(lake: str):
    t = DeltaTable(f"{lake}/features/client_features").to_pyarrow_table()
    df = pl.from_arrow(t)
    return df.sort(["_lsn", "computed_at"]).group_by("client_id").last().filter(~pl.col("_deleted"))


def latest_with_polars(lake: str):
    return (
        pl.scan_delta(f"{lake}/features/client_features")
        .sort(["_lsn", "computed_at"])
        .group_by("client_id")
        .last()
        .filter(~pl.col("_deleted"))
        .collect()
    )


def latest_with_duckdb(lake: str):
    con = duckdb.connect()
    # DuckDB's delta extension is downloaded at run time; reading through the
    # deltalake Arrow dataset works offline and pushes filters down the same way.
    con.register("features", DeltaTable(f"{lake}/features/client_features").to_pyarrow_dataset())
    return con.sql(
        """
        SELECT * EXCLUDE (rn) FROM (
          SELECT *, row_number() OVER (PARTITION BY client_id ORDER BY _lsn DESC, computed_at DESC) AS rn
          FROM features)
        WHERE rn = 1 AND NOT _deleted
        ORDER BY client_id
        """
    ).pl()


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("lake")
    ap.add_argument("--expect-clients", type=int)
    args = ap.parse_args()

    cols = ["client_id", "paid_loans_count", "days_since_last_late_payment", "profit_in_last_90_days_rate"]
    a = latest_with_deltalake(args.lake).select(cols).sort("client_id")
    b = latest_with_polars(args.lake).select(cols).sort("client_id")
    c = latest_with_duckdb(args.lake).select(cols).sort("client_id")
    print("latest features per client (deltalake):")
    print(a.head(5))
    raw = pl.from_arrow(DeltaTable(f"{args.lake}/raw/loan").to_pyarrow_table())
    print("raw mirror of loan (change log):")
    print(raw.group_by("_op").len().sort("_op"))

    failures = []
    if not (a.equals(b) and a.equals(c)):
        failures.append("deltalake, Polars and DuckDB disagree on the latest features")
    if args.expect_clients is not None and a.height != args.expect_clients:
        failures.append(f"expected {args.expect_clients} clients, found {a.height}")
    for f in failures:
        print("FAIL:", f, file=sys.stderr)
    if not failures:
        print(f"examples ok: {a.height} clients, deltalake = Polars = DuckDB")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
