"""The per-worker training loop: a custom MultiWorkerMirroredStrategy step on Keras 3.

Keras 3's `model.fit` fails under MWMS (keras-team/keras#20585), so the step
is written out: model, optimizer and metrics are built in `strategy.scope()`,
the loss is scaled by the global batch, and metrics are sum-on-read
variables whose `result()` is the value over every worker's data.

Input: each worker's Ray Data shard becomes a `tf.data` pipeline
(`WorkerInput`): rows -> a seeded shuffle buffer (train only) ->
per-worker batches -> prefetch, distributed with
`distribute_datasets_from_function` and no auto-sharding (Ray already shards).
The order depends only on the rows the shard delivers, the seed and the epoch.

No hang by construction (`Lockstep`): before every step all workers
all-reduce an "I have a batch" flag and stop together as soon as any one is
out, so different shard sizes can never leave one worker waiting in a
collective. A collective stuck for another reason (a dead peer) fails after
`collective_timeout_s` instead of hanging.

Scores: the last val pass and the test pass keep every real row's exact score
(padding weighs 0 and is left out) and each worker writes them to the run
directory (`_write_predictions`). The driver merges them and computes the
threshold and metrics.json's val and test metrics from them (`happysad.metrics`):
the Keras metrics here, AUC's 1,000 buckets included, only make each epoch's
history row and log line.
"""

from __future__ import annotations

import hashlib
import json
import os
import queue
import tempfile
import threading
import time

import numpy as np

IMAGE_SHAPE = (256, 256, 3)
SHUFFLE_ROWS = 256  # per-worker shuffle buffer of the train split: ~50 MB of decoded images
PREFETCH_BATCHES = 2  # batches made ready while a step runs


