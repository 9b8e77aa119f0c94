"""Tensor- and expert-parallel inference over torch.distributed: one model split over N ranks (docs/parallel.md).

`plan.py` says which rows and columns of each weight a rank keeps; `layers.py` cuts a model into its shard's modules
and adds the all-reduces; `sampler.py` is the denoising step's sampler over vocabulary shards; `load.py` reads a
rank's shard from the safetensors files; `runner.py` holds the runners (rank 0's engine calls, every rank runs them);
`worker.py` starts, watches and stops the ranks; `comm.py` wraps the collectives.
"""

from dgemma.parallel.plan import ShardError
from dgemma.parallel.worker import Group, WorkerFailure, launch

__all__ = ["Group", "ShardError", "WorkerFailure", "launch"]
