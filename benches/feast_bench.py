"""Feast's local point-in-time join on the same feature rows, for scale (issue 19).

    python benches/feast_bench.py FEATURE_TABLE SPINE_ROWS [--timeout S]

Needs `pip install feast` (a virtualenv of its own: it pins its own pyarrow/pandas). Exports
the Delta feature table's rows (client_id, _commit_ts as the event timestamp, the seed
features) to Parquet, registers them as a FeatureView over a FileSource in a local Feast repo
(file offline store), and times `get_historical_features(...).to_df()` for SPINE_ROWS random
(client_id, event_timestamp) rows over the table's commit times. Prints one line; a run
longer than --timeout (default 600 s) is reported as such.
"""

import argparse
import datetime
import os
import signal
import sys
import tempfile
import time

import numpy as np
import pandas as pd
from deltalake import DeltaTable

FEATURES = ["paid_loans_count", "days_since_last_late_payment", "profit_in_last_90_days_rate"]


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("table")
    ap.add_argument("spine_rows", type=int)
    ap.add_argument("--timeout", type=int, default=600)
    args = ap.parse_args()

    import feast
    from feast import Entity, FeatureStore, FeatureView, Field, FileSource, RepoConfig
    from feast.types import Float64, Int32, Int64

    rows = DeltaTable(args.table).to_pandas(columns=["client_id", "_commit_ts", *FEATURES])
    rows = rows.rename(columns={"_commit_ts": "event_timestamp"})
    rows["event_timestamp"] = pd.to_datetime(rows["event_timestamp"], utc=True)
    rng = np.random.default_rng(19)
    lo, hi = rows["event_timestamp"].min(), rows["event_timestamp"].max()
    clients = rows["client_id"].unique()
    spine = pd.DataFrame(
        {
            "client_id": rng.choice(clients, args.spine_rows),
            "event_timestamp": lo
            + pd.to_timedelta(rng.uniform(0, (hi - lo).total_seconds(), args.spine_rows), unit="s"),
        }
    )
    with tempfile.TemporaryDirectory() as work:
        path = os.path.join(work, "features.parquet")
        rows.to_parquet(path)
        config = RepoConfig(
            project="bench",
            registry=os.path.join(work, "registry.db"),
            provider="local",
            offline_store={"type": "file"},
            online_store={"type": "sqlite", "path": os.path.join(work, "online.db")},
            entity_key_serialization_version=3,
        )
        store = FeatureStore(config=config)
        client = Entity(name="client", join_keys=["client_id"])
        view = FeatureView(
            name="client_features",
            entities=[client],
            schema=[
                Field(name="paid_loans_count", dtype=Int64),
                Field(name="days_since_last_late_payment", dtype=Int32),
                Field(name="profit_in_last_90_days_rate", dtype=Float64),
            ],
            source=FileSource(path=path, timestamp_field="event_timestamp"),
            ttl=datetime.timedelta(days=3650),
        )
        store.apply([client, view])

        def expired(*_):
            raise TimeoutError

        signal.signal(signal.SIGALRM, expired)
        signal.alarm(args.timeout)
        started = time.monotonic()
        try:
            out = store.get_historical_features(
                entity_df=spine,
                features=[f"client_features:{f}" for f in FEATURES],
            ).to_df()
            took = time.monotonic() - started
            print(
                f"feast_historical_features: feast {feast.__version__}, spine rows {len(out)}, "
                f"feature rows {len(rows)}: wall_s={took:.1f}"
            )
        except TimeoutError:
            print(
                f"feast_historical_features: feast {feast.__version__}, spine rows "
                f"{args.spine_rows}, feature rows {len(rows)}: not done after {args.timeout} s"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
