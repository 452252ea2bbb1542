"""Trains the loan decision model from the lake and exports it as ONNX for the engine.

    python examples/train_model.py [LAKE] [--out models/loan_default.onnx]

One training row per issued loan (status active, paid or overdue) in the lake's raw
mirror: the client's features from features/client_features (its newest row) plus the
loan's amount and duration; the label is whether the loan went `overdue`. A scikit-learn
random forest is exported with skl2onnx (probabilities as a plain tensor, no ZipMap), and
the file carries what the engine needs in its metadata:

    feature_names   the input row's columns, in order (features, application_<column>)
    fill_values     what a NULL input becomes (the same imputation as in training)
    model_name, model_version
    check_inputs, check_scores
                    a few holdout rows and scikit-learn's probability for each: the
                    engine scores them when it loads the model and refuses it unless
                    it gets the same (so training and serving cannot silently differ)

The engine refuses a model whose feature_names are not served features or application
columns of decisions/loan_rules.yaml, naming both.

Caveat: the client features are the newest values, not as of each loan's application, so
they know outcomes a decision could not have known (paid_loans_count counts the loan
itself once paid). Point-in-time training sets are the training-set command's job; this
script shows the loop from lake to served model.
"""

import argparse
import datetime
import hashlib
import json
import sys

import numpy as np
import polars as pl
from deltalake import DeltaTable
from onnx import helper
from skl2onnx import to_onnx
from sklearn.ensemble import RandomForestClassifier
from sklearn.metrics import roc_auc_score
from sklearn.model_selection import train_test_split

FEATURES = ["paid_loans_count", "days_since_last_late_payment", "profit_in_last_90_days_rate"]
APPLICATION = ["amount", "duration"]
# NULL means "never late" for the days feature: far in the past; no issued loans: 0.
FILL = {
    "paid_loans_count": 0.0,
    "days_since_last_late_payment": 3650.0,
    "profit_in_last_90_days_rate": 0.0,
    "application_amount": 0.0,
    "application_duration": 0.0,
}


def latest(lake: str, table: str, key: str, order: list[str]) -> pl.DataFrame:
    """Each key's newest row of a lake table (highest `order`)."""
    df = pl.from_arrow(DeltaTable(f"{lake}/{table}").to_pyarrow_table())
    return df.sort(order, descending=True).unique(subset=[key], keep="first")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("lake", nargs="?", default="./lake")
    ap.add_argument("--out", default="models/loan_default.onnx")
    ap.add_argument("--name", default="loan_default")
    args = ap.parse_args()

    clients = latest(args.lake, "features/client_features", "client_id", ["_lsn", "computed_at"])
    clients = clients.filter(~pl.col("_deleted")).select(["client_id", *FEATURES])
    loans = latest(args.lake, "raw/loan", "id", ["_lsn", "_seq"])
    loans = loans.filter(
        (pl.col("_op") != "delete") & pl.col("status").is_in(["active", "paid", "overdue"])
    )
    rows = loans.join(
        clients, left_on=pl.col("client_id").cast(pl.Int64), right_on="client_id", how="inner"
    ).sort("id")  # the same lake gives the same model
    names = FEATURES + [f"application_{c}" for c in APPLICATION]
    rows = rows.rename({c: f"application_{c}" for c in APPLICATION})
    x = np.column_stack(
        [rows[n].cast(pl.Float64).fill_null(FILL[n]).to_numpy() for n in names]
    ).astype(np.float32)
    y = (rows["status"] == "overdue").to_numpy().astype(np.int64)
    if len(y) < 100 or y.sum() == 0 or y.sum() == len(y):
        print(f"not enough labelled loans to train on ({len(y)} rows, {y.sum()} overdue)")
        return 1

    x_train, x_test, y_train, y_test = train_test_split(
        x, y, test_size=0.2, random_state=0, stratify=y
    )
    model = RandomForestClassifier(
        n_estimators=50, max_depth=6, min_samples_leaf=20, random_state=0, n_jobs=1
    )
    model.fit(x_train, y_train)
    auc = roc_auc_score(y_test, model.predict_proba(x_test)[:, 1])

    onx = to_onnx(
        model,
        x_train[:1],
        options={id(model): {"zipmap": False}},
        target_opset={"": 17, "ai.onnx.ml": 3},
    )
    check = x_test[:8]
    check_scores = model.predict_proba(check)[:, 1]
    digest = hashlib.sha256(x.tobytes() + y.tobytes()).hexdigest()[:8]
    version = f"{datetime.date.today():%Y%m%d}-{digest}"
    helper.set_model_props(
        onx,
        {
            "feature_names": ",".join(names),
            "fill_values": ",".join(str(FILL[n]) for n in names),
            "model_name": args.name,
            "model_version": version,
            "label": "loan status overdue",
            "check_inputs": json.dumps(check.tolist()),
            "check_scores": json.dumps([float(v) for v in check_scores]),
        },
    )
    with open(args.out, "wb") as f:
        f.write(onx.SerializeToString())
    print(
        f"trained {args.name}@{version} on {len(y)} loans ({y.mean():.1%} overdue), "
        f"holdout AUC {auc:.3f}; wrote {args.out}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