def train_loop_per_worker(loop_config: dict) -> dict | None:
    import keras
    import ray.train
    import tensorflow as tf

    from happysad import console
    from happysad.metrics import defined_metrics, shown

    config = loop_config["config"]
    rows = loop_config["rows"]  # rows per split, including weight-0 padding
    counts = loop_config["counts"]  # real rows per split and class
    rank = ray.train.get_context().get_world_rank()
    tf.keras.utils.set_random_seed(config.seed)

    options = tf.distribute.experimental.CommunicationOptions(timeout_seconds=config.collective_timeout_s)
    strategy = tf.distribute.MultiWorkerMirroredStrategy(communication_options=options)
    lockstep = Lockstep(strategy)
    global_batch = config.batch_size  # TrainConfig makes it a multiple of the workers

    with strategy.scope():
        model, state = _restore_or_build(config)
        if state["epoch"] and rank == 0:  # `--resume`, or a worker group restarted after a failure
            console.say(f"resuming from epoch {state['epoch'] + 1} of {config.epochs} (the checkpoint holds {state['epoch']} trained)")
        optimizer = model.optimizer
        train_metrics = _metrics(keras, "train")
        val_metrics = _metrics(keras, "val")

    def forward(batch, metrics, training):
        """(the loss to step on, the scores)."""
        y = tf.cast(tf.reshape(batch["label"], (-1, 1)), tf.float32)
        w = batch["weight"]
        p = model(batch["image"], training=training)
        per_example = keras.losses.binary_crossentropy(y, p)
        for name, metric in metrics.items():
            if name == "loss":
                metric.update_state(per_example, sample_weight=w)
            else:
                metric.update_state(y, p, sample_weight=w)
        return tf.nn.compute_average_loss(per_example * w, global_batch_size=global_batch), p

    @tf.function
    def train_step(batch):
        def replica(batch):
            with tf.GradientTape() as tape:
                loss, _ = forward(batch, train_metrics, training=True)
            grads = tape.gradient(loss, model.trainable_variables)
            optimizer.apply_gradients(zip(grads, model.trainable_variables))

        strategy.run(replica, args=(batch,))

    def eval_step_for(metrics):
        """A step that updates `metrics` and returns the batch's scores."""
        return tf.function(lambda batch: strategy.run(lambda b: forward(b, metrics, training=False)[1], args=(batch,)))

    # The val and test splits' paths are kept: their scores, from their own passes, are written with them.
    inputs = {
        split: WorkerInput(ray.train.get_dataset_shard(split), strategy, global_batch, keep_paths=split in ("val", "test"))
        for split in rows
    }

    def run_epoch(split: str, step, shuffle_seed: int | None) -> int:
        """One pass over this worker's shard; returns the steps taken (equal on every worker)."""
        return lockstep.steps(inputs[split].epoch(shuffle_seed), step)

    def evaluate(split: str, step, metrics: dict) -> dict:
        """The split's metrics over every worker's rows; undefined ones are None (metrics.defined_metrics)."""
        for metric in metrics.values():
            metric.reset_state()
        if rows[split]:
            run_epoch(split, step, None)
        # Reading a metric is a collective: every rank reads the same ones in the same order.
        values = {name: float(metric.result()) for name, metric in metrics.items()}
        precision = metrics["precision"]
        predicted_sad = float(np.sum(precision.true_positives.numpy()) + np.sum(precision.false_positives.numpy()))
        return defined_metrics(values, split, **counts[split], predicted_sad=predicted_sad)

    def keeping_scores(step, scored: list):
        """`step`, also keeping this worker's (scores, labels, weights) of each batch stepped."""

        def kept(batch):
            local = strategy.experimental_local_results  # one replica per worker
            scores = step(batch)
            scored.append(tuple(local(x)[0].numpy().reshape(-1) for x in (scores, batch["label"], batch["weight"])))

        return kept

    def validate(write_scores: bool) -> dict:
        """Val metrics at 0.5 for the history; with `write_scores`, this worker's val scores are written too."""
        scored = []
        val = evaluate("val", keeping_scores(val_step, scored) if write_scores else val_step, val_metrics)
        if write_scores and rows["val"]:  # every rank or none
            _write_predictions("val", scored, inputs["val"].paths, loop_config["output"], rank)
        return val

    val_step = eval_step_for(val_metrics)
    scores_written = False
    for epoch in range(state["epoch"], config.epochs):
        for metric in train_metrics.values():
            metric.reset_state()
        start = time.perf_counter()
        run_epoch("train", train_step, config.seed * 10_000 + epoch)
        seconds = time.perf_counter() - start
        # The loss metric's count is the sum of weights stepped: real rows only, padding counts 0.
        images = int(round(float(train_metrics["loss"].count.numpy())))
        row = {"epoch": epoch + 1, "images_per_second": images / seconds, "images": images}
        row |= {k: float(m.result()) for k, m in train_metrics.items() if k in ("loss", "accuracy")}
        # The last epoch's val pass scores the final model: its scores choose the threshold (in the driver).
        scores_written = epoch + 1 == config.epochs
        val = validate(write_scores=scores_written)
        row |= {"val_loss": val["loss"], "val_accuracy": val["accuracy"]}
        state = {"epoch": epoch + 1, "history": state["history"] + [row], "val": val}
        if rank == 0:
            console.say(
                f"epoch {epoch + 1}/{config.epochs}  loss {row['loss']:.4f}  accuracy {row['accuracy']:.4f}  "
                f"val_accuracy {shown(val, 'accuracy')}  {row['images_per_second']:.1f} img/s"
            )
        _report(model, state, rank)

    if not scores_written:  # no epoch left to run (a resumed, finished run): one val pass for the scores
        validate(write_scores=True)
    # The test split's scores; its metrics, at the threshold the val scores give, are computed in the driver.
    if rows["test"]:  # every rank or none
        scored = []
        run_epoch("test", keeping_scores(eval_step_for({}), scored), None)
        _write_predictions("test", scored, inputs["test"].paths, loop_config["output"], rank)
    hashes = _replica_weight_hashes(model, strategy)
    if rank != 0:
        return None
    from happysad.run_files import tensorboard_files  # here, where TF is loaded already: the driver never imports it

    return {
        "history": state["history"],
        "model": _inference_model_bytes(model),
        "tensorboard": tensorboard_files(state["history"]),
        "replica_weight_hashes": hashes,
    }


