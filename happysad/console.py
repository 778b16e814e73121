"""What a job prints: its own lines, and Ray's, TensorFlow's and Ray Data's only with `--verbose`.

Ray forwards every worker's stdout and stderr to the driver's console: TensorFlow's
start-up lines from each process, Ray Train's per-report lines, Ray Data's execution
plans. Quiet (the default), the driver shows only the worker lines written with `say`
(an epoch's metrics, a replica ready), prefixed `worker N:` or `replica:`, Ray's reports
on nodes and scheduling (raylet, autoscaler) and Ray's warnings (Ray Data's only as
errors); every line still lands in Ray's log folder (`/tmp/ray/session_latest/logs` on
each node), and `--verbose` shows them all. TensorFlow's import lines (oneDNN, CUDA not
found), which its native code writes before any log level is read, are held back in
every command that imports it. Where the output is not a terminal nothing is coloured.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.abc
import importlib.util
import logging
import os
import re
import sys
import tempfile
import warnings

MARK = "[happysad] "  # starts each worker line meant for the console; the driver drops it when showing the line
SYSTEM_SOURCES = ("autoscaler", "raylet")  # Ray's own reports on nodes and scheduling: always shown
_verbose = True  # until quiet() says otherwise: library code run outside the CLI shows everything
_ray_started_here = False  # join_ray started a new local Ray, whose workers inherit this process's environment

# Escape sequences a terminal reads (colours, cursor moves): CSI, OSC, and the two-byte ones.
_ANSI = re.compile(r"\x1b(?:\[[0-?]*[ -/]*[@-~]|\][^\x07\x1b]*(?:\x07|\x1b\\)|[@-Z\\-_])")
# What TensorFlow's and absl's native code says on import and first device use, on every machine without a GPU:
# glog-style INFO and WARNING lines (oneDNN, "Could not find cuda drivers", cpu_feature_guard and the line that
# continues it), absl's notice, and the cuInit error a machine without a CUDA driver gives. Other ERROR lines stay.
_NATIVE_NOISE = re.compile(
    r"[IW]\d{4} \d\d:\d\d:\d+\.\d+ +\d+ \S+:\d+\] "
    r"|E\d{4} \d\d:\d\d:\d+\.\d+ +\d+ cuda_\w+\.cc:\d+\] failed call to cuInit"
    r"|WARNING: All log messages before absl::InitializeLog\(\) is called are written to STDERR$"
    r"|To enable the following instructions: .*rebuild TensorFlow with the appropriate compiler flags\.$"
)


def say(text: str) -> None:
    """Print a line from a Ray worker that the job's console shows, as `worker N: text` from Ray Train's
    worker of world rank N, `replica: text` from any other actor (a scoring replica).

    Written to stdout directly: Ray Train replaces `print` in its workers with one that also logs the
    line to stderr, which would show every line twice.
    """
    speaker = _speaker()
    sys.stdout.write(f"{text}\n" if speaker is None else f"{MARK}{speaker}{text}\n")  # None: the driver itself
    sys.stdout.flush()


def _speaker() -> str | None:
    """The prefix of a Ray worker's line (`worker N: `, `replica: `); None in a process that is not a Ray worker."""
    train = sys.modules.get("ray.train")  # imported by every Train worker's loop; never imported here for this
    if train is not None:
        with contextlib.suppress(Exception):  # not in a Train worker: Ray Train says so by raising
            return f"worker {train.get_context().get_world_rank()}: "
    ray = sys.modules.get("ray")
    if ray is not None and ray.is_initialized():
        with contextlib.suppress(Exception):
            if ray.get_runtime_context().get_actor_id():
                return "replica: "
            return ""  # another Ray worker
    return None


def plain_unless_terminal() -> None:
    """Where stdout or stderr is not a terminal (a log file, a pipe, `ray job submit`), write no escape
    sequences to it. Called first, before any logging handler or Ray holds the streams.

    Ray colours the prefix of each line it relays unless RAY_COLOR_PREFIX=0; Ray reads it in the process
    that prints the relayed lines, this one (a Ray this process starts inherits it). Colour from elsewhere
    (Ray's tracebacks, its "[repeated Nx]" notes) is dropped by the stream itself.
    """
    plain = [name for name in ("stdout", "stderr") if not _isatty(getattr(sys, name))]
    if plain:
        os.environ.setdefault("RAY_COLOR_PREFIX", "0")
    for name in plain:
        stream = getattr(sys, name)
        if stream is not None and not isinstance(stream, _Plain):
            setattr(sys, name, _Plain(stream))


