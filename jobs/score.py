"""Score images to Parquet on Ray: one row per input (path, score, label, error, model).

Locally:          python jobs/score.py --model runs/RUN --input ~/photos --input faces.zip --output scores/
On a cluster:     ray job submit --working-dir . -- python jobs/score.py \
                      --model s3://BUCKET/runs/exp1 --input s3://BUCKET/incoming/ --output s3://BUCKET/scores/ --gpu
Rerun the same command after an interruption: it scores only what is missing.
Flags: python jobs/score.py --help (the same program as `happysad score`).
"""

import sys

from happysad.cli import main

if __name__ == "__main__":
    sys.exit(main(["score", *sys.argv[1:]]))
