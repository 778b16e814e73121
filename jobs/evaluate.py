"""Evaluate a model on a labelled set on Ray: evaluation.json, predictions.parquet, report.html.

Locally:          python jobs/evaluate.py --model runs/RUN --data ~/faces/holdout --output evals/holdout
On a cluster:     ray job submit --working-dir . -- python jobs/evaluate.py \
                      --model s3://BUCKET/runs/exp1 --data s3://BUCKET/holdout/ --output s3://BUCKET/evals/holdout --gpu
Flags: python jobs/evaluate.py --help (the same program as `happysad evaluate`).
"""

import sys

from happysad.cli import main

if __name__ == "__main__":
    sys.exit(main(["evaluate", *sys.argv[1:]]))
