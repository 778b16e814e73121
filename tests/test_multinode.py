"""Two Ray nodes on one machine: training with one worker per node and scoring spread over both.

Data, model and outputs live on the S3 server only, so nothing can work by
sharing the driver's local run directory.
"""

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from conftest import BUCKET, upload_tree
from happysad import storage, synth


@pytest.fixture(scope="module")
def second_node(ray_session):
    """A second raylet joined to the session head, with its own CPU, resources and temp dir; stopped after."""
    import ray

    temp_dir = tempfile.mkdtemp(prefix="hsray2-", dir="/tmp")
    node = subprocess.Popen(
        [
            str(Path(sys.executable).parent / "ray"), "start", "--block", f"--address={ray_session['address']}",
            "--node-ip-address=127.0.0.1", "--num-cpus=1", '--resources={"second_node": 1}',
            f"--temp-dir={temp_dir}", "--disable-usage-stats",
        ],
        env=ray_session["env"], start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 120
        while ray.cluster_resources().get("second_node") != 1:
            assert node.poll() is None and time.monotonic() < deadline, "the second node did not join"
            time.sleep(1)
        ids = {n["NodeID"] for n in ray.nodes() if n["Alive"]}
        assert len(ids) == 2
        yield ids
    finally:
        node.send_signal(signal.SIGTERM)
        try:
            node.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(node.pid, signal.SIGKILL)
        deadline = time.monotonic() + 60
        while ray.cluster_resources().get("second_node") and time.monotonic() < deadline:
            time.sleep(1)


def nodes_of(kind: str, name_part: str, before: set) -> set:
    """Node ids of the actors or tasks created since `before` whose name holds `name_part`."""
    import ray.util.state as state

    if kind == "actor":
        items = state.list_actors(limit=10_000, detail=True, raise_on_missing_output=False)
        return {a.node_id for a in items if name_part in a.class_name and a.actor_id not in before}
    items = state.list_tasks(limit=10_000, detail=True, raise_on_missing_output=False)
    return {t.node_id for t in items if name_part in t.name and t.task_id not in before and t.node_id}


def existing_ids() -> set:
    import ray.util.state as state

    actors = {a.actor_id for a in state.list_actors(limit=10_000, raise_on_missing_output=False)}
    return actors | {t.task_id for t in state.list_tasks(limit=10_000, raise_on_missing_output=False)}


def test_training_places_one_worker_per_node(second_node, s3, tmp_path):
    from happysad.train import TrainConfig, run

    data = upload_tree(s3, synth.make_data(tmp_path / "faces", n=24, seed=4), "multinode/faces")
    output = f"s3://{BUCKET}/multinode/run"
    before = existing_ids()
    metrics = run(TrainConfig(data=(data,), output=output, workers=2, one_per_node=True, epochs=1, batch_size=8))
    assert nodes_of("actor", "RayTrainWorker", before) == second_node
    hashes = metrics["replica_weight_hashes"]
    assert len(hashes) == 2 and hashes[0] == hashes[1]
    assert json.loads(storage.read_bytes(f"{output}/metrics.json"))["epochs"] == 1


def test_scoring_runs_on_both_nodes(second_node, s3, tmp_path):
    from happysad.model import build_model
    from happysad.score import ScoreConfig, run

    folder = tmp_path / "images"
    folder.mkdir()
    for i in range(120):
        sample = synth.sample(6, i)
        (folder / f"{i:04d}.{sample.extension}").write_bytes(sample.data)
    build_model().save(tmp_path / "model.keras")
    s3.upload_file(str(tmp_path / "model.keras"), BUCKET, "multinode/model.keras")
    images = upload_tree(s3, folder, "multinode/images")
    output = f"s3://{BUCKET}/multinode/scores"
    before = existing_ids()
    summary = run(
        ScoreConfig(inputs=(images,), output=output, model=f"s3://{BUCKET}/multinode/model.keras", concurrency=2, rows_per_file=16)
    )
    assert summary["rows"] == 120 and summary["errors"] == {}
    used = nodes_of("actor", "MapWorker", before) | nodes_of("task", "read_files", before)
    assert used == second_node
