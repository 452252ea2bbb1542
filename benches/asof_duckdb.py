"""The single-machine baseline for a known-time training set: DuckDB's ASOF JOIN.

    python benches/asof_duckdb.py FEATURE_TABLE SPINE.parquet [RUNS]

Exports the Delta feature table's rows (key, _commit_ts, _lsn, features) to Parquet once,
then times, RUNS times, an ASOF LEFT JOIN of the spine (client_id, at) on it: per spine
row the feature row with the latest _commit_ts <= at (ties on _commit_ts cannot happen
between two rows of one key here: each batch's rows carry its own commit time), written to
Parquet, as `pipeline training-set --mode known` does. Prints one line like the Rust bench.
"""

import os
import statistics
import sys
import tempfile
import time

import duckdb
import pyarrow.parquet as pq
from deltalake import DeltaTable


def main() -> int:
    table, spine = sys.argv[1], sys.argv[2]
    runs = int(sys.argv[3]) if len(sys.argv) > 3 else 3
    with tempfile.TemporaryDirectory() as work:
        features = os.path.join(work, "features.parquet")
        t = time.monotonic()
        rows = DeltaTable(table).to_pyarrow_table()
        pq.write_table(rows, features)
        exported = time.monotonic() - t
        out = os.path.join(work, "out.parquet")
        walls = []
        for _ in range(runs):
            con = duckdb.connect()
            t = time.monotonic()
            con.execute(
                f"""COPY (
                      SELECT s.*, f.* EXCLUDE (client_id)
                      FROM read_parquet('{spine}') s
                      ASOF LEFT JOIN read_parquet('{features}') f
                        ON s.client_id = f.client_id AND s.at >= f._commit_ts
                    ) TO '{out}' (FORMAT parquet)"""
            )
            walls.append(time.monotonic() - t)
            con.close()
        n = pq.read_metadata(out).num_rows
    print(
        f"duckdb_asof_join: runs={runs} wall_s median={statistics.median(walls):.2f} "
        f"min={min(walls):.2f} max={max(walls):.2f} (spine rows {n}, feature rows "
        f"{rows.num_rows}, export to Parquet {exported:.1f} s not counted)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
