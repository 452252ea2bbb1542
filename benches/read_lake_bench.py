"""Reader-side cost of a table fed by many small commits.

Usage: read_lake_bench.py <delta table dir> [runs]

Copies the table's current rows into a new table written in one commit, then times, for
both, what a reader does: open the table with `deltalake` (log replay / checkpoint) and
answer the latest-value query (each client's row with the highest `_lsn`). Prints one
line per table and their ratio.
"""
import shutil
import statistics
import sys
import tempfile
import time

import duckdb
from deltalake import DeltaTable, write_deltalake

LATEST = """
SELECT count(*) AS clients, sum(paid_loans_count) AS paid FROM (
  SELECT * FROM t QUALIFY row_number() OVER (PARTITION BY client_id ORDER BY _lsn DESC) = 1)
"""


def load_and_query(path):
    started = time.perf_counter()
    dt = DeltaTable(path)
    t = dt.to_pyarrow_table()
    con = duckdb.connect()
    con.register("t", t)
    answer = con.execute(LATEST).fetchone()
    return time.perf_counter() - started, answer, dt


def measure(path, runs):
    times = []
    for _ in range(runs):
        took, answer, dt = load_and_query(path)
        times.append(took)
    return statistics.median(times), min(times), answer, dt


def main():
    path = sys.argv[1]
    runs = int(sys.argv[2]) if len(sys.argv) > 2 else 5
    many, many_min, answer, dt = measure(path, runs)
    files = len(dt.file_uris())
    version = dt.version()
    one_dir = tempfile.mkdtemp(prefix="one_commit_")
    try:
        write_deltalake(one_dir, dt.to_pyarrow_table(), mode="overwrite")
        one, one_min, one_answer, one_dt = measure(one_dir, runs)
        assert one_answer == answer, (one_answer, answer)
        print(
            f"read_after_commits[many]: version={version} files={files} "
            f"load+latest_s median={many:.3f} min={many_min:.3f} answer={answer}"
        )
        print(
            f"read_after_commits[one]: version={one_dt.version()} files={len(one_dt.file_uris())} "
            f"load+latest_s median={one:.3f} min={one_min:.3f}"
        )
        print(f"read_after_commits: ratio many/one = {many / one:.2f} (target <= 1.5)")
    finally:
        shutil.rmtree(one_dir, ignore_errors=True)


if __name__ == "__main__":
    main()
