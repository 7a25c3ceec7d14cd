"""The learner as L processes sharing every update with torch FSDP (fully_shard, FSDP2): Ray actors
holding one GPU each (NCCL), or one CPU each (gloo, which is how the tests run it).

Every rank runs the training loop's `learner.learn` on the whole step batch, with `Shard(rank, L)`:
the no-grad passes (values, reference log-probs) run on every row on every rank, so all ranks make the
same forward calls (FSDP's collectives need that), and of each minibatch's micro-batches rank r trains
those with index i % L == r. Micro-batch losses are normalised by the minibatch's token count, and the
gradient reduce-scatter SUMS over ranks (divide factor 1), so each update is the one-process update on
the same minibatch; the metrics of all ranks' micro-batches are gathered before they are combined.
The number of micro-batches per minibatch must therefore be a multiple of L.

Weights: rank 0 gathers the full state dict (CPU) and puts the trainable part in the Ray object
store itself, so the weights go from the learner to the generators without passing through the
driver. Checkpoints: rank 0 writes the one-process format (full model and value-head state dicts,
the optimizer state keyed by parameter index in the one-process order), so either loop resumes from
the other's checkpoints.

Departures and limits: each rank keeps a full frozen copy of the initial policy for the KL term (not
sharded); a learner rank that dies stops the run (resume from the last checkpoint); the GPU path
(NCCL) is written for CUDA clusters and has not run on one here, only the CPU path (gloo) is tested.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import socket

import ray
import torch
import torch.distributed as dist
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.fsdp import fully_shard

from treedistill import checkpoint
from treedistill.errors import UsageError
from treedistill.learner import Shard, learn, load_train_policy, reference_policy
from treedistill.methods import METHODS
from treedistill.metrics import ComputeCounters

__all__ = ["FSDPLearner", "LearnerRank"]

START_TIMEOUT_S = 600  # longest wait for the learner's GPUs (they may be held by other jobs)
FULL = StateDictOptions(full_state_dict=True, cpu_offload=True)


def _gather(parts: list[dict]) -> list[dict]:
    """Every rank's metric dicts, rank 0's first."""
    gathered: list = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, parts)
    return [part for rank_parts in gathered for part in rank_parts]


def _decoder_layers(model):
    lm = model.get_base_model() if hasattr(model, "get_base_model") else model
    return lm.model.layers


def optimizer_by_index(state: dict, names: list[str]) -> dict:
    """A name-keyed full optimizer state dict (torch.distributed.checkpoint's) -> torch's own
    index-keyed format, index i being names[i] (the order of the optimizer's parameters)."""
    index = {name: i for i, name in enumerate(names)}
    return {"state": {index[name]: value for name, value in state["state"].items()},
            "param_groups": [{**g, "params": [index[name] for name in g["params"]]} for g in state["param_groups"]]}


def optimizer_by_name(state: dict, names: list[str]) -> dict:
    """The inverse of `optimizer_by_index`."""
    return {"state": {names[i]: value for i, value in state["state"].items()},
            "param_groups": [{**g, "params": [names[i] for i in g["params"]]} for g in state["param_groups"]]}


class LearnerRank:
    """One FSDP learner process (a Ray actor). device: "cuda" (Ray gives the actor its GPU as cuda:0)
    or "cpu" (gloo)."""

    def __init__(self, cfg, rank: int, world: int, device: str):
        self.cfg = dataclasses.replace(cfg, device=device)
        self.rank, self.world = rank, world
        self.stack = contextlib.ExitStack()

    def address(self) -> tuple[str, int]:
        """Where the process group meets: this node's address and a free port on it (rank 0)."""
        with socket.socket() as s:
            s.bind(("", 0))
            port = s.getsockname()[1]
        return ray.util.get_node_ip_address(), port

    def setup(self, host: str, port: int, start_from: str | None) -> int:
        """Join the process group, load and shard the policy, build the optimizer, load the checkpoint
        to continue from; -> the number of parameters (policy + value head)."""
        cfg = self.cfg
        os.environ.update(MASTER_ADDR=host, MASTER_PORT=str(port))
        dist.init_process_group("nccl" if cfg.device.startswith("cuda") else "gloo", rank=self.rank,
                                world_size=self.world)
        torch.manual_seed(cfg.seed)
        self.policy = policy = load_train_policy(cfg)
        # frozen BEFORE sharding and checkpoint weights; only where the loss has a KL term
        self.reference = reference_policy(policy, self.stack) if cfg.kl_coef > 0 else None
        sharded = [*_decoder_layers(policy.model), policy.model]
        for module in sharded:
            fully_shard(module)
        head = policy.value_head
        if head is not None:
            fully_shard(head)
            sharded.append(head)
        for module in sharded:
            # sum the ranks' gradients (see the module docstring), with plain SUM collectives, which
            # gloo has too (the default average and a custom factor use ops only NCCL has)
            module.set_gradient_divide_factor(1.0)
            module.set_force_sum_reduction_for_comms(True)
        modules = {"model": policy.model, **({"value_head": head} if head is not None else {})}
        self.container = torch.nn.ModuleDict(modules)
        self.names = [f"model.{n}" for n, p in policy.model.named_parameters() if p.requires_grad]
        self.params = [p for p in policy.model.parameters() if p.requires_grad]
        if head is not None:
            self.names += [f"value_head.{n}" for n, _ in head.named_parameters()]
            self.params += list(head.parameters())
        self.optimizer = torch.optim.AdamW(self.params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        if start_from is not None:
            saved = checkpoint.load_checkpoint(start_from)
            set_model_state_dict(policy.model, saved["model"], options=StateDictOptions(full_state_dict=True))
            if head is not None:
                set_model_state_dict(head, saved["value_head"], options=StateDictOptions(full_state_dict=True))
            set_optimizer_state_dict(self.container, self.optimizer, optimizer_by_name(saved["optimizer"], self.names),
                                     options=StateDictOptions(full_state_dict=True))
        head_params = sum(p.numel() for p in head.parameters()) if head is not None else 0
        return sum(p.numel() for p in self.container.parameters()) - head_params, head_params

    def learn(self, trajectories: list, step: int, nonfinite_streak: int, progress: float | None = None) -> dict:
        """learner.learn on this rank's share; -> the compute spent here, and on rank 0 the LearnStep."""
        counters = ComputeCounters()
        learned = learn(trajectories, policy=self.policy, reference=self.reference,
                        advantages=METHODS[self.cfg.method].advantages, optimizer=self.optimizer, params=self.params,
                        counters=counters, cfg=self.cfg, step=step, nonfinite_streak=nonfinite_streak,
                        shard=Shard(self.rank, self.world, _gather), progress=progress)
        return {"compute": counters.state_dict(), **({"learned": learned} if self.rank == 0 else {})}

    def _full_states(self) -> tuple[dict, dict | None]:
        head = self.policy.value_head
        model = get_model_state_dict(self.policy.model, options=FULL)  # collective; full on rank 0 only
        return model, (get_model_state_dict(head, options=FULL) if head is not None else None)

    def publish(self) -> list | None:
        """Rank 0: [object ref of the trainable weights]; other ranks take part and return None."""
        model, head = self._full_states()
        if self.rank != 0:
            return None
        trainable = [n for n, p in self.policy.model.named_parameters() if p.requires_grad]
        return [ray.put({"model": {n: model[n] for n in trainable}, "value_head": head})]

    def save(self, run_dir: str, step: int, entries: dict, keep: int) -> None:
        """Rank 0 writes the checkpoint in the one-process format (every rank takes part)."""
        model, head = self._full_states()
        optimizer = get_optimizer_state_dict(self.container, self.optimizer, options=FULL)
        if self.rank == 0:
            checkpoint.save_checkpoint(run_dir, step, {
                "model": model, **({"value_head": head} if head is not None else {}),
                "optimizer": optimizer_by_index(optimizer, self.names), **entries}, keep=keep)
        dist.barrier()

    def state(self) -> dict | None:
        """Rank 0: full model, value head and optimizer states, as a checkpoint holds them (every rank
        takes part; the others return None)."""
        model, head = self._full_states()
        optimizer = get_optimizer_state_dict(self.container, self.optimizer, options=FULL)
        if self.rank != 0:
            return None
        return {"model": model, "value_head": head, "optimizer": optimizer_by_index(optimizer, self.names)}


class FSDPLearner:
    """The driver's handle on L `LearnerRank` actors; the same methods as `learner.Learner`."""

    def __init__(self, cfg, world: int, start_from=None, *, device: str = "cuda"):
        if (cfg.minibatch_rows // cfg.micro_batch_rows) % world:
            raise UsageError(f"--learner-gpus {world} needs a multiple of {world} micro-batches per minibatch "
                             f"(minibatch {cfg.minibatch_rows} rows, micro-batch {cfg.micro_batch_rows}): "
                             "set micro_batch_size")
        # all ranks on one node (NVLink between them, not the network), one GPU (or CPU) each
        bundle = {"CPU": 1, **({"GPU": 1} if device == "cuda" else {})}
        self.group = placement_group([bundle] * world, strategy="STRICT_PACK")
        ray.get(self.group.ready(), timeout=START_TIMEOUT_S)
        actor = ray.remote(LearnerRank)
        self.ranks = [actor.options(num_cpus=1, num_gpus=bundle.get("GPU", 0),
                                    scheduling_strategy=PlacementGroupSchedulingStrategy(
                                        placement_group=self.group, placement_group_bundle_index=rank))
                      .remote(cfg, rank, world, device) for rank in range(world)]
        host, port = ray.get(self.ranks[0].address.remote())
        start = None if start_from is None else str(start_from)
        self.num_params, self.head_params = ray.get([r.setup.remote(host, port, start) for r in self.ranks])[0]

    def learn(self, trajectories, *, advantages, step: int, nonfinite_streak: int, counters,
              progress: float | None = None):
        """`learner.Learner.learn` over the ranks (each rank looks the method's advantages up itself)
        -> rank 0's LearnStep; every rank's compute is counted into `counters`."""
        shared = ray.put(list(trajectories))
        outs = ray.get([r.learn.remote(shared, step, nonfinite_streak, progress) for r in self.ranks])
        for out in outs:
            c = out["compute"]
            counters.add_learning(train_tokens=c["learn_train_tokens"], inference_tokens=c["learn_inference_tokens"],
                                  forward_calls=c["learn_forward_calls"], head_train_tokens=c["learn_head_train_tokens"],
                                  head_inference_tokens=c["learn_head_inference_tokens"])
        return outs[0]["learned"]

    def publish(self):
        return ray.get([r.publish.remote() for r in self.ranks])[0][0]

    def save(self, run_dir, step: int, entries: dict, keep: int) -> None:
        ray.get([r.save.remote(str(run_dir), step, entries, keep) for r in self.ranks])

    def state(self) -> dict:
        return ray.get([r.state.remote() for r in self.ranks])[0]

    def close(self) -> None:
        for rank in self.ranks:
            ray.kill(rank, no_restart=True)
        remove_placement_group(self.group)
