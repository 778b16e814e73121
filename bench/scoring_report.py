"""What a scoring run's page costs: time at 20,000 rows against the scoring job's wall, and the driver's peak
memory at 1,000,000 rows against 20,000.

    python bench/scoring_report.py [--rows 20000] [--big 1000000] [--job-wall 61] [--photos N] [--job N]

Synthetic outputs: Parquet files of `score`'s schema (10,000 rows a file, as `score`
writes them), paths of a realistic length, scores from two Beta bumps; 300 of the
rows are real faces on disk (synth), given the most confident and the borderline
scores, so every thumbnail on the page is a real read and decode (with --photos N,
the 300 are links to N 12 MP JPEG photos: the costliest thumbnails). 1% of rows are
errors. Each page is built by `happysad report` in a fresh process (one pass,
thumbnails, summary.json and report.html), timed, its peak RSS read from the
kernel (wait4's ru_maxrss); a process that only imports the same modules gives the
baseline. The job's wall is --job-wall seconds (default 61: 20,000 faces at the
327.8 img/s end to end that docs/performance.md measured on 2 cores; the issue's
~80-100 s would give smaller ratios), or measured with --job N: `happysad score` of N synthetic faces with the untrained seed CNN, whose
own page is then rebuilt alone for the ratio.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from happysad import metrics, run_files, synth  # noqa: E402
from happysad.model import CLASSES  # noqa: E402
from happysad.score_output import SCHEMA  # noqa: E402

THRESHOLD = 0.5
REAL = 300  # rows that point at real images: more than the three sheets show (72)
ROWS_PER_FILE = 10_000


def make_output(folder: Path, rows: int, real: list[Path], model_uri: str) -> None:
    """`rows` rows of score's schema in files of ROWS_PER_FILE; the first REAL point at real faces."""
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    real_scores = np.r_[rng.uniform(0.0, 0.002, 100), rng.uniform(0.998, 1.0, 100), THRESHOLD + rng.uniform(-0.002, 0.002, 100)]
    for part, start in enumerate(range(0, rows, ROWS_PER_FILE)):
        n = min(ROWS_PER_FILE, rows - start)
        index = np.arange(start, start + n)
        scores = np.where(rng.random(n) < 0.5, rng.beta(2, 8, n), rng.beta(8, 2, n)).clip(0.01, 0.99)  # away from the real rows
        scores = np.where(np.abs(scores - THRESHOLD) < 0.01, scores + 0.02, scores).astype(np.float32)
        paths = [f"/data/incoming/2026/12/06/camera-{i % 97:04d}/IMG_{i:09d}.jpg" for i in index]
        is_real = index < REAL
        for i in np.flatnonzero(is_real):
            paths[i], scores[i] = str(real[index[i] % len(real)]), real_scores[index[i]]
        error = (rng.random(n) < 0.01) & ~is_real
        table = pa.table(
            {
                "path": paths,
                "score": pa.array(scores, pa.float32(), mask=error),
                "label": pa.array(np.where(scores >= THRESHOLD, "sad", "happy"), pa.string(), mask=error),
                "error": pa.array(np.where(error, "not_an_image", None).tolist(), pa.string()),
                "model": ["0123456789abcdef"] * n,
                "error_detail": pa.array(np.where(error, "DecodeError: not an image", None).tolist(), pa.string()),
            },
            schema=SCHEMA,
        )
        pq.write_table(table, folder / f"part-{part:05d}.parquet")
    record = {"model": "0123456789abcdef", "threshold": THRESHOLD, "model_uri": model_uri}
    (folder / "_scoring.json").write_text(json.dumps(record))


def faces(folder: Path, n: int) -> list[Path]:
    """n distinct real faces on disk."""
    synth.make_data(folder, n, seed=9)
    return sorted(folder.glob("*/*"))


def photos(folder: Path, n: int, links: int) -> list[Path]:
    """`links` distinct paths (symbolic links) to n 12 MP JPEG photos (synth.photo)."""
    import cv2

    folder.mkdir(parents=True)
    for i in range(n):
        ok, jpeg = cv2.imencode(".jpg", synth.photo(seed=i), [cv2.IMWRITE_JPEG_QUALITY, 90])
        (folder / f"photo-{i:03d}.jpg").write_bytes(jpeg.tobytes())
    paths = []
    for i in range(links):
        link = folder / f"link-{i:04d}.jpg"
        link.symlink_to(folder / f"photo-{i % n:03d}.jpg")
        paths.append(link)
    return paths


PEAK = "import re; print('peak', re.search(r'VmHWM:\\s+(\\d+)', open('/proc/self/status').read()).group(1))"


def build_page(output: Path, imports_only: bool = False) -> tuple[float, float]:
    """(seconds, peak RSS in MB) of one `happysad report --scores OUTPUT` in a fresh process (or of a process
    that only imports what it imports: the baseline). The peak is the process's own VmHWM, read by it as it
    ends (wait4's ru_maxrss would carry this bench's own size over the exec)."""
    work = "from happysad import cli, score, score_report" if imports_only else (
        f"from happysad import cli; assert cli.main(['report', '--scores', {str(output)!r}]) == 0"
    )
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", f"{work}\n{PEAK}"], cwd=REPO, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"report failed:\n{done.stdout}{done.stderr}")
    return seconds, int(done.stdout.split("peak ")[-1]) / 1024