def _isatty(stream) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):  # None, or closed
        return False


class _Plain:
    """A text stream that writes what it is given less any terminal escape sequences."""

    def __init__(self, stream):
        self._stream = stream

    def write(self, text: str) -> int:
        self._stream.write(_ANSI.sub("", text) if "\x1b" in text else text)
        return len(text)

    def writelines(self, lines) -> None:
        for line in lines:
            self.write(line)

    def __getattr__(self, name):
        return getattr(self._stream, name)


def quiet() -> None:
    """Keep library chatter off the console; set before Ray starts, so a cluster this process starts inherits it,
    and before TensorFlow is imported."""
    global _verbose
    _verbose = False
    # Not a default: JAX's import sets 1 in the environment, which a process started from one that imported it
    # inherits, and TensorFlow's first device use would then print its cuInit ERROR line. --verbose keeps any.
    os.environ["TF_CPP_MIN_LOG_LEVEL"] = "3"
    # TensorFlow's Python INFO lines ("Assets written to: ...") would reach the root logger the CLI sets up.
    logging.getLogger("tensorflow").setLevel(logging.WARNING)
    if not any(isinstance(f, _QuietImport) for f in sys.meta_path):
        sys.meta_path.insert(0, _QuietImport())
    _ray_deprecations_off()


def _ray_deprecations_off() -> None:
    # Raised inside Ray's own calls (its Train ingest options), not ours: nothing for a user to change. Ray's
    # import puts its own filter for them first: join_ray puts this one back in front.
    warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"ray\.")


class _QuietImport(importlib.abc.MetaPathFinder):
    """Imports TensorFlow, whoever imports it first (Keras, a job's own code), inside `native_stderr_hidden`."""

    _finding = False

    def find_spec(self, name, path=None, target=None):
        if name != "tensorflow" or self._finding:
            return None
        self._finding = True
        try:
            spec = importlib.util.find_spec(name)  # the finders after this one
        finally:
            self._finding = False
        if spec is not None and spec.loader is not None and hasattr(spec.loader, "exec_module"):
            run = spec.loader.exec_module

            def exec_module(module):
                with native_stderr_hidden():
                    run(module)

            spec.loader.exec_module = exec_module  # this spec's own loader: nothing else is wrapped
        return spec


def join_ray() -> None:
    """Start or join Ray (RAY_ADDRESS, else the cluster `ray start` began here, else a new local one); joining,
    pass this process's S3 endpoint and region, and TensorFlow's oneDNN switch, on to every worker of the job
    (a Ray started here inherits them; the Keras backend goes to scoring's tasks only: `task_runtime_env`);
    quiet, keep only `say` lines.

    Called where a job first needs Ray, after its own checks: a bad flag costs no cluster start.
    """
    import ray
    import ray.data  # configures Ray Data's loggers: a file in Ray's session log folder, and the console

    from happysad import storage

    if not _verbose:
        _ray_deprecations_off()
        # Ray Data's console says INFO (execution plans, progress blocks) and warns falsely at every start
        # ("no available CPUs" before the node has registered them): errors only. Its log file keeps all.
        for handler in logging.getLogger("ray.data").handlers:
            if not isinstance(handler, logging.FileHandler):
                handler.setLevel(logging.ERROR)
    _actor_state_by_value()
    if not ray.is_initialized():
        global _ray_started_here
        _ray_started_here = _starts_its_own_ray()
        # A Ray started here inherits this environment. Joining one, a submitted job's own env_vars already
        # reach its workers, and Ray refuses a key named twice.
        # happysad/__init__.py sets oneDNN's switch; absent only where happysad was imported without it (an
        # editable install older than that file makes `happysad` a namespace package): then not forwarded.
        onednn = {k: os.environ[k] for k in ("TF_ENABLE_ONEDNN_OPTS",) if k in os.environ}
        forwarded = storage.ray_env_vars() | onednn
        env = {} if _ray_started_here else {k: v for k, v in forwarded.items() if k not in _submitted_job_env()}
        # Quiet, only Ray's errors: its start-up notices would come before the job's own first lines. A Ray
        # started here lives for this job only: its dashboard's web UI and state API would serve nobody
        # (ignored when joining a running cluster, which keeps its own).
        ray.init(
            runtime_env={"env_vars": env} if env else None,
            logging_level=logging.INFO if _verbose else logging.ERROR,
            include_dashboard=False,
        )
        if not _verbose:
            logging.getLogger("ray").setLevel(logging.WARNING)  # later warnings (autoscaler errors) are shown
    if sys.stdout.isatty():  # Ray Data's bars (done/total, rate, ETA) with rich, which Ray installs; tqdm may be absent
        context = ray.data.DataContext.get_current()
        context.enable_rich_progress_bars, context.use_ray_tqdm = True, False
    if not _verbose:
        _show_only_marked_worker_lines()


