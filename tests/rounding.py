"""How far two fp32 results of the same mathematics, computed in another order, may differ on any processor.

Another batch shape, packing, a KV cache, a checkpointed recomputation or another module's kernels sum the same
products in another order (and MKL, oneDNN and ATen pick their kernels by processor). A sum of n fp32 terms in
another order moves by about sqrt(n) * 6e-8 of the terms' magnitude; the tiny test models' sums run over at most a
few hundred terms through at most a few layers, so results move by a few 1e-6 of the tensor's scale. REL = 1e-5 of
the tensor's largest magnitude holds that on any processor, while a real fault (a token attending across packed
samples, a lost cache entry, a wrong mask or weight) moves results by 1e-3 or more of their scale.
"""

from __future__ import annotations

import torch

REL = 1e-5

# A greedy token compared across batching or caching is all or nothing, so its check takes the worst case instead:
# along the deepest path to a logit (tower, bridge, two LM layers over <= 256 positions, output layer) fewer than
# 2**12 terms are summed, and a sum of n terms is off by at most n*u of what it carries (u = 2**-24, fp32's unit
# roundoff). `tests/conftest.py`'s `Choices` asserts every compared choice leads by more than twice that.
FP32_U = 2.0**-24
LOGIT_EPS = 2**12 * FP32_U


def assert_same_math(
    got: torch.Tensor, want: torch.Tensor, rel: float = REL, msg: str = "", scale: float | None = None
) -> None:
    """`got` equals `want` elementwise up to `rel` of `scale`: by default `want`'s largest magnitude (see above).
    A result whose terms cancel (a key bias's gradient is zero, computed from nonzero terms) errs by the terms'
    magnitude, not its own: pass the scale of the terms (e.g. the largest gradient of the model)."""
    assert got.shape == want.shape, (msg, got.shape, want.shape)
    if scale is None:
        scale = want.detach().abs().max().item() if want.numel() else 0.0
    off = (got.detach() - want.detach()).abs().max().item() if want.numel() else 0.0
    assert off <= rel * scale, f"{msg}: off by {off:.3g}, more than {rel:g} of the scale {scale:.3g}"


# Training runs that differ only in where their sums are split (processes, strategy, micro-batches) differ by the
# rounding above, then by what the optimizer makes of it. What that can do, and what the checks below allow:
# - a loss is a mean over ~1e3 fp32 terms (relative error ~log2(n) * 6e-8, about 1e-6), computed with weights that
#   differ by the rounding of earlier updates: 1e-5; a gradient norm sums squares of gradients that rounding
#   perturbs in the same way, over fewer terms each: 1e-4;
# - an Adam update divides the gradient by its own running size, so rounding changes it materially only for the
#   few elements whose gradient is within rounding of zero (one element of 8,192 moved 3e-5 more after 3 steps at
#   lr 1e-2 here): the trained weights differ by far less than 1 % of how far training moved them (the norm over
#   the tensor; seen: at most 2.2e-5 of it).
# Broken on purpose once each (rank 1's gradient dropped, rank 1 skipping a micro-batch, DDP's all-reduce skipped,
# FSDP's shards gathered in the wrong order), every break failed: later losses off by 9e-5 to 2.5e-3 relative,
# gradient norms by 0.26 to 0.55, some tensor's weights by 34 % to 42,000 % of its update.
LOSS_REL, GRAD_REL, UPDATE_REL = 1e-5, 1e-4, 1e-2


def assert_same_updates(got: dict, want: dict, start: dict, rel: float = UPDATE_REL) -> None:
    """`got` and `want` hold the same tensors, each equal up to `rel` of how far training moved it from `start`
    (the norm over the tensor; see above); a tensor that never trained is bitwise equal."""
    assert got.keys() == want.keys()
    for k in want:
        if k not in start:
            assert torch.equal(got[k], want[k]), f"{k} never trained but differs"
            continue
        moved, off = (want[k] - start[k]).norm().item(), (got[k] - want[k]).norm().item()
        assert off <= rel * moved, f"{k}: the runs differ by {off:.3g}, training moved it by {moved:.3g}"


def assert_same_outputs(got: torch.Tensor, want: torch.Tensor, untrained: torch.Tensor, rel: float = UPDATE_REL):
    """Two trained models' outputs equal up to `rel` of how far training moved the output from `untrained`."""
    moved, off = (want - untrained).norm().item(), (got - want).norm().item()
    assert off <= rel * moved, f"outputs differ by {off:.3g}, training moved them by {moved:.3g}"
