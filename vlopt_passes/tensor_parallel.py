"""`tensor_parallel`: shard stage 4 across the ranks of a `torchrun` launch (torch.distributed).

Each decoder layer's q/k/v and gate/up projections are split by output rows (whole heads per rank),
o_proj and down_proj by input columns followed by an all-reduce — the Megatron layout, the same
plan transformers' `base_model_tp_plan` names for LLaMA. Embeddings, norms and lm_head stay whole
on every rank, so every rank computes the same logits and greedy tokens. The vision side runs on
every rank (it is deterministic, and small next to the decoder). Launch with
`torchrun --nproc-per-node N -m vlopt.cli apply RECIPE`; rank 0 writes reports and checkpoints, and
the checkpoint keeps the unsharded weights (the pass is re-applied on load under torchrun).
Composes with fast_decode in either order: the engine takes its head counts from the declared
`vlm.decoding.shards`, and the all-reduce is a functional collective, so it traces into the compiled step
(and, with NCCL, into its CUDA graph — not run yet: no multi-GPU machine has been lent)."""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field

from vlopt.errors import VloptError
from vlopt.hookspecs import hookimpl
from vlopt.passes import REAPPLIED, PassConfig, PassOutcome


class Config(PassConfig):
    type: Literal["tensor_parallel"] = "tensor_parallel"
    size: int = Field(2, ge=2)
    persistence: ClassVar[str] = REAPPLIED
    lossless: ClassVar[bool] = True      # same math; the all-reduce changes summation order only
    once: ClassVar[bool] = True

    def preflight(self, facts, plan) -> list[str]:
        problems = []
        if facts.world_size != self.size:
            launch = "without torchrun" if facts.world_size == 1 else f"under {facts.world_size} torchrun processes"
            problems.append(f"tensor_parallel.size {self.size} needs {self.size} processes, but vlopt runs {launch}: "
                            f"run `torchrun --nproc-per-node {self.size} -m vlopt.cli apply RECIPE`")
        kv = facts.num_kv_heads or facts.num_heads
        if (kv and kv % self.size) or (facts.intermediate_size and facts.intermediate_size % self.size):
            problems.append(f"tensor_parallel.size {self.size} must divide the {kv} key/value heads and the MLP "
                            f"width {facts.intermediate_size}")
        return problems


def apply(vlm, cfg: Config, ctx) -> PassOutcome:
    import torch
    import torch.distributed as dist

    from vlopt_passes._shards import RowParallelLinear, column_shard

    if not dist.is_available() or not dist.is_initialized():
        raise VloptError(f"tensor_parallel needs a torch.distributed launch: run vlopt under "
                         f"`torchrun --nproc-per-node {cfg.size}`")
    if dist.get_world_size() != cfg.size:
        raise VloptError(f"tensor_parallel.size is {cfg.size} but torchrun started {dist.get_world_size()} "
                         "processes; make them equal")
    tcfg = vlm.text_model.config
    kv_heads = tcfg.num_key_value_heads or tcfg.num_attention_heads
    if kv_heads % cfg.size or tcfg.intermediate_size % cfg.size:
        raise VloptError(f"tensor_parallel.size {cfg.size} must divide the {kv_heads} key/value heads and the "
                         f"MLP width {tcfg.intermediate_size}")
    for layer in vlm.text_model.layers:
        weight = getattr(layer.self_attn.q_proj, "weight", None)
        if weight is None or type(weight.data) is not torch.Tensor:
            raise VloptError("tensor_parallel shards plain weights; put it before int8/int4")
    rank = dist.get_rank()
    touched = []
    for i, layer in enumerate(vlm.text_model.layers):
        attn, mlp = layer.self_attn, layer.mlp
        for name in ("q_proj", "k_proj", "v_proj"):
            column_shard(getattr(attn, name), rank, cfg.size)
        for name in ("gate_proj", "up_proj"):
            column_shard(getattr(mlp, name), rank, cfg.size)
        attn.o_proj = RowParallelLinear(attn.o_proj, rank, cfg.size)
        mlp.down_proj = RowParallelLinear(mlp.down_proj, rank, cfg.size)
        # The attention reshapes with -1 heads, so it follows the local head count by itself.
        touched.append(f"{vlm.decoder_prefix}.layers.{i}")
    vlm.decoding.shards = cfg.size          # engines take their head counts from it
    return PassOutcome(touched=touched, skipped=[*vlm.vision_modules, "lm_head"],
                       notes=[f"decoder sharded over {cfg.size} ranks (rank {rank}); vision and lm_head replicated"],
                       info={"rank": rank, "world_size": cfg.size})


@hookimpl
def register_passes(register):
    register(Config, apply)
