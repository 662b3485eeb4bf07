"""FSDP2 for the DiT stages: each ``TransformerBlock`` and the root sharded with ``fully_shard``.

``run.parallel: fsdp`` (or a launch with ``configs/accelerate/fsdp_wan1.3b.yaml``, whose
``distributed_type: FSDP`` accelerate reports on GPUs) makes :func:`shard_transformer` split a trained
transformer's parameters over the processes (``torch.distributed.fsdp.fully_shard``: DTensors sharded on
dim 0, all-gathered block by block for each forward and backward, gradients reduce-scattered and
averaged). The same code runs on CPUs (gloo) and GPUs (NCCL), so the CPU tests cover it. With bf16 on a
GPU the shards' compute copies are bf16 and gradients are reduced in fp32 (``MixedPrecisionPolicy``).

What stays whole on every rank: the EMA copy (updated from all-gathered parameters; sampling and the
evaluation run on rank 0 only), the frozen teacher, the VAE stage (which refuses FSDP) and small heads.
Checkpoints are unchanged: ``trainer.common.runtime.fp32_state`` (through :func:`full`) and
:func:`full_optimizer_state` all-gather the shards into
the same full, index-keyed state a DDP run writes, and loading shards a full state again (DDP <-> FSDP and
any number of processes resume each other's checkpoints). Those two calls are collective: every rank
must make them, in the same order.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import nn

from streamgen.model.transformer import TextContext
from streamgen.model.weights import laid_out_like


def is_dtensor(t: Any) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


def is_sharded(module: nn.Module) -> bool:
    return any(is_dtensor(p) for p in module.parameters())


def shard_transformer(model: nn.Module, world_size: int, device: torch.device, bf16: bool) -> nn.Module:
    """``fully_shard`` each of ``model.blocks`` and then ``model`` (in place, before its optimizer is built).

    Methods called outside ``forward`` that read sharded weights are registered so they gather them too:
    the root's ``encode_text`` (its text embedder) and each block's ``text_kv`` (its cross-attention K/V).
    """
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method

    _text_context_is_a_pytree()
    mesh = init_device_mesh(device.type, (world_size,))
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16 else \
        MixedPrecisionPolicy()
    # FSDP's default resharding: each block frees its gathered weights after its forward; the root (embedders
    # and head, ~2 % of the weights) keeps them until its backward, which a loss on an inner block's features
    # (the GAN head's) needs: that backward reaches the patch embedding without passing the root's output.
    for block in model.blocks:  # type: ignore[union-attr]
        fully_shard(block, mesh=mesh, mp_policy=policy)
        register_fsdp_forward_method(block, "text_kv")  # encode_text calls it outside the block's forward
    fully_shard(model, mesh=mesh, mp_policy=policy)
    register_fsdp_forward_method(model, "encode_text")
    return model


def _text_context_is_a_pytree() -> None:
    """FSDP finds the tensors of a sharded module's outputs and inputs by flattening them as pytrees; the
    text context (``encode_text``'s output, every forward's input) must flatten too, or the root's backward
    through the text embedder would find its weights resharded (freed) by an earlier hook."""
    from torch.utils import _pytree

    if TextContext not in _pytree.SUPPORTED_NODES:
        torch.export.register_dataclass(TextContext)


def set_requires_grad(module: nn.Module, flag: bool) -> None:
    """``module.requires_grad_(flag)`` that also holds for a sharded module: its FSDP units are resharded
    first, so the flag lands on the sharded parameters (FSDP copies it to the gathered ones at each
    gathering; set on gathered weights, e.g. the root's, kept after a forward, it would be lost)."""
    from torch.distributed.fsdp import FSDPModule

    for sub in module.modules():
        if isinstance(sub, FSDPModule):
            sub.reshard()
    module.requires_grad_(flag)


def full(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor: a DTensor's shards all-gathered (collective), any other tensor as it is."""
    return t.full_tensor() if is_dtensor(t) else t  # type: ignore[attr-defined]


def _params_in_order(optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    return [p for group in optimizer.param_groups for p in group["params"]]


def full_optimizer_state(optimizer: torch.optim.Optimizer, keep: bool = True) -> dict[str, Any]:
    """``optimizer.state_dict()`` with every sharded state tensor all-gathered (collective when sharded);
    ``keep=False`` joins the all-gathers and returns ``{}``."""
    state = optimizer.state_dict()
    if not any(is_dtensor(p) for p in _params_in_order(optimizer)):
        return state if keep else {}
    gathered = {i: {k: full(v).cpu() if keep else full(v) for k, v in s.items() if is_dtensor(v)}
                for i, s in state["state"].items()}
    if not keep:
        return {}
    return {**state, "state": {i: {**s, **gathered[i]} for i, s in state["state"].items()}}


def load_optimizer_state(optimizer: torch.optim.Optimizer, state: Mapping[str, Any]) -> None:
    """Load a full (index-keyed) optimizer state, sharding each per-element state tensor of a sharded
    parameter (AdamW's moments: a tensor of the parameter's shape; its 0-d ``step`` stays whole)."""
    params = _params_in_order(optimizer)
    if any(is_dtensor(p) for p in params):
        per_param = {}
        for i, s in state["state"].items():
            p = params[int(i)]
            per_param[i] = {k: laid_out_like(v, p) if isinstance(v, torch.Tensor) and v.dim() > 0
                            and v.shape == p.shape else v for k, v in s.items()}
        state = {**state, "state": per_param}
    optimizer.load_state_dict(dict(state))


def clip_grad_norm(params: Iterable[torch.Tensor], max_norm: float) -> torch.Tensor:
    """``torch.nn.utils.clip_grad_norm_`` for a list that may mix sharded and whole parameters: the norm of
    the sharded gradients is reduced over ranks (their shards are disjoint), the whole ones' is local
    (already averaged over ranks). Returns the total norm as a 0-d tensor on the first gradient's device."""
    params = [p for p in params if p.grad is not None]
    sharded = [p.grad for p in params if is_dtensor(p.grad)]
    whole = [p.grad for p in params if not is_dtensor(p.grad)]
    if not sharded:
        return torch.nn.utils.clip_grad_norm_(params, max_norm)
    sq = full(torch.nn.utils.get_total_norm(sharded)).float() ** 2
    if whole:
        sq = sq + torch.nn.utils.get_total_norm(whole).float().to(sq.device) ** 2
    total = sq.sqrt()
    coef = max_norm / (float(total) + 1e-6)
    if math.isfinite(coef) and coef < 1:
        for g in sharded + whole:
            g.mul_(coef)
    return total