def task_runtime_env() -> dict | None:
    """The runtime_env of scoring's Ray Data tasks and replicas (score, evaluate): the Keras backend and the S3
    endpoint and region, per task: a cluster joined by an earlier job of this process (a test session's) got
    that job's variables, not this one's. Nothing on a Ray this job started: it inherited this environment."""
    from happysad import storage

    env = {} if _ray_started_here else {k: os.environ[k] for k in ("KERAS_BACKEND",) if k in os.environ} | storage.ray_env_vars()
    return {"env_vars": env} if env else None


def _starts_its_own_ray() -> bool:
    """Whether `ray.init()` will start a new local Ray (no RAY_ADDRESS, no `ray start` cluster on this machine),
    whose processes inherit this one's environment. Then the job passes no runtime_env: one makes Ray start
    every worker through its runtime-env agent instead of its prestarted ones (6,000 faces scored: 60.8 s ->
    56.1 s, means of 2 here). Ray has no public call for this; if its private one fails, the env is passed."""
    try:
        from ray._private.services import canonicalize_bootstrap_address

        return canonicalize_bootstrap_address(None) is None
    except Exception:  # noqa: BLE001 - moved or changed in another Ray: pass the env, as when joining
        return False


def _actor_state_by_value() -> None:
    """Ray Data starts each actor of an actor pool (score's and evaluate's replicas) with two arguments it has
    put in the object store, its DataContext and the pool's MapTransformer (the replica class and its
    fn_constructor_kwargs), ~6 KB and 5-10 KB. With max_restarts > 0 (Ray Data's default is -1; score sets
    3) Ray 2.60 then prints a `core_worker.cc ... has constructor arguments in the object store` error in the
    driver, once per process, whatever the sizes (ray-project/ray#53727, and #57733 for Ray Data): a restart
    would read them from the object store. Passed by value instead, they travel inside the actor's creation
    task, which a restart reuses, and the line has no cause. Above Ray's inline limit (100 KB) Ray would
    still store them, and the line would still be true. Ray Data's own tasks keep the references.
    """
    try:
        from ray.data._internal.execution.operators.actor_pool_map_operator import ActorPoolMapOperator
    except ImportError:
        return
    start = ActorPoolMapOperator.__dict__.get("_start_actor")
    if start is None or getattr(start, "by_value", False):
        return
    names = ("_data_context_ref", "_map_transformer_ref")  # functools.cached_property: the instance's dict wins

    @functools.wraps(start)
    def start_by_value(self, *args, **kwargs):
        if not (hasattr(self, "data_context") and hasattr(self, "_map_transformer")):  # another Ray Data
            return start(self, *args, **kwargs)
        cached = {name: self.__dict__.pop(name) for name in names if name in self.__dict__}
        self.__dict__.update(_data_context_ref=self.data_context, _map_transformer_ref=self._map_transformer)
        try:
            return start(self, *args, **kwargs)
        finally:
            for name in names:
                self.__dict__.pop(name, None)
            self.__dict__.update(cached)

    start_by_value.by_value = True
    ActorPoolMapOperator._start_actor = start_by_value


@contextlib.contextmanager
def native_stderr_hidden():
    """Quiet, hold back what is written to stderr (file descriptor 2, C++ code's too) inside the block, then
    write it out less TensorFlow's and absl's native start-up lines: TensorFlow's import prints its oneDNN and
    CUDA-not-found lines before any log level is read (TF_CPP_MIN_LOG_LEVEL cannot stop them). Anything else
    written meanwhile (a warning, a line Ray relays) comes out after the block. If the block raises, all of it
    is written out."""
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
            held.seek(0)
            text = held.read().decode(errors="replace")
            if not failed:
                text = "".join(line for line in text.splitlines(keepends=True) if not _NATIVE_NOISE.match(line))
            if text:
                sys.stderr.write(text)
                sys.stderr.flush()


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
            if lines:  # as `say` wrote them ("worker 0: ..."), not under Ray's "(RayTrainWorker pid=N)"
                sink = sys.stderr if data.get("is_err") else sys.stdout
                sink.write("".join(f"{line}\n" for line in lines))
                sink.flush()

        marked_only.marked_only = True
        dispatcher.handlers = [(name, marked_only if name == "ray_print_logs" else h) for name, h in dispatcher.handlers]
