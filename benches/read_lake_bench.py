"""Reader-side cost of a table fed by many small commits.

Usage: read_lake_bench.py <delta table dir> [runs]

Copies the table's current rows into a new table written in one commit, then times, for
both, what a reader does: open the table with `deltalake` (log replay / checkpoint) and
answer the latest-value query (each client's row with the highest `_lsn`). Prints one
line per table and their ratio.
"""
import os
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
    opened = time.perf_counter() - started
    t = dt.to_pyarrow_table()
    con = duckdb.connect()
    con.register("t", t)
    answer = con.execute(LATEST).fetchone()
    return time.perf_counter() - started, opened, answer, dt


def measure(path, runs):
    times, opens = [], []
    for _ in range(runs):
        took, opened, answer, dt = load_and_query(path)
        times.append(took)
        opens.append(opened)
    return statistics.median(times), min(times), statistics.median(opens), answer, dt


def log_entries(path):
    return len(os.listdir(os.path.join(path, "_delta_log")))


def main():
    path = sys.argv[1]
    runs = int(sys.argv[2]) if len(sys.argv) > 2 else 5
    many, many_min, many_open, answer, dt = measure(path, runs)
    files = len(dt.file_uris())
    version = dt.version()
    entries = log_entries(path)
    scratch = tempfile.mkdtemp(prefix="read_bench_")
    try:
        one_dir = os.path.join(scratch, "one")
        write_deltalake(one_dir, dt.to_pyarrow_table(), mode="overwrite")
        one, one_min, one_open, one_answer, one_dt = measure(one_dir, runs)
        assert one_answer == answer, (one_answer, answer)
        # Where the difference lies: the same table with its log reduced to one checkpoint
        # (no commit files, no tombstones): what is left is the data files.
        bare_dir = os.path.join(scratch, "bare")
        shutil.copytree(path, bare_dir)
        bare_dt = DeltaTable(bare_dir)
        bare_dt.alter.set_table_properties(
            {
                "delta.logRetentionDuration": "interval 0 minutes",
                "delta.deletedFileRetentionDuration": "interval 0 minutes",
            }
        )
        bare_dt = DeltaTable(bare_dir)
        bare_dt.create_checkpoint()
        bare_dt.cleanup_metadata()
        bare, bare_min, bare_open, bare_answer, _ = measure(bare_dir, runs)
        assert bare_answer == answer, (bare_answer, answer)
        print(
            f"read_after_commits[many]: version={version} files={files} log_entries={entries} "
            f"load+latest_s median={many:.3f} min={many_min:.3f} (open {many_open:.3f}) answer={answer}"
        )
        print(
            f"read_after_commits[same data, log cut to one checkpoint]: log_entries={log_entries(bare_dir)} "
            f"load+latest_s median={bare:.3f} min={bare_min:.3f} (open {bare_open:.3f})"
        )
        print(
            f"read_after_commits[one]: version={one_dt.version()} files={len(one_dt.file_uris())} "
            f"load+latest_s median={one:.3f} min={one_min:.3f} (open {one_open:.3f})"
        )
        print(f"read_after_commits: ratio many/one = {many / one:.2f} (target <= 1.5)")
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
