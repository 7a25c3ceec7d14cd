"""Training over a Ray cluster: generator actors for search and sampling, a learner in the driver or
spread over GPUs with torch FSDP, versioned weights through the object store, bounded staleness.
The loop itself is `train.train`'s (`distributed=DistributedSettings(...)`).

- `ledger.py`: where every training problem is (pure bookkeeping: dispatch throttle, staleness,
  requeues, the identities that say no problem is lost);
- `ray_loop.py`: the generator actors, their pool, and the loop's `RayCollector`;
- `fsdp.py`: the learner as L FSDP processes (Ray actors holding one GPU each).
"""

from treedistill.distributed.ledger import Finished, Ledger, Task
from treedistill.distributed.ray_loop import (
    ClusterError,
    DistributedSettings,
    Generator,
    RayCollector,
    load_weights,
    start_cluster,
)

__all__ = ["ClusterError", "DistributedSettings", "Finished", "Generator", "Ledger", "RayCollector", "Task",
           "load_weights", "start_cluster"]