def in_process(output: Path) -> tuple[float, float]:
    """(seconds of the whole page as `score` builds it at its end: score_report.write in a process that has
    imported everything, seconds of its streaming pass alone)."""
    from happysad import score_report

    record = json.loads((output / "_scoring.json").read_text())
    start = time.perf_counter()
    score_report.write(str(output), record["model_uri"], record["threshold"], record["model"])
    page = time.perf_counter() - start
    start = time.perf_counter()
    score_report.one_pass(str(output), THRESHOLD, {name: (key, score_report.SHEET_SIZE) for name, key in score_report.SHEETS.items()})
    return page, time.perf_counter() - start


def scoring_job(n: int, root: Path) -> tuple[float, Path]:
    """(wall seconds, output) of `happysad score` on n synthetic faces with the untrained seed CNN (a fresh local Ray)."""
    from happysad.model import build_model

    images = synth.make_data(root / "job-faces", n, seed=5)
    run = root / "job-run"
    run.mkdir()
    build_model().save(run / "model.keras")
    output = root / "job-out"
    env = dict(os.environ, RAY_DATA_DISABLE_PROGRESS_BARS="1")
    env.pop("RAY_ADDRESS", None)
    start = time.perf_counter()
    subprocess.run(
        [sys.executable, "-m", "happysad.cli", "score", "--model", str(run), "--input", str(images), "--output", str(output)],
        cwd=REPO, env=env, check=True, stdout=subprocess.DEVNULL,
    )
    return time.perf_counter() - start, output


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=20_000)
    parser.add_argument("--big", type=int, default=1_000_000)
    parser.add_argument("--job-wall", type=float, default=61.0, help="the scoring job's wall at --rows, seconds (docs/performance.md: 61)")
    parser.add_argument("--photos", type=int, default=0, help="the real rows point at N 12 MP photos instead of faces")
    parser.add_argument("--job", type=int, default=0, help="also score N real faces and compare with that job's measured wall")
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="hs-report-bench-"))
    try:
        real = photos(root / "photos", args.photos, REAL) if args.photos else faces(root / "faces", REAL)
        print(f"real images: {len(set(p.resolve() for p in real))} distinct {'12 MP photos' if args.photos else 'faces (200-800 px)'}")
        model = root / "run"
        model.mkdir()
        reference = metrics.score_histogram(np.random.default_rng(1).beta(2, 2, 4000))
        (model / "model.json").write_bytes(run_files.model_json(THRESHOLD, CLASSES, 256, reference))
        (model / "model.keras").write_bytes(b"")  # named only: the page reads model.json beside it
        outputs = {}
        for rows in (args.rows, args.big):
            start = time.perf_counter()
            outputs[rows] = root / f"out-{rows}"
            make_output(outputs[rows], rows, real, str(model / "model.keras"))
            print(f"made {rows:,} rows in {time.perf_counter() - start:.1f} s", flush=True)
        _, base_rss = build_page(outputs[args.rows], imports_only=True)
        results = {}
        for rows, output in outputs.items():
            runs = [build_page(output) for _ in range(2)]  # the second with a warm page cache: the one reported
            page, one_pass = in_process(output)
            results[rows] = {"seconds": runs[-1][0], "rss": max(r[1] for r in runs), "page": page, "pass": one_pass}
        small, big = results[args.rows], results[args.big]
        print()
        print("| rows | page in the job s | of which the pass s | `happysad report` (fresh process) s | its peak RSS MB | above imports MB |")
        print("| --- | --- | --- | --- | --- | --- |")
        print(f"| imports only | | | | {base_rss:.0f} | 0 |")
        for rows, r in results.items():
            print(f"| {rows:,} | {r['page']:.2f} | {r['pass']:.2f} | {r['seconds']:.2f} | {r['rss']:.0f} | {r['rss'] - base_rss:.0f} |")
        print()
        shown = (outputs[args.rows] / "_report.html").read_text().count("class='thumb'")
        print(f"thumbnails on the page: {shown} (72 expected: every one a real read and decode)")
        for what, seconds in (("in the job", small["page"]), ("as `happysad report`", small["seconds"])):
            print(f"page at {args.rows:,} rows {what}: {seconds:.2f} s = {seconds / args.job_wall:.1%} of a {args.job_wall:.0f} s scoring job (target <= 5 %)")
        grew = big["rss"] - small["rss"]
        print(f"driver peak at {args.big:,} rows vs {args.rows:,}: {big['rss']:.0f} vs {small['rss']:.0f} MB, +{grew:.0f} MB (target <= 100 MB)")
        if args.job:
            wall, job_output = scoring_job(args.job, root)
            page, _ = build_page(job_output)
            print(f"scoring job of {args.job:,} faces: {wall:.1f} s wall (its own page included); the page alone: {page:.2f} s = {page / wall:.1%}")
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
