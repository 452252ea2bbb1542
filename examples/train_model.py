"""Trains the loan decision model on point-in-time features and exports it as ONNX.

    python examples/train_model.py PIPELINE.yaml [--lake LAKE] [--bin pipeline]
                                   [--out models/loan_default.onnx]

The spine is every issued loan application in the source database (status active, paid
or overdue), at its `created_on`, labelled with whether the loan went `overdue`. Its
features come from `pipeline training-set --mode event`: recomputed through the same
feature files the decision service is served from, as of each application's date. The
split is by time: the latest 20% of application dates are the test set.

Three models are trained with the same settings and their test AUCs printed side by side:

    current      each client's newest row of features/client_features joined to every
                 loan, what a naive join gives: the features know the loans' outcomes
                 (paid_loans_count counts the loan itself once paid)
    event, leaky the event-time set with the two seed features that read a loan's current
                 status (marked leaks_in_event_time in their feature file)
    event, pit   the event-time set with their point-in-time-safe variants: only what was
                 known on the application date

The gap between the first and the last is the future information the naive join leaks;
the last is what a decision made on the application date can reproduce, so it is the one
exported. A scikit-learn random forest is exported with skl2onnx (probabilities as a
plain tensor, no ZipMap), the file carrying what the engine needs in its metadata:

    feature_names   the input row's columns, in order (features, application_<column>)
    fill_values     what a NULL input becomes (the same imputation as in training)
    model_name, model_version
    check_inputs, check_scores
                    a few test rows and scikit-learn's probability for each: the engine
                    scores them when it loads the model and refuses it unless it gets the
                    same (so training and serving cannot silently differ)
"""

import argparse
import datetime
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np
import polars as pl
from deltalake import DeltaTable
from onnx import helper
from skl2onnx import to_onnx
from sklearn.ensemble import RandomForestClassifier
from sklearn.metrics import roc_auc_score

SEED = ["paid_loans_count", "days_since_last_late_payment", "profit_in_last_90_days_rate"]
PIT = ["paid_loans_count_pit", "days_since_last_late_payment", "profit_in_last_90_days_rate_pit"]
APPLICATION = ["amount", "duration"]
# NULL means "never late" for the days feature: far in the past; no issued loans: 0.
FILL = {
    "paid_loans_count": 0.0,
    "paid_loans_count_pit": 0.0,
    "days_since_last_late_payment": 3650.0,
    "profit_in_last_90_days_rate": 0.0,
    "profit_in_last_90_days_rate_pit": 0.0,
    "application_amount": 0.0,
    "application_duration": 0.0,
}
SPINE = (
    "SELECT id AS loan_id, client_id, created_on, amount AS application_amount, "
    "duration AS application_duration, status = 'overdue' AS label "
    "FROM loan WHERE status IN ('active', 'paid', 'overdue')"
)


def event_time_set(args, work: str) -> pl.DataFrame:
    out = os.path.join(work, "event.parquet")
    cmd = [
        args.bin, "training-set", args.pipeline, "--mode", "event", "--spine", SPINE,
        "--key", "client_id", "--time", "created_on", "--out", out,
    ]
    started = time.monotonic()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    print(f"event-time training set: {time.monotonic() - started:.1f} s")
    return pl.read_parquet(out)


def current_features(lake: str, spine: pl.DataFrame) -> pl.DataFrame:
    """The naive join: every loan gets its client's newest feature row."""
    df = pl.from_arrow(DeltaTable(f"{lake}/features/client_features").to_pyarrow_table())
    latest = (
        df.sort(["_lsn", "computed_at"], descending=True)
        .unique(subset=["client_id"], keep="first")
        .filter(~pl.col("_deleted"))
        .select(["client_id", *SEED])
    )
    return spine.select(
        ["loan_id", "client_id", "created_on", "application_amount", "application_duration", "label"]
    ).join(latest, on="client_id", how="left")


