#!/usr/bin/env bash
# GPU smoke run: train 2 epochs with --gpu and score 2,000 images with --gpu,
# printing the GPU name and images/s of both. Needs the [gpu] extra installed
# (pip install -e '.[gpu]') and one visible NVIDIA GPU.
#
#   bash bench/gpu_smoke.sh [WORKDIR]
set -euo pipefail
cd "$(dirname "$0")/.."
work=${1:-$(mktemp -d)}
python=${PYTHON:-python}

nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | sed 's/^/gpu: /'
"$python" -c "import tensorflow as tf; print('tensorflow sees', tf.config.list_physical_devices('GPU'))"

"$python" -m happysad.cli make-data --out "$work/faces" --n 2000 --seed 1
"$python" jobs/train.py --data "$work/faces" --output "$work/run" --epochs 2 --gpu 2>&1 | grep -E "^epoch|epoch [0-9]+/|^done"
"$python" -c "import json; m = json.load(open('$work/run/metrics.json')); print(f\"train: {m['images_per_second']:.1f} img/s (mean over epochs), test accuracy {m['test']['accuracy']:.3f}\")"

"$python" jobs/score.py --model "$work/run" --input "$work/faces" --output "$work/scores" --gpu 2>&1 | grep -E "^scored" | sed 's/^/score: /'
