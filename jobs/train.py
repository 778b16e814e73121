"""Train the happy/sad CNN on Ray. With no flags: the demo set, one local worker.

Locally:          python jobs/train.py [--workers 2] [--epochs 10] [--data DIR_OR_S3]
On a cluster:     ray job submit --working-dir . -- python jobs/train.py \
                      --data s3://BUCKET/faces --output s3://BUCKET/runs/exp1 --workers 4 --gpu
Flags: python jobs/train.py --help (the same program as `happysad train`).
"""

import sys

from happysad.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
