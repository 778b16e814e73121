"""Resume at scale: what a rerun's driver spends recognising 1,000,000 already-scored paths.

    python bench/resume_scale.py [--rows 1000000]

Writes an output folder of `--rows` synthetic score rows (no images: paths like
`s3://bucket/incoming/2026/11/27/cam-0042/IMG_0001234.jpg`), then, in a fresh
process each, measures wall time and peak RSS of the driver's resume steps:
retiring `read_failed` rows, hashing every done path (`score_output.done_hashes`),
and filtering a listing of the same size against them (`inputs.done_mask`).
For comparison it runs the previous design: a frozenset of every done path.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from happysad.score_output import SCHEMA  # noqa: E402

FILES = 100

MEASURE = {
    "hashes": """
import resource, time
import numpy as np
import pyarrow as pa
from happysad import inputs, score_output
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
start = time.perf_counter()
paths = [f"s3://bucket/incoming/{i % 97:02d}/cam-{i % 1000:04d}/IMG_{i:09d}.jpg" for i in range(ROWS)]
score_output.retire_read_failed(OUT, inputs.Inputs(pa.table({"path": paths}), [], 0))
done = score_output.done_hashes(OUT)
listing = inputs.path_hashes(paths)
todo = int((~inputs.done_mask(done, listing)).sum())
print(time.perf_counter() - start, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - base, todo, done.nbytes)
""",
    "frozenset of paths (before)": """
import resource, sys, time
import pyarrow.dataset as pads
from happysad import inputs
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
start = time.perf_counter()
dataset = pads.dataset(OUT, format="parquet")
done = frozenset(p for b in dataset.to_batches(columns=["path"]) for p in b.column(0).to_pylist())
listing = [f"s3://bucket/incoming/{i % 97:02d}/cam-{i % 1000:04d}/IMG_{i:09d}.jpg" for i in range(ROWS)]
todo = sum(p not in done for p in listing)
print(time.perf_counter() - start, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - base, todo, sys.getsizeof(done) + sum(map(sys.getsizeof, done)))
""",
}


def write_rows(out: Path, rows: int) -> None:
    per_file = rows // FILES
    for f in range(FILES):
        ids = range(f * per_file, (f + 1) * per_file)
        paths = [f"s3://bucket/incoming/{i % 97:02d}/cam-{i % 1000:04d}/IMG_{i:09d}.jpg" for i in ids]
        table = pa.table(
            {
                "path": paths,
                "score": pa.array([0.25] * per_file, pa.float32()),
                "label": ["happy"] * per_file,
                "error": pa.nulls(per_file, pa.string()),
                "model": ["0123456789abcdef"] * per_file,
            },
            schema=SCHEMA,
        )
        pq.write_table(table, out / f"part-{f:04d}.parquet")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        start = time.perf_counter()
        write_rows(out, args.rows)
        print(f"{args.rows:,} done rows in {FILES} Parquet files, written in {time.perf_counter() - start:.1f} s")
        print("| design | wall s | driver peak RSS above imports, MB (listing included) | inputs left to score | done set bytes |")
        print("| --- | --- | --- | --- | --- |")
        for name, code in MEASURE.items():
            code = code.replace("OUT", repr(str(out))).replace("ROWS", str(args.rows))
            result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, check=True)
            seconds, rss, todo, nbytes = result.stdout.split()
            print(f"| {name} | {float(seconds):.1f} | {float(rss):.0f} | {todo} | {int(nbytes):,} |", flush=True)


if __name__ == "__main__":
    main()
