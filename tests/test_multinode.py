"""Two Ray nodes on one machine: training with one worker per node, scoring spread over both, replicas growing onto a new node.

Data, model and outputs live on the S3 server only, so nothing can work by
sharing the driver's local run directory.
"""

import json
import subprocess
import sys

import pytest

from conftest import BUCKET, REPO, joined_node, upload_tree
from happysad import storage, synth


def alive_node_ids() -> set:
    import ray

    return {n["NodeID"] for n in ray.nodes() if n["Alive"]}


def test_replicas_grow_onto_a_node_that_joins_mid_run(ray_session, tmp_path):
    """Started on the head alone, the replica pool grows onto a node that joins while it runs.

    The joining node declares 4 CPUs: Ray Data adds a replica only when the operator's
    share of the cluster's CPUs has a whole CPU to spare beside the running one.
    """
    from happysad.model import build_model

    folder = tmp_path / "images"
    folder.mkdir()
    image = synth.sample(6, 1).data
    for i in range(12000):  # a run long enough for Ray Data's autoscaling coordinator (a 20 s tick) to see the node
        (folder / f"{i:05d}.jpg").write_bytes(image)
    build_model().save(tmp_path / "model.keras")
    before = existing_ids()
    head_only = alive_node_ids()
    assert len(head_only) == 1
    args = ["score", "--model", str(tmp_path / "model.keras"), "--input", str(folder), "--output", str(tmp_path / "scores")]
    proc = subprocess.Popen([sys.executable, "-m", "happysad.cli", *args], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        with joined_node(ray_session, cpus=4):
            output, _ = proc.communicate(timeout=400)
            assert proc.returncode == 0, output[-3000:]
            replicas = nodes_of("actor", "MapWorker(MapBatches(Replica))", before)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert "scored 12000 inputs" in output
    assert head_only < replicas and len(replicas) == 2


@pytest.fixture(scope="module")
def second_node(ray_session):
    with joined_node(ray_session):
        ids = alive_node_ids()
        assert len(ids) == 2
        yield ids


def nodes_of(kind: str, name_part: str, before: set) -> set:
    """Node ids of the actors or tasks created since `before` whose name holds `name_part`."""
    import ray.util.state as state

    if kind == "actor":
        items = state.list_actors(limit=10_000, detail=True, raise_on_missing_output=False)
        return {a.node_id for a in items if name_part in a.class_name and a.actor_id not in before and a.node_id}
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


def test_with_gpus_decode_runs_on_every_node_and_replicas_only_predict(second_node, s3, tmp_path):
    """--gpu, all data on S3: decode tasks on both nodes' CPUs; the replica (on the node that declares
    a GPU) decodes nothing. Nothing can work by sharing the driver's local files."""
    import ray
    import ray.util.state as state

    from happysad.model import build_model
    from happysad.score import ScoreConfig, run

    folder = tmp_path / "images"
    folder.mkdir()
    for i in range(240):
        sample = synth.sample(7, i)
        (folder / f"{i:04d}.{sample.extension}").write_bytes(sample.data)
    (folder / "broken.jpg").write_bytes(b"not an image")
    build_model().save(tmp_path / "model.keras")
    s3.upload_file(str(tmp_path / "model.keras"), BUCKET, "multinode/model.keras")
    images = upload_tree(s3, folder, "multinode/images")
    before = existing_ids()
    summary = run(
        ScoreConfig(inputs=(images,), output=f"s3://{BUCKET}/multinode/scores", model=f"s3://{BUCKET}/multinode/model.keras", gpu=True, batch_size=16)
    )
    assert summary["rows"] == 241 and summary["errors"] == {"not_an_image": 1}
    assert nodes_of("task", "decode_batch", before) == second_node
    replicas = [a for a in state.list_actors(limit=10_000, detail=True, raise_on_missing_output=False)
                if "MapBatches(Replica)" in a.class_name and a.actor_id not in before]
    gpu_node = next(n["NodeID"] for n in ray.nodes() if n["Alive"] and n["Resources"].get("GPU"))
    assert replicas and {a.node_id for a in replicas} == {gpu_node}
    replica_pids = {a.pid for a in replicas}
    decode_pids = {t.worker_pid for t in state.list_tasks(limit=10_000, detail=True, raise_on_missing_output=False)
                   if "decode_batch" in t.name and t.task_id not in before}
    assert decode_pids and not decode_pids & replica_pids
