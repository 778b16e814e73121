"""What a job prints: its own lines, and Ray's, TensorFlow's and Ray Data's only with `--verbose`.

Ray forwards every worker's stdout and stderr to the driver's console: TensorFlow's
start-up lines from each process, Ray Train's per-report lines, Ray Data's execution
plans. Quiet (the default), the driver shows only the worker lines written with `say`
(an epoch's metrics, a replica ready), Ray's reports on nodes and scheduling (raylet,
autoscaler) and Ray's warnings (Ray Data's only as errors); every line still lands in Ray's log folder
(`/tmp/ray/session_latest/logs` on each node), and `--verbose` shows them all.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import tempfile
import warnings

MARK = "[happysad] "  # starts each worker line meant for the console; the driver drops it when showing the line
SYSTEM_SOURCES = ("autoscaler", "raylet")  # Ray's own reports on nodes and scheduling: always shown
_verbose = True  # until quiet() says otherwise: library code run outside the CLI shows everything


def say(text: str) -> None:
    """Print a line from a Ray worker that the job's console shows (with Ray's "(Worker pid=N)" prefix).

    Written to stdout directly: Ray Train replaces `print` in its workers with one that also logs the
    line to stderr, which would show every line twice.
    """
    sys.stdout.write(MARK + text + "\n")
    sys.stdout.flush()


def quiet() -> None:
    """Keep library chatter off the console; set before Ray starts, so a cluster this process starts inherits it."""
    global _verbose
    _verbose = False
    import ray.data  # configures Ray Data's loggers: a file in Ray's session log folder, and the console

    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    # Ray Data's console says INFO (execution plans, progress blocks) and warns falsely at every start
    # ("no available CPUs" before the node has registered them): errors only. Its log file keeps all.
    for handler in logging.getLogger("ray.data").handlers:
        if not isinstance(handler, logging.FileHandler):
            handler.setLevel(logging.ERROR)
    # Raised inside Ray's own calls (its Train ingest options), not ours: nothing for a user to change.
    warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"ray\.")


def join_ray() -> None:
    """Start or join Ray (RAY_ADDRESS, else the cluster `ray start` began here, else a new local one), passing
    this process's S3 endpoint and region on to every worker of the job; quiet, keep only `say` lines.

    Called where a job first needs Ray, after its own checks: a bad flag costs no cluster start.
    """
    import ray
    import ray.data

    from happysad import storage

    if not ray.is_initialized():
        # A submitted job's own env_vars already reach its workers, and Ray refuses a key named twice.
        env = {k: v for k, v in storage.ray_env_vars().items() if k not in _submitted_job_env()}
        # Quiet, only Ray's errors: its start-up notices would come before the job's own first lines.
        ray.init(runtime_env={"env_vars": env} if env else None, logging_level=logging.INFO if _verbose else logging.ERROR)
        if not _verbose:
            logging.getLogger("ray").setLevel(logging.WARNING)  # later warnings (autoscaler errors) are shown
    if sys.stdout.isatty():  # Ray Data's bars (done/total, rate, ETA) with rich, which Ray installs; tqdm may be absent
        context = ray.data.DataContext.get_current()
        context.enable_rich_progress_bars, context.use_ray_tqdm = True, False
    if not _verbose:
        _show_only_marked_worker_lines()


@contextlib.contextmanager
def native_stderr_hidden():
    """Quiet, hold back what C++ code writes to stderr inside the block: TensorFlow's import prints its
    oneDNN and CUDA-not-found lines before any log level is read (TF_CPP_MIN_LOG_LEVEL cannot stop them).
    If the block raises, what was held back is written out after all."""
    if _verbose:
        yield
        return
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as held:
        os.dup2(held.fileno(), 2)
        failed = True
        try:
            yield
            failed = False
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            if failed:
                held.seek(0)
                sys.stderr.write(held.read().decode(errors="replace"))


def _submitted_job_env() -> dict:
    import json

    job_config = json.loads(os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR") or "{}")
    return (job_config.get("runtime_env") or {}).get("env_vars") or {}


def _show_only_marked_worker_lines() -> None:
    # Ray has no public hook on the stream of worker lines it prints; this wraps the handler it registers.
    try:
        from ray._private.ray_logging import global_worker_stdstream_dispatcher as dispatcher
    except ImportError:  # another Ray: everything is shown, as with --verbose
        return
    with dispatcher._lock:
        show = dict(dispatcher.handlers).get("ray_print_logs")
        if show is None or getattr(show, "marked_only", False):  # log_to_driver off, or already wrapped
            return

        def marked_only(data: dict) -> None:
            if data.get("pid") in SYSTEM_SOURCES:  # a node lost, a task that cannot be scheduled
                show(data)
                return
            lines = [line[line.index(MARK) + len(MARK) :] for line in data["lines"] if MARK in line]
            if lines:
                show(data | {"lines": lines})

        marked_only.marked_only = True
        dispatcher.handlers = [(name, marked_only if name == "ray_print_logs" else h) for name, h in dispatcher.handlers]
