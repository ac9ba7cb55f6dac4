"""Stage 3, training: specifications, the one training loop, checkpoints, the average of the weights, the
sync-free step and its CUDA graph, distributed data parallelism, and loading what a run trained.  Imports the
chain, evaluation, networks and data.
"""
