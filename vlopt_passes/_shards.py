"""The Megatron layout of a Linear for `tensor_parallel`: output-row shards and input-column shards
whose partial products are summed across ranks."""

from __future__ import annotations

import torch


class RowParallelLinear(torch.nn.Module):
    """The input-column shard of a Linear; partial products are summed across ranks."""

    def __init__(self, linear: torch.nn.Linear, rank: int, size: int, group=None):
        super().__init__()
        cols = linear.in_features // size
        self.weight = torch.nn.Parameter(linear.weight.data[:, rank * cols:(rank + 1) * cols].contiguous(),
                                         requires_grad=False)
        self.bias = linear.bias          # added once, after the sum
        self.group = group

    def forward(self, x):
        # The functional all-reduce traces into fast_decode's compiled step (the in-place one breaks
        # the graph); outside a compile it runs eagerly like any collective.
        from torch.distributed import _functional_collectives as collectives
        import torch.distributed as dist

        out = collectives.all_reduce(torch.nn.functional.linear(x, self.weight), "sum",
                                     self.group or dist.group.WORLD)
        return out if self.bias is None else out + self.bias


def column_shard(linear: torch.nn.Linear, rank: int, size: int) -> None:
    rows = linear.out_features // size
    linear.weight = torch.nn.Parameter(linear.weight.data[rank * rows:(rank + 1) * rows].contiguous(),
                                       requires_grad=False)
    if linear.bias is not None:
        linear.bias = torch.nn.Parameter(linear.bias.data[rank * rows:(rank + 1) * rows].contiguous(),
                                         requires_grad=False)
    linear.out_features = rows
