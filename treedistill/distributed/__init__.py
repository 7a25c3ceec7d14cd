"""Training over a Ray cluster: generator actors for search and sampling, a learner in the driver or
spread over GPUs with torch FSDP, versioned weights through the object store, bounded staleness.

- `ledger.py`: where every training problem is (pure bookkeeping: dispatch throttle, staleness,
  requeues, the identities that say no problem is lost);
- `ray_loop.py`: the generator actors, the driver's loop (`train_distributed`), the driver learner;
- `fsdp.py`: the learner as L FSDP processes (Ray actors holding one GPU each).
"""

from treedistill.distributed.ledger import Finished, Ledger, Task
from treedistill.distributed.ray_loop import (
    ClusterError,
    DistributedSettings,
    Generator,
    LocalLearner,
    load_weights,
    train_distributed,
)

__all__ = ["ClusterError", "DistributedSettings", "Finished", "Generator", "Ledger", "LocalLearner", "Task",
           "load_weights", "train_distributed"]
