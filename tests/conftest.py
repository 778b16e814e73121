"""Session fixtures: one S3-protocol server (moto) and one Ray head on 127.0.0.1 per test run.

Both are started by this process and stopped by it, even when tests fail.
The S3 variables are in the environment before the Ray head starts, so every
Ray worker reaches the same server with the same (fake) credentials.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import boto3
import pytest

from happysad import synth

REPO = Path(__file__).resolve().parents[1]
BUCKET = "happysad-test"


def free_port() -> int:
    return free_ports(1)[0]


def free_ports(count: int) -> list[int]:
    """`count` distinct free ports (bound together while chosen, so none is handed out twice)."""
    with contextlib.ExitStack() as stack:
        sockets = [stack.enter_context(socket.socket()) for _ in range(count)]
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]


AGENT_PORTS = ("dashboard-agent-listen", "dashboard-agent-grpc", "runtime-env-agent", "metrics-export")
HEAD_PORTS = (*AGENT_PORTS, "ray-client-server")  # a head's client server takes 10001 by default


def own_ports(names: tuple[str, ...] = AGENT_PORTS, ports: list[int] | None = None) -> list[str]:
    """Flags giving each port a Ray node would otherwise take by default (its job agent's 52365...) one of `ports`
    (free ones if not given): another node or head on this machine then cannot collide with it."""
    return [f"--{name}-port={port}" for name, port in zip(names, ports or free_ports(len(names)), strict=True)]


def start_head(flags: list[str], env: dict, temp_dir: Path, dashboard: bool = True) -> tuple[subprocess.Popen, int, int]:
    """`ray start --head --block FLAGS` on fresh ports (the client server's 10001 included); returns the process,
    its GCS port and its dashboard port once it answers. A port taken by another process between choosing and
    binding kills one of the head's processes, and `ray start --block` exits 1 with it: then it is tried again,
    twice at most, on other ports. Its output goes to temp_dir/head.log, quoted when it cannot start; temp_dir
    is removed then."""
    log = temp_dir / "head.log"
    for attempt in range(3):
        port, dashboard_port, *others = free_ports(2 + len(HEAD_PORTS))
        with log.open("w") as out:  # a file, not a pipe: the head's children inherit it, a full pipe would stall them
            head = subprocess.Popen(
                [str(Path(sys.executable).parent / "ray"), "start", "--head", "--block", f"--port={port}",
                 f"--dashboard-port={dashboard_port}", *own_ports(HEAD_PORTS, others), *flags],
                env=env, start_new_session=True, stdout=out, stderr=subprocess.STDOUT,
            )
        try:
            _wait_for_port(dashboard_port if dashboard else port, head)
            return head, port, dashboard_port
        except BaseException as failure:  # `ray start` exited (RuntimeError), not up in time, or interrupted
            kill_group(head)
            exited = isinstance(failure, RuntimeError)
            if exited and attempt < 2:
                continue
            tail = log.read_text()[-3000:]
            shutil.rmtree(temp_dir, ignore_errors=True)  # the caller's try/finally has not begun
            if exited:
                raise RuntimeError(f"ray start exited with {head.returncode}:\n{tail}") from None
            raise
    raise AssertionError("unreachable")


def kill_group(process: subprocess.Popen) -> None:
    """SIGKILL `process` and everything it started (its own session), and reap it."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)
    process.wait()


@pytest.fixture(scope="session")
def s3_server():
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    env = {
        "AWS_ENDPOINT_URL": endpoint,
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_REGION": "us-east-1",
        "AWS_EC2_METADATA_DISABLED": "true",
    }
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket=BUCKET)
    try:
        yield endpoint
    finally:
        server.stop()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.fixture(scope="session")
def fault_proxy(s3_server):
    """A fault-injecting HTTP proxy in front of the S3 server (tests/faultproxy.py); no faults until asked."""
    from faultproxy import FaultProxy

    proxy = FaultProxy(s3_server).start()
    try:
        yield proxy
    finally:
        proxy.stop()


@pytest.fixture(scope="session")
def s3(s3_server):
    return boto3.client("s3", endpoint_url=s3_server)


def upload_tree(s3, local: Path, prefix: str) -> str:
    for path in sorted(local.rglob("*")):
        if path.is_file():
            s3.upload_file(str(path), BUCKET, f"{prefix}/{path.relative_to(local).as_posix()}")
    return f"s3://{BUCKET}/{prefix}"


@pytest.fixture(scope="session")
def ray_head(s3_server):
    """A real Ray head (`ray start --head --block`), with a dashboard for `ray job submit`.

    Auth is disabled for this loopback-only head (Ray 2.60 enables token auth by default).
    The venv's bin comes first on PATH so submitted jobs run the same `python`.
    """
    temp_dir = Path(tempfile.mkdtemp(prefix="hsray-", dir="/tmp"))
    env = dict(os.environ, RAY_AUTH_MODE="disabled", PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}")
    env["RAY_DATA_DISABLE_PROGRESS_BARS"] = "1"
    # A node is declared dead after 3 failed health checks 1 s apart (Ray's default: 5, 3 s apart): the tests
    # that kill a raylet wait for that twice (the job's recovery, and the node's stop).
    env.update(RAY_health_check_period_ms="1000", RAY_health_check_failure_threshold="3")
    # A node told to stop (SIGTERM to `ray start --block`) stops at once: by default it first drains for up to
    # 30 s, waiting for Serve-style traffic to end, and the session's own idle workers keep it from being idle.
    env["RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S"] = "0"
    head, port, dashboard_port = start_head(
        ["--node-ip-address=127.0.0.1", "--dashboard-host=127.0.0.1", "--num-cpus=2", f"--temp-dir={temp_dir}",
         "--object-store-memory=1500000000", "--disable-usage-stats"],
        env, temp_dir,
    )
    address = f"127.0.0.1:{port}"
    saved = {k: os.environ.get(k) for k in ("RAY_ADDRESS", "RAY_AUTH_MODE")}
    os.environ.update(RAY_ADDRESS=address, RAY_AUTH_MODE="disabled")
    try:
        yield {"address": address, "dashboard": f"http://127.0.0.1:{dashboard_port}", "env": env, "pid": head.pid}
    finally:
        import ray

        if ray.is_initialized():
            release_detached_actors()
        ray.shutdown()
        head.send_signal(signal.SIGTERM)  # --block: the head stops every process it started
        try:
            head.wait(timeout=60)
        except subprocess.TimeoutExpired:
            kill_group(head)
        shutil.rmtree(temp_dir, ignore_errors=True)
        for k, v in saved.items():
            os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)


