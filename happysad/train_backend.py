"""Ray Train's backend for MultiWorkerMirroredStrategy: each worker's TF_CONFIG, without TensorFlow.

Ray's own `TensorflowTrainer` does the same, but its package imports TensorFlow (5-8 s of start-up)
in the driver and in Ray Train's controller, neither of which runs TensorFlow: the controller's
import sits between the job's start and the worker group's. This config is picklable without
TensorFlow, so only the training workers import it.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

from ray.train.backend import Backend, BackendConfig


@dataclass
class StrategyConfig(BackendConfig):
    @property
    def backend_cls(self):
        return _StrategyBackend


def _set_tf_config(addresses: list[str], index: int) -> None:
    """The cluster MultiWorkerMirroredStrategy reads from TF_CONFIG: every worker's address, and this one's rank.
    Unlike Ray's backend, TF_USE_LEGACY_KERAS is left unset: the workers run Keras 3, not tf_keras."""
    os.environ["TF_CONFIG"] = json.dumps({"cluster": {"worker": addresses}, "task": {"type": "worker", "index": index}})


def _address() -> str:
    from ray._common.network_utils import build_address
    from ray.train._internal.utils import get_address_and_port

    return build_address(*get_address_and_port())


class _StrategyBackend(Backend):
    def on_start(self, worker_group, backend_config: StrategyConfig) -> None:
        import ray

        addresses = worker_group.execute(_address)
        ray.get([
            worker_group.execute_single_async(rank, _set_tf_config, addresses=addresses, index=rank)
            for rank in range(len(worker_group))
        ])
