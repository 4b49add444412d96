"""DeepSpeed PipelineEngine + ZeRO-1 with ep=2 inside dp=2 and dp=4 trains exactly like one process
with the same global batch; reducing expert gradients over the dense dp group instead is caught."""

import pytest
import torch

from helpers.expert_engine import run
from helpers.expert_spawn import spawn

pytestmark = pytest.mark.slow  # every test here starts processes

STEPS = 3
LR = 3e-3  # helpers/expert_engine.py
# Where a gradient is close to zero, Adam's update g / (sqrt(v) + eps) magnifies round-off in g: the same
# update order of a different reduction can move such a weight by ~1e-3 of an lr step. Allow that much.
PARAM_ATOL = 1e-3 * LR * STEPS


def _train(tmp_path, world, ep, wiring="expert"):
    out = tmp_path / f"w{world}_ep{ep}_{wiring}.pt"
    spawn(run, world, ep, STEPS, wiring, str(out))
    return torch.load(out)


def _max_rel_diff(a, b):
    if isinstance(b, torch.Tensor):
        return ((a - b).abs().max() / b.abs().max()).item()
    return max(_max_rel_diff(a[k], b[k]) for k in b)


def test_expert_parallel_zero1_matches_one_process_and_wrong_group_fails(tmp_path):
    reference = _train(tmp_path, 1, 1)
    ep = _train(tmp_path, 2, 2)
    assert ep["has_moe"] and not reference["has_moe"]
    # columns: loss, balance, z per step
    torch.testing.assert_close(ep["losses"], reference["losses"], rtol=1e-4, atol=0)
    torch.testing.assert_close(ep["params"], reference["params"], rtol=1e-4, atol=PARAM_ATOL)
    # dp=4, ep=2: each expert-data group has two ranks, so ZeRO-1 both partitions the expert
    # optimizer state and reduces expert gradients over it.
    ep = _train(tmp_path, 4, 2)
    torch.testing.assert_close(ep["losses"], reference["losses"], rtol=1e-4, atol=0)
    torch.testing.assert_close(ep["params"], reference["params"], rtol=1e-4, atol=PARAM_ATOL)

    # Expert slices treated as dense parameters (reduced and broadcast over the whole dp group):
    # rank 1's experts 2,3 get mixed with rank 0's experts 0,1. The parity check must see it.
    wrong = _train(tmp_path, 2, 2, wiring="dense")
    assert not wrong["has_moe"]
    assert _max_rel_diff(wrong["losses"], reference["losses"]) > 1e-3
    assert _max_rel_diff(wrong["params"], reference["params"]) > 1e-2