def release_detached_actors() -> None:
    """Kill the detached actors Ray Data leaves behind (its stats, usage and autoscaling coordinators; it
    makes them again when next needed). A node that hosts one takes 30 s longer to stop."""
    import ray

    for named in ray.util.list_named_actors(all_namespaces=True):
        with contextlib.suppress(ValueError):  # gone meanwhile
            ray.kill(ray.get_actor(named["name"], namespace=named["namespace"]))


def _wait_for_port(port: int, process: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"ray start exited with {process.returncode}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.5)
    raise TimeoutError("Ray head did not open its dashboard port")


@pytest.fixture(scope="session")
def ray_session(ray_head):
    """The test process connected to the shared head as a Ray driver."""
    import ray

    ray.init(address=ray_head["address"], log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    yield ray_head


@pytest.fixture(scope="session")
def tiny_folders(tmp_path_factory) -> Path:
    """24 synthetic faces as class folders."""
    return synth.make_data(tmp_path_factory.mktemp("folders"), n=24, seed=3)


@pytest.fixture(scope="session")
def tiny_shards(tmp_path_factory) -> Path:
    """The same 24 faces as 3 WebDataset shards."""
    return synth.make_data(tmp_path_factory.mktemp("shards"), n=24, seed=3, shards=3)


@contextlib.contextmanager
def joined_node(ray_session, cpus: int = 1, name: str = "second_node"):
    """Another raylet joined to the session head: `cpus` CPUs, a declared GPU (TensorFlow still runs on
    the CPU: only Ray's placement is under test), a resource `name` and its own temp dir; stopped after,
    with every process it started (it may have been killed on purpose)."""
    import ray

    temp_dir = tempfile.mkdtemp(prefix="hsray2-", dir="/tmp")
    log = Path(temp_dir) / "node.log"
    with log.open("w") as out:
        node = subprocess.Popen(
            [
                str(Path(sys.executable).parent / "ray"), "start", "--block", f"--address={ray_session['address']}",
                "--node-ip-address=127.0.0.1", f"--num-cpus={cpus}", "--num-gpus=1", f'--resources={{"{name}": 1}}',
                *own_ports(), f"--temp-dir={temp_dir}", "--disable-usage-stats",
            ],
            env=ray_session["env"], start_new_session=True, stdout=out, stderr=subprocess.STDOUT,
        )
    try:
        deadline = time.monotonic() + 120
        while ray.cluster_resources().get(name) != 1:
            joining = node.poll() is None and time.monotonic() < deadline
            assert joining, f"the node {name} did not join:\n{log.read_text()[-3000:]}"
            time.sleep(1)
        yield node
    finally:
        release_detached_actors()
        node.send_signal(signal.SIGTERM)
        try:
            node.wait(timeout=60)
        except subprocess.TimeoutExpired:
            pass
        kill_group(node)  # what is left of its session: workers of a killed raylet
        deadline = time.monotonic() + 60
        while ray.cluster_resources().get(name) and time.monotonic() < deadline:
            time.sleep(1)
        shutil.rmtree(temp_dir, ignore_errors=True)


@pytest.fixture(scope="session")
def model_file(tmp_path_factory) -> Path:
    """The seed CNN, untrained (seed 0), as a .keras file: what scoring tests score with."""
    import keras

    from happysad.model import build_model

    keras.utils.set_random_seed(0)
    path = tmp_path_factory.mktemp("model") / "model.keras"
    build_model().save(path)
    return path


@pytest.fixture(scope="module")
def lambda_model(tmp_path_factory) -> tuple[Path, Path]:
    """A .keras file with a Lambda layer that would create a marker file if its code ever ran."""
    import keras

    root = tmp_path_factory.mktemp("lambda")
    marker = root / "lambda-ran"
    touch = eval(f"lambda x: (open({str(marker)!r}, 'w').close(), x)[1]")  # no closure: Keras saves the bytecode
    keras.Sequential([keras.Input((256, 256, 3)), keras.layers.Lambda(touch)]).save(root / "model.keras")
    marker.unlink(missing_ok=True)  # building the model ran it once, here
    return root / "model.keras", marker


def run_cli(*args: str, env: dict | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
    """Run `python -m happysad.cli ARGS` as a user would, in its own process."""
    return subprocess.run(
        [sys.executable, "-m", "happysad.cli", *args],
        capture_output=True, text=True, timeout=timeout, cwd=REPO, env=env or os.environ.copy(),
    )


def wait_for_registered_checkpoint(output: Path, job: subprocess.Popen, log_path: Path, timeout: float = 300) -> None:
    """Wait until Ray Train has registered a checkpoint of the run at `output`. A checkpoint_* folder appears
    as soon as its upload starts; a group restarted before the controller registers it starts from scratch."""
    import json

    snapshot = output / "checkpoint_manager_snapshot.json"
    deadline = time.monotonic() + timeout
    while job.poll() is None and time.monotonic() < deadline:
        try:
            if json.loads(snapshot.read_text()).get("latest_checkpoint_result"):
                return
        except (OSError, ValueError):  # not written yet, or caught mid-write
            pass
        time.sleep(0.5)
    raise AssertionError(f"no checkpoint registered (exit {job.poll()}):\n{log_path.read_text()[-3000:]}")
