"""Run by `test_lm_modes_distributed.py` on 2 torchrun ranks: one MoE layer whose router sends rank 0's tokens to
expert 2 and rank 1's to expert 1 (expert 0 gets none anywhere), under DDP without `find_unused_parameters` and
under FSDP2. Every expert must still get a gradient on every rank (an empty slice's zeros), or DDP stops at the
second step and FSDP's reduce-scatter would not match; the gradients must be one process's. Rank 0 prints `ok`."""

import torch
import torch.distributed as dist
from torch import nn

from mmbridge.models.moe import MoEFeedForward


def layer() -> MoEFeedForward:
    torch.manual_seed(0)
    moe = MoEFeedForward(nn.Sequential(nn.Linear(8, 16), nn.SiLU(), nn.Linear(16, 8)), 8, num_experts=3, top_k=1)
    with torch.no_grad():
        for expert in moe.experts:  # experts that differ
            for p in expert.parameters():
                p.add_(torch.randn_like(p) * 0.1)
        moe.router.weight.zero_()
        moe.router.weight[2, 0], moe.router.weight[1, 0] = 10.0, -10.0  # x[0] > 0: expert 2, x[0] < 0: expert 1
    return moe


def loss(model: nn.Module, x: torch.Tensor, scale: float) -> torch.Tensor:
    return (model(x) ** 2).sum() * scale


def main() -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(1)  # the same batch on every rank
    x = torch.randn(2, 8, 8)
    x[0, :, 0], x[1, :, 0] = x[0, :, 0].abs() + 0.1, -x[1, :, 0].abs() - 0.1  # rank r's slice: row r
    reference = layer()
    loss(reference, x, 1 / x.numel()).backward()
    want = {n: p.grad for n, p in reference.named_parameters()}
    assert want["experts.0.0.weight"].abs().sum() == 0 and want["experts.1.0.weight"].abs().sum() > 0

    ddp = nn.parallel.DistributedDataParallel(layer(), find_unused_parameters=False)
    for _ in range(2):  # an unused parameter makes DDP raise at the second step's forward
        ddp.zero_grad()
        loss(ddp, x[rank : rank + 1], world / x.numel()).backward()  # DDP averages: times the world size
    for n, p in ddp.module.named_parameters():
        torch.testing.assert_close(p.grad, want[n], rtol=1e-5, atol=1e-7, msg=f"DDP {n}")

    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    sharded = fully_shard(layer(), mesh=init_device_mesh("cpu", (world,)))  # one unit, as a decoder layer is
    for _ in range(2):
        sharded.zero_grad()
        loss(sharded, x[rank : rank + 1], world / x.numel()).backward()
    for n, p in sharded.named_parameters():
        assert p.grad is not None, f"FSDP {n}: no gradient"
        torch.testing.assert_close(p.grad.full_tensor(), want[n], rtol=1e-5, atol=1e-7, msg=f"FSDP {n}")
    dist.barrier()
    if rank == 0:
        print("ok")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