class WorkerInput:
    """One split of this worker's Ray Data shard as a distributed `tf.data` pipeline.

    Rows -> (train) a shuffle buffer seeded by the epoch's seed -> per-worker
    batches -> prefetch. Batching rows, not Ray blocks, makes the batches
    independent of block sizes: a cached and a streamed dataset delivering the
    same rows feed the same batches. The batches are made in Python (one
    generator call per batch, not per row) and handed to `tf.data`, which
    prefetches them while a step runs. `distribute_datasets_from_function`,
    because `experimental_distribute_dataset` would treat a batch as global and
    split it again (FIELD_NOTES); auto-sharding is off because Ray Train already
    gave this worker its share. Built once per run and iterated once per epoch.
    """

    def __init__(self, shard, strategy, global_batch: int, keep_paths: bool = False):
        import tensorflow as tf

        self._shard, self._seed = shard, None
        self._keep_paths = keep_paths
        self.paths: list[np.ndarray] = []  # with keep_paths: each batch's paths, in the order the epoch made them
        self._batch = global_batch // strategy.num_replicas_in_sync  # one replica per worker
        spec = {
            "image": tf.TensorSpec((None, *IMAGE_SHAPE), tf.uint8),
            "label": tf.TensorSpec((None,), tf.int8),
            "weight": tf.TensorSpec((None,), tf.float32),
        }

        def dataset(context: tf.distribute.InputContext) -> tf.data.Dataset:
            ds = tf.data.Dataset.from_generator(self._batches, output_signature=spec).prefetch(PREFETCH_BATCHES)
            options = tf.data.Options()
            options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.OFF
            options.autotune.enabled = False  # freeing an iterator waited up to ~5 s for its model thread (measured)
            return ds.with_options(options)

        # Batches stay on the host until the step: a CPU replica gains nothing from a device prefetcher.
        host = tf.distribute.InputOptions(experimental_fetch_to_device=False)
        self._distributed = strategy.distribute_datasets_from_function(dataset, options=host)

    def epoch(self, shuffle_seed: int | None = None):
        """This epoch's batches, {"image", "label", "weight"} of this worker's rows, as a generator."""
        self._seed = shuffle_seed  # read when the iterator starts the generator
        self.paths = []
        iterator = iter(self._distributed)
        try:
            yield from iterator
        finally:
            # Freed on this thread, a finished iterator over a Python generator stalled for up to ~5 s
            # (measured; TF waits on its py_func clean-up). Another thread frees it at once.
            _discard(iterator)
            del iterator

    def _batches(self):
        kept_paths = self.paths  # this epoch's list (epoch() made it before starting this generator)
        rows = (
            (block["image"][i], block["label"][i], block["weight"][i], block["path"][i] if self._keep_paths else "")
            for block in self._shard.iter_batches(batch_size=None, batch_format="numpy")  # whole blocks: no copy in Ray
            for i in range(len(block["label"]))
        )
        if self._seed is not None:
            rows = shuffled(rows, SHUFFLE_ROWS, np.random.default_rng(self._seed))
        for chunk in batched(rows, self._batch):
            images, labels, weights, paths = zip(*chunk)
            if self._keep_paths:
                kept_paths.append(np.array(paths))
            yield {"image": np.stack(images), "label": np.array(labels, np.int8), "weight": np.array(weights, np.float32)}


_discarded: queue.Queue | None = None  # finished tf.data iterators on their way to _free_forever


def _discard(iterator) -> None:
    """Hand over the last reference to `iterator` to a thread that frees it (started on first use)."""
    global _discarded
    if _discarded is None:
        _discarded = queue.Queue()
        threading.Thread(target=_free_forever, args=(_discarded,), name="free-tf-iterators", daemon=True).start()
    _discarded.put(iterator)


def _free_forever(discarded: queue.Queue) -> None:
    while True:
        discarded.get()  # the reference dies here, on this thread


def batched(rows, size: int):
    """Lists of `size` rows; the last may be shorter."""
    chunk = []
    for row in rows:
        chunk.append(row)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def shuffled(rows, size: int, rng: np.random.Generator):
    """`rows` through a shuffle buffer of `size`: the order depends only on their order and `rng`."""
    buffer = []
    for row in rows:
        if len(buffer) < size:
            buffer.append(row)
            continue
        slot = rng.integers(size)
        yield buffer[slot]
        buffer[slot] = row
    rng.shuffle(buffer)
    yield from buffer


class Lockstep:
    """Steps all workers together: a step runs only while every worker has a batch.

    Before each step the workers all-reduce a "have a batch" flag; as soon as
    the sum is below the worker count, every worker stops, after the same
    number of steps. An empty batch counts as none: TF's own uneven-input
    handling hands an exhausted worker empty batches, which crash a Conv2D
    under oneDNN (FIELD_NOTES).
    """

    def __init__(self, strategy):
        import tensorflow as tf

        self.strategy, self.workers = strategy, strategy.num_replicas_in_sync  # one replica per worker

        @tf.function
        def workers_with_a_batch(flag):
            return strategy.reduce("SUM", strategy.run(tf.identity, args=(flag,)), axis=None)

        self._workers_with_a_batch = workers_with_a_batch

    def steps(self, batches, step) -> int:
        """Call `step(batch)` for each batch while all workers have one; returns the steps taken."""
        iterator, taken = iter(batches), 0
        while True:
            batch = next(iterator, None)
            rows = 0 if batch is None else self.strategy.experimental_local_results(batch["weight"])[0].shape[0]
            if not self.all_have_a_batch(rows > 0):
                return taken
            step(batch)
            taken += 1

    def all_have_a_batch(self, mine: bool) -> bool:
        import tensorflow as tf

        if self.workers == 1:  # no one to agree with: no collective
            return mine
        return int(self._workers_with_a_batch(tf.constant(int(mine)))) == self.workers


