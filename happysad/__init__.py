"""happysad: train the happy-vs-sad face CNN on Ray and score image collections to Parquet."""

import os

# TensorFlow turns its oneDNN kernels on by default only on CPUs with AVX-512-class features; on others (an AVX2
# AMD EPYC here) its convolutions run 2.5x slower without them (predict, 32 faces a batch: 71-75 against 183-185
# img/s). Set here, before any TensorFlow import in each process that runs happysad (the commands, the tests,
# Ray workers; console.join_ray forwards it to a joined cluster's workers). A value the user set wins.
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "1")
