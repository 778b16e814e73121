"""The per-worker training loop: a custom MultiWorkerMirroredStrategy step on Keras 3.

Keras 3's `model.fit` fails under MWMS (keras-team/keras#20585), so the step
is written out: model, optimizer and metrics are built in `strategy.scope()`,
the loss is scaled by the global batch, and metrics are sum-on-read
variables whose `result()` is the value over every worker's data.

No hang by construction: before every step all workers all-reduce an
"I still have a batch" flag and stop together as soon as any one is out, so
different shard sizes can never leave one worker waiting in a collective. A
collective stuck for another reason (a dead peer) fails after
`collective_timeout_s` instead of hanging.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import time

import numpy as np



def train_loop_per_worker(loop_config: dict) -> dict | None:
    import keras
    import ray.train
    import tensorflow as tf

    from happysad.report import defined_metrics, shown

    config = loop_config["config"]
    rows = loop_config["rows"]  # rows per split, including weight-0 padding
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    tf.keras.utils.set_random_seed(config.seed)

    options = tf.distribute.experimental.CommunicationOptions(timeout_seconds=config.collective_timeout_s)
    strategy = tf.distribute.MultiWorkerMirroredStrategy(communication_options=options)
    per_worker = config.batch_size // world  # TrainConfig makes the batch a multiple of the workers
    global_batch = config.batch_size

    with strategy.scope():
        model, state = _restore_or_build(config)
        optimizer = model.optimizer
        train_metrics = _metrics(keras, "train")
        eval_metrics = _metrics(keras, "eval")

    def forward(x, y, w, metrics, training):
        p = model(x, training=training)
        per_example = keras.losses.binary_crossentropy(y, p)
        for name, metric in metrics.items():
            if name == "loss":
                metric.update_state(per_example, sample_weight=w)
            else:
                metric.update_state(y, p, sample_weight=w)
        return tf.nn.compute_average_loss(per_example * w, global_batch_size=global_batch)

    @tf.function
    def train_step(x, y, w):
        def replica(x, y, w):
            with tf.GradientTape() as tape:
                loss = forward(x, y, w, train_metrics, training=True)
            grads = tape.gradient(loss, model.trainable_variables)
            optimizer.apply_gradients(zip(grads, model.trainable_variables))

        strategy.run(replica, args=(x, y, w))

    @tf.function
    def eval_step(x, y, w):
        strategy.run(lambda x, y, w: forward(x, y, w, eval_metrics, training=False), args=(x, y, w))

    @tf.function
    def workers_with_a_batch(flag):
        return strategy.reduce("SUM", strategy.run(tf.identity, args=(flag,)), axis=None)

    def run_epoch(split: str, step, shuffle_seed: int | None) -> int:
        """One pass over this worker's shard; returns the steps taken (equal on every worker)."""
        batches = iter(
            ray.train.get_dataset_shard(split).iter_tf_batches(
                batch_size=per_worker,
                local_shuffle_buffer_size=256 if shuffle_seed is not None else None,
                local_shuffle_seed=shuffle_seed,
            )
        )
        steps = 0
        while True:
            batch = next(batches, None)
            if int(workers_with_a_batch(tf.constant(int(batch is not None)))) < world:
                return steps
            y = tf.cast(tf.reshape(batch["label"], (-1, 1)), tf.float32)
            step(batch["image"], y, tf.cast(batch["weight"], tf.float32))
            steps += 1

    def evaluate(split: str) -> dict:
        """The split's metrics over every worker's rows; undefined ones are None (report.defined_metrics)."""
        for metric in eval_metrics.values():
            metric.reset_state()
        if rows[split]:
            run_epoch(split, eval_step, None)
        # Reading a metric is a collective: every rank reads the same ones in the same order.
        values = {name: float(metric.result()) for name, metric in eval_metrics.items()}
        precision = eval_metrics["precision"]
        predicted_sad = float(np.sum(precision.true_positives.numpy()) + np.sum(precision.false_positives.numpy()))
        return defined_metrics(values, split, **loop_config["counts"][split], predicted_sad=predicted_sad)

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
        val = evaluate("val")
        row |= {"val_loss": val["loss"], "val_accuracy": val["accuracy"]}
        state = {"epoch": epoch + 1, "history": state["history"] + [row], "val": val}
        if rank == 0:
            print(
                f"epoch {epoch + 1}/{config.epochs}  loss {row['loss']:.4f}  accuracy {row['accuracy']:.4f}  "
                f"val_accuracy {shown(val, 'accuracy')}  {row['images_per_second']:.1f} img/s",
                flush=True,
            )
        _report(model, state, rank)

    test = evaluate("test")
    hashes = _replica_weight_hashes(model, strategy)
    if rank != 0:
        return None
    with tempfile.TemporaryDirectory() as tmp:
        model.save(os.path.join(tmp, "model.keras"))
        with open(os.path.join(tmp, "model.keras"), "rb") as f:
            model_bytes = f.read()
    from happysad.report import tensorboard_files  # here, where TF is loaded already: the driver never imports it

    return {
        "history": state["history"],
        "val": state["val"],
        "test": test,
        "model": model_bytes,
        "tensorboard": tensorboard_files(state["history"]),
        "replica_weight_hashes": hashes,
    }


def _metrics(keras, prefix: str) -> dict:
    return {
        "loss": keras.metrics.Mean(name=f"{prefix}_loss"),
        "accuracy": keras.metrics.BinaryAccuracy(name=f"{prefix}_accuracy"),
        "precision": keras.metrics.Precision(name=f"{prefix}_precision"),
        "recall": keras.metrics.Recall(name=f"{prefix}_recall"),
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


def _replica_weight_hashes(model, strategy) -> list[int]:
    """Every rank's weight hash, gathered on every rank: equal when the replicas are in sync."""
    import tensorflow as tf

    digest = hashlib.sha256()
    for weight in model.get_weights():
        digest.update(np.ascontiguousarray(weight).tobytes())
    mine = tf.constant([int.from_bytes(digest.digest()[:7], "little")], tf.int64)
    gathered = strategy.gather(strategy.run(lambda: tf.identity(mine)), axis=0)
    return [int(h) for h in gathered.numpy()]
