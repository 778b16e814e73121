"""Whether a GPU can ever come to the Ray cluster this driver is connected to.

A task that asks for a GPU on a cluster that has none and cannot add one waits forever: Ray's autoscaler
only logs "No available node types can fulfill resource request {'GPU': 1.0}" every 30 s. Ray publishes no
list of the node types an autoscaler may launch, but a cluster started without an autoscaling config (a
plain `ray start --head`, or ray.init()) still runs one in read-only mode, whose node types are the running
nodes themselves, each named format_readonly_node_type(its node id): such an autoscaler never adds a node.
"""

from __future__ import annotations

import json
import sys
import time

import ray

from happysad.storage import UsageError


def refuse_unless_one_can_come(gpu: bool) -> None:
    """With --gpu, a usage error (exit 2, one line) when no GPU can ever come; see gpu_unavailable_reason."""
    if gpu and (reason := gpu_unavailable_reason()):
        raise UsageError(f"--gpu: {reason}")


def gpu_unavailable_reason(wait_s: float = 15.0) -> str | None:
    """Call after ray.init(). None if a live node has a GPU, or if an autoscaler may add one (then it says once,
    on stderr, that it waits); else a one-line reason. On a cluster started moments ago it may wait up to
    `wait_s` for the autoscaler's first report."""
    if ray.cluster_resources().get("GPU", 0) > 0:
        return None
    from ray.autoscaler._private.util import format_readonly_node_type

    try:
        node_types = _autoscaler_node_types(wait_s)
    except Exception as e:  # Ray Client (no GCS address), an RPC failure, a report shaped otherwise
        node_types, failure = None, f"{type(e).__name__}: {e}".splitlines()[0]
    else:
        failure = "the autoscaler has not reported"
    if node_types is None:
        # Unknown: wait, as Ray itself would. Wrongly answering "no GPU can come" would abort a job that an
        # autoscaler was about to serve; wrongly waiting only keeps Ray's own behaviour.
        print(f"no GPU node yet, and the autoscaler's node types cannot be read ({failure}); waiting for one",
              file=sys.stderr)
        return None
    if all(kind == format_readonly_node_type(node) for node, kind in node_types.items()):
        return "no node of this cluster has a GPU and no autoscaler can add one (it was started without one)"
    print("no GPU node yet: waiting for the autoscaler to add one", file=sys.stderr)
    return None


def _autoscaler_node_types(wait_s: float) -> dict[str, str] | None:
    """{node id or IP: node type} as the cluster's autoscaler sees its nodes; None if it has not said."""
    from ray._private import ray_constants
    from ray._raylet import GcsClient
    from ray.autoscaler.v2.sdk import get_cluster_status
    from ray.autoscaler.v2.utils import is_autoscaler_v2

    address = ray.get_runtime_context().gcs_address
    gcs = GcsClient(address=address)
    if is_autoscaler_v2(fetch_from_server=True, gcs_client=gcs):
        # What `ray status` shows under v2. A node started without RAY_NODE_TYPE_NAME (set by `ray up` and
        # KubeRay on every node they start, the head included) is listed as format_readonly_node_type(its id),
        # which is also the type the v2 read-only config reader gives it.
        status = get_cluster_status(address)
        return {n.node_id: n.ray_node_type_name for n in status.active_nodes + status.idle_nodes} or None
    # v1: the monitor's report that `ray status` prints, rewritten every 5 s; its autoscaler part appears
    # only after the autoscaler's first update. The read-only provider names each node by its id.
    deadline = time.monotonic() + wait_s
    while True:
        raw = gcs.internal_kv_get(ray_constants.DEBUG_AUTOSCALING_STATUS.encode(), timeout=10)
        mapping = (json.loads(raw).get("autoscaler_report") or {}).get("node_type_mapping") if raw else None
        if mapping or time.monotonic() > deadline:
            return mapping or None
        time.sleep(0.5)
