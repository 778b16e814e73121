"""The per-worker tf.data input (train_worker.WorkerInput + Lockstep): shuffling, and two real Ray Train workers."""

import numpy as np

from happysad.train_worker import shuffled


def test_shuffle_buffer_keeps_every_row_and_depends_only_on_the_seed():
    rows = list(range(1000))
    once = list(shuffled(iter(rows), 256, np.random.default_rng(7)))
    assert sorted(once) == rows and once != rows
    assert list(shuffled(iter(rows), 256, np.random.default_rng(7))) == once
    assert list(shuffled(iter(rows), 256, np.random.default_rng(8))) != once
    assert sorted(shuffled(iter(rows[:10]), 256, np.random.default_rng(7))) == rows[:10]  # fewer rows than the buffer


def test_uneven_shards_take_equal_steps_and_stop_together(ray_session, tmp_path):
    """3 rows on one worker, 9 on the other, 2 per batch: both take 2 steps, each with a collective, and stop.

    Without the lockstep the long worker would wait forever in its third step's all-reduce
    (here: fail after the 60 s collective timeout).
    """
    import ray
    from ray.train import DataConfig, RunConfig, ScalingConfig
    from ray.train.v2.api.data_parallel_trainer import DataParallelTrainer

    from happysad.train_backend import StrategyConfig

    def rows(n: int):
        return ray.data.from_items(
            [{"image": np.full((256, 256, 3), i, np.uint8), "label": np.int8(i % 2), "weight": np.float32(1)} for i in range(n)]
        )

    def loop(config):
        import ray.train
        import tensorflow as tf

        from happysad.train_worker import Lockstep, WorkerInput

        options = tf.distribute.experimental.CommunicationOptions(timeout_seconds=60)
        strategy = tf.distribute.MultiWorkerMirroredStrategy(communication_options=options)
        shard = ray.train.get_dataset_shard(("short", "long")[ray.train.get_context().get_world_rank()])

        @tf.function
        def global_weight(batch):  # a collective in every step, like the gradient all-reduce
            return strategy.reduce("SUM", strategy.run(lambda b: tf.reduce_sum(b["weight"]), args=(batch,)), axis=None)

        sums = []
        batches = WorkerInput(shard, strategy, global_batch=4).epoch()
        steps = Lockstep(strategy).steps(batches, lambda b: sums.append(float(global_weight(b))))
        return {"steps": steps, "sums": sums}

    trainer = DataParallelTrainer(
        loop,
        backend_config=StrategyConfig(),  # each worker's TF_CONFIG, as in `happysad train`
        scaling_config=ScalingConfig(num_workers=2),
        run_config=RunConfig(name="uneven", storage_path=str(tmp_path)),
        datasets={"short": rows(3), "long": rows(9)},
        dataset_config=DataConfig(datasets_to_split=[]),  # every worker gets its dataset whole: deliberately uneven
    )
    # Step 1: 2 + 2 rows; step 2: the short worker's last row + 2. Then the short worker is out: both stop.
    assert trainer.fit().return_value == {"steps": 2, "sums": [4.0, 3.0]}