def _metrics(keras, prefix: str, threshold: float = 0.5) -> dict:
    """Sum-on-read metrics for the history and log lines; a score above `threshold` counts as sad (Keras's
    rule); AUC on 1,000 buckets. metrics.json's numbers come from the exact scores instead (happysad.metrics)."""
    return {
        "loss": keras.metrics.Mean(name=f"{prefix}_loss"),
        "accuracy": keras.metrics.BinaryAccuracy(name=f"{prefix}_accuracy", threshold=threshold),
        "precision": keras.metrics.Precision(name=f"{prefix}_precision", thresholds=threshold),
        "recall": keras.metrics.Recall(name=f"{prefix}_recall", thresholds=threshold),
        "auc": keras.metrics.AUC(name=f"{prefix}_auc", num_thresholds=1000),
    }


def _restore_or_build(config):
    """The model and loop state from the latest checkpoint Ray Train has, or fresh ones."""
    import keras
    import ray.train

    from happysad.model import build_model

    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        model = build_model()
        model.compile(optimizer=keras.optimizers.Adam(config.learning_rate), loss="binary_crossentropy")
        return model, {"epoch": 0, "history": [], "val": {}}
    with checkpoint.as_directory() as directory:
        # Our own epoch counter: the newest checkpoint can be lost at a kill (FIELD_NOTES).
        with open(os.path.join(directory, "state.json")) as f:
            state = json.load(f)
        model = keras.models.load_model(os.path.join(directory, "model.keras"), safe_mode=True)
    return model, state


def _report(model, state: dict, rank: int) -> None:
    """Every rank reports each epoch (a barrier); rank 0 attaches the checkpoint."""
    import ray.train

    metrics = state["history"][-1]
    if rank != 0:
        ray.train.report(metrics)
        return
    with tempfile.TemporaryDirectory() as tmp:
        model.save(os.path.join(tmp, "model.keras"))
        with open(os.path.join(tmp, "state.json"), "w") as f:
            json.dump(state, f)
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))


def _inference_model_bytes(model) -> bytes:
    """model.keras for serving: the trained weights in a fresh, uncompiled model.

    Keras 3 has no `include_optimizer=False`: saving the training model would
    carry Adam's two moments (~44 MB instead of ~15). Checkpoints keep them for --resume.
    """
    from happysad.model import build_model

    bare = build_model()
    bare.set_weights(model.get_weights())
    with tempfile.TemporaryDirectory() as tmp:
        bare.save(os.path.join(tmp, "model.keras"))
        with open(os.path.join(tmp, "model.keras"), "rb") as f:
            return f.read()


def _write_predictions(split: str, scored: list[tuple], batch_paths: list[np.ndarray], output: str, rank: int) -> None:
    """This worker's rows of `split` (path, score, true_label) as one Parquet file: the scores of that split's pass.

    The driver merges every worker's file (`predictions.worker_predictions`): the threshold
    and metrics.json's numbers come from them, and the report's rows; nothing reads the
    data again. The epoch may have made batches past the last one stepped (prefetch):
    those were not scored. Padding rows weigh 0 and are left out.
    """
    import pyarrow as pa

    from happysad import run_files, storage
    from happysad.model import CLASSES

    scores, labels, weights = (np.concatenate(column) for column in zip(*scored))  # every worker steps >= 1 batch
    paths = np.concatenate(batch_paths[: len(scored)])
    assert len(paths) == len(scores), f"the {split} batches and their paths differ"
    real = weights > 0
    rows = {"path": paths[real].tolist(), "score": scores[real], "true_label": [CLASSES[label] for label in labels[real]]}
    table = pa.table(rows, schema=run_files.WORKER_PREDICTIONS)
    storage.write_parquet(storage.join(output, run_files.WORKER_PREDICTIONS_DIRS[split], f"rank-{rank}.parquet"), table)


def _replica_weight_hashes(model, strategy) -> list[int]:
    """Every rank's weight hash, gathered on every rank: equal when the replicas are in sync."""
    import tensorflow as tf

    digest = hashlib.sha256()
    for weight in model.get_weights():
        digest.update(np.ascontiguousarray(weight).tobytes())
    mine = tf.constant([int.from_bytes(digest.digest()[:7], "little")], tf.int64)
    gathered = strategy.gather(strategy.run(lambda: tf.identity(mine)), axis=0)
    return [int(h) for h in gathered.numpy()]
