"""gpu_unavailable_reason: the session head has no GPU and no autoscaling config (its autoscaler is read-only),
so a GPU can never come; a cluster whose autoscaler has node types of its own, or whose autoscaler cannot
be read, is waited on."""

import time

import pytest

from happysad import gpus


def test_no_gpu_and_no_autoscaler_is_reported_within_seconds(ray_session, capsys):
    start = time.monotonic()
    reason = gpus.gpu_unavailable_reason()
    elapsed = time.monotonic() - start
    assert reason == "no node of this cluster has a GPU and no autoscaler can add one (it was started without one)"
    assert elapsed < 20, f"took {elapsed:.1f} s"  # the head's read-only autoscaler reports within ~5 s of its start
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize(
    ("node_types", "said"),
    [
        ({"10.0.0.5": "head", "10.0.0.6": "cpu_worker"}, "waiting for the autoscaler to add one"),  # `ray up`'s types
        (None, "cannot be read"),  # no report: wait, as Ray itself would
    ],
)
def test_an_autoscaler_that_may_add_a_gpu_is_waited_on(ray_session, monkeypatch, capsys, node_types, said):
    monkeypatch.setattr(gpus, "_autoscaler_node_types", lambda wait_s: node_types)
    assert gpus.gpu_unavailable_reason() is None
    err = capsys.readouterr().err
    assert said in err and err.count("\n") == 1
