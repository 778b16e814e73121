"""Peak memory of `happysad score` on one archive of 12 MP JPEGs, at two archive sizes, per format, in one run.

    python bench/archive_memory.py [--small-mb 100] [--large-mb 1000] [--formats tar zip tar.gz]

Each size runs `happysad score` in a fresh process with its own local Ray
cluster. Every 0.2 s the RSS of every process in that tree is read from /proc,
with the Ray task it runs (its process title, e.g. `ray::MapBatches(read_archive)`).
Per process it takes USS (private memory): RSS would also count the pages of
Ray's shared-memory object store that a worker has written blocks into, which
belong to the store, not to the process. Prints, per size: the peak USS of the
process that read the archive, the peak USS of the largest single process, and
the peak PSS of the whole tree (shared memory counted once). Streaming means the peaks follow the
block size, not the archive size. Zips are deflated (level 1) and tar.gz at gzip level 1.
"""

from __future__ import annotations

import argparse
import io
import os
import subprocess
import sys
import tarfile
import tempfile
import time
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from decode_speed import photo  # noqa: E402
from score_memory import children_map  # noqa: E402


def tree_pids(root: int) -> list[int]:
    tree, todo, found = children_map(), [root], []
    while todo:
        pid = todo.pop()
        found.append(pid)
        todo.extend(tree.get(pid, []))
    return found


def sample(pid: int) -> tuple[str, int, int] | None:
    """(process title, USS kB, PSS kB) of one process, or None if it is gone."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            title = f.read().split(b"\0")[0].decode(errors="replace")
        with open(f"/proc/{pid}/smaps_rollup") as f:
            fields = {line.split()[0]: int(line.split()[1]) for line in f if line.split()[0] in ("Pss:", "Private_Clean:", "Private_Dirty:")}
        return title, fields["Private_Clean:"] + fields["Private_Dirty:"], fields["Pss:"]
    except (OSError, KeyError, ValueError):
        return None


def make_archive(path: Path, target_mb: int, photos: list[bytes]) -> int:
    """A tar, tar.gz or zip (by `path`'s suffix) of 12 MP JPEGs of about target_mb; returns the member count."""
    members, size = [], 0
    while size < target_mb << 20:
        members.append((f"photos/{len(members):06d}.jpg", photos[len(members) % len(photos)]))
        size += len(members[-1][1])
    if path.name.endswith(".zip"):
        with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED, compresslevel=1) as archive:
            for name, data in members:
                archive.writestr(name, data)
        return len(members)
    with tarfile.open(path, "w:gz", compresslevel=1) if path.name.endswith(".gz") else tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return len(members)


def score(archive: Path, model: Path, output: Path) -> dict:
    env = dict(os.environ, RAY_DATA_DISABLE_PROGRESS_BARS="1")
    env.pop("RAY_ADDRESS", None)  # a fresh local cluster, measured under the scoring process
    start = time.perf_counter()
    proc = subprocess.Popen(
        [sys.executable, "-m", "happysad.cli", "score", "--model", str(model), "--input", str(archive), "--output", str(output)],
        cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    reader_kb = largest_kb = tree_pss_kb = 0
    while proc.poll() is None:
        samples = [s for s in map(sample, tree_pids(proc.pid)) if s]
        tree_pss_kb = max(tree_pss_kb, sum(pss for _, _, pss in samples))
        largest_kb = max([largest_kb] + [uss for _, uss, _ in samples])
        reader_kb = max([reader_kb] + [uss for title, uss, _ in samples if "read_archive" in title])
        time.sleep(0.2)
    if proc.returncode != 0:
        raise SystemExit(f"scoring {archive} failed with exit code {proc.returncode}")
    import pyarrow.dataset as pads

    rows = pads.dataset(str(output), format="parquet").to_table(columns=["error"])
    return {"seconds": time.perf_counter() - start, "reader": reader_kb / 1024, "largest": largest_kb / 1024,
            "tree": tree_pss_kb / 1024, "scored": rows["error"].null_count}


def reader_mb(result: dict) -> str:
    # A plain tar's reader only walks headers: it may start and end between two samples.
    return f"{result['reader']:.0f}" if result["reader"] else "ended between samples"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small-mb", type=int, default=100)
    parser.add_argument("--large-mb", type=int, default=1000)
    parser.add_argument("--distinct", type=int, default=6, help="distinct photos, repeated to fill the archive")
    parser.add_argument("--formats", nargs="+", default=["tar", "zip", "tar.gz"], choices=["tar", "zip", "tar.gz"])
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(dir=os.environ.get("TMPDIR", "/tmp")) as tmp:
        tmp = Path(tmp)
        from happysad.model import build_model

        build_model().save(tmp / "model.keras")
        photos = [photo(seed) for seed in range(args.distinct)]
        print("| archive | photos | scored | wall s | archive reader peak USS MB | largest process peak USS MB | tree peak PSS MB |")
        print("| --- | --- | --- | --- | --- | --- | --- |")
        verdicts = []
        for kind in args.formats:
            results = []
            for mb in (args.small_mb, args.large_mb):
                archive = tmp / f"photos-{mb}.{kind}"
                members = make_archive(archive, mb, photos)
                r = score(archive, tmp / "model.keras", tmp / f"scores-{mb}-{kind}")
                results.append(r)
                print(f"| {archive.stat().st_size / 2**20:.0f} MB {kind} | {members} | {r['scored']} | {r['seconds']:.0f} | {reader_mb(r)} | {r['largest']:.0f} | {r['tree']:.0f} |", flush=True)
                archive.unlink()
            small, large = results
            bound = 1.25 * small["largest"] + 100
            verdicts.append(
                f"{kind}: largest process, large vs small: {large['largest']:.0f} MB vs bound 1.25 x {small['largest']:.0f} + 100 = {bound:.0f} MB: "
                f"{'within' if large['largest'] <= bound else 'OVER'}; archive reader under 500 MB: {'yes' if large['reader'] < 500 else 'NO'}"
            )
        print("\n".join(verdicts))


if __name__ == "__main__":
    main()