def matrix(rows: pl.DataFrame, names: list[str]) -> np.ndarray:
    return np.column_stack(
        [rows[n].cast(pl.Float64).fill_null(FILL[n]).to_numpy() for n in names]
    ).astype(np.float32)


def train(rows: pl.DataFrame, names: list[str], cutoff):
    rows = rows.filter(pl.col("label").is_not_null()).sort("loan_id")
    train_rows = rows.filter(pl.col("created_on") < cutoff)
    test_rows = rows.filter(pl.col("created_on") >= cutoff)
    x_train, x_test = matrix(train_rows, names), matrix(test_rows, names)
    y_train = train_rows["label"].cast(pl.Int64).to_numpy()
    y_test = test_rows["label"].cast(pl.Int64).to_numpy()
    model = RandomForestClassifier(
        n_estimators=50, max_depth=6, min_samples_leaf=20, random_state=0, n_jobs=1
    )
    model.fit(x_train, y_train)
    auc = roc_auc_score(y_test, model.predict_proba(x_test)[:, 1])
    return model, auc, (x_train, x_test, y_train, y_test)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("pipeline")
    ap.add_argument("--lake", default=os.environ.get("LAKE_URL", "./lake"))
    ap.add_argument("--bin", default=os.environ.get("PIPELINE_BIN", "pipeline"))
    ap.add_argument("--out", default="models/loan_default.onnx")
    ap.add_argument("--name", default="loan_default")
    args = ap.parse_args()
    started = time.monotonic()

    with tempfile.TemporaryDirectory() as work:
        event = event_time_set(args, work)
    labelled = event.filter(pl.col("label").is_not_null())
    y_all = labelled["label"].cast(pl.Int64).to_numpy()
    if len(y_all) < 100 or y_all.sum() == 0 or y_all.sum() == len(y_all):
        print(f"not enough labelled loans to train on ({len(y_all)} rows, {y_all.sum()} overdue)")
        return 1
    dates = labelled["created_on"].sort()
    cutoff = dates[int(len(dates) * 0.8)]
    current = current_features(args.lake, event)

    app = [f"application_{c}" for c in APPLICATION]
    results = {}
    for label, rows, names in [
        ("current features (naive join)", current, SEED + app),
        ("event time, leaky features", event, SEED + app),
        ("event time, point-in-time safe", event, PIT + app),
    ]:
        results[label] = (train(rows, names, cutoff), names)
    n_train = labelled.filter(pl.col("created_on") < cutoff).height
    print(
        f"{len(y_all)} issued loans ({y_all.mean():.1%} overdue); train before {cutoff} "
        f"({n_train}), test from it ({len(y_all) - n_train})"
    )
    print(f"{'features':34} test AUC")
    for label, ((_, auc, _), _) in results.items():
        print(f"{label:34} {auc:.3f}")

    (model, auc, (x_train, x_test, _, _)), names = results["event time, point-in-time safe"]
    onx = to_onnx(
        model,
        x_train[:1],
        options={id(model): {"zipmap": False}},
        target_opset={"": 17, "ai.onnx.ml": 3},
    )
    check = x_test[:8]
    check_scores = model.predict_proba(check)[:, 1]
    digest = hashlib.sha256(x_train.tobytes()).hexdigest()[:8]
    version = f"{datetime.date.today():%Y%m%d}-{digest}"
    helper.set_model_props(
        onx,
        {
            "feature_names": ",".join(names),
            "fill_values": ",".join(str(FILL[n]) for n in names),
            "model_name": args.name,
            "model_version": version,
            "label": "loan status overdue",
            "training_set": "pipeline training-set --mode event (point-in-time safe features)",
            "check_inputs": json.dumps(check.tolist()),
            "check_scores": json.dumps([float(v) for v in check_scores]),
        },
    )
    with open(args.out, "wb") as f:
        f.write(onx.SerializeToString())
    print(
        f"exported {args.name}@{version} (test AUC {auc:.3f}) to {args.out}; "
        f"{time.monotonic() - started:.1f} s end to end"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
