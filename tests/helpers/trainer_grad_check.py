"""One-process check: a 1-stage pipeline's gradients (LM loss through DeepSpeed's loss_fn, router losses
attached per block) equal those of JetMoEForCausalLM's `loss.backward()` with the same weights.

Prints one JSON line: the largest relative gradient difference, and the same for a run without the
router-loss gradient (which must be clearly non-zero, so the comparison can fail).
"""

import json
import os
import socket

import torch

from jetmoe.model import JetMoEConfig, JetMoEForCausalLM, shift_labels
from jetmoe.parallel.activation_checkpoint import apply_activation_checkpointing
from jetmoe.parallel.pipeline import BlockStage, build_pipeline
from jetmoe.parallel.topology import deepspeed_topology, make_layout
from jetmoe.training.router_stats import RouterTracker


def main() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    import deepspeed

    deepspeed.init_distributed(dist_backend="gloo")
    config = JetMoEConfig.preset("jetmoe_tiny", hidden_size=32, num_key_value_heads=2, kv_channels=16,
                                 intermediate_size=64, num_hidden_layers=3, vocab_size=256)
    layout = make_layout(1, 0, 1, 1, config.num_hidden_layers, config.num_local_experts)
    tracker = RouterTracker(config.num_hidden_layers, config.num_local_experts)
    stage = build_pipeline(config, layout, deepspeed_topology(layout), "uniform", 7, on_router_loss=tracker.record)
    ref = JetMoEForCausalLM(config)
    params = dict(stage.named_parameters())
    state = {stage.global_names[n]: p.detach() for n, p in params.items()}
    missing, unexpected = ref.load_state_dict(state, strict=False)
    assert set(missing) <= {"lm_head.weight"} and not unexpected, (missing, unexpected)  # lm_head is tied

    ids = torch.randint(0, config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    pos = torch.arange(24).expand(2, 24)
    stage.train()
    lm = stage.loss_fn(stage((ids, pos)), shift_labels(ids))  # what DeepSpeed's last stage runs
    lm.backward()
    stats = tracker.reduce()
    out = ref(ids, labels=ids)
    out.loss.backward()
    ref_grads = {n: p.grad for n, p in ref.named_parameters()}

    def worst(grads):
        return max(float((grads[stage.global_names[n]] - p.grad).abs().max() / p.grad.abs().max().clamp(min=1e-30))
                   for n, p in params.items())

    with_aux = worst(ref_grads)

    # Activation checkpointing: the same gradients, and each block really starts twice (forward + recompute;
    # torch may stop a recompute early, so count entries, not completions).
    grads_before = {n: p.grad.clone() for n, p in params.items()}
    stage.zero_grad()
    blocks = [m.block for m in stage.modules() if isinstance(m, BlockStage)]
    apply_activation_checkpointing(blocks)
    calls = []
    # the block's first layer runs once in forward and once more in the recompute
    hooks = [b.input_layernorm.register_forward_pre_hook(lambda *_: calls.append(1)) for b in blocks]
    stage.loss_fn(stage((ids, pos)), shift_labels(ids)).backward()
    for h in hooks:
        h.remove()
    checkpoint_diff = max(float((p.grad - grads_before[n]).abs().max()) for n, p in params.items())
    ref.zero_grad()
    ref(ids, labels=ids).lm_loss.backward()  # the LM loss alone: router weights get other gradients
    without_aux = worst({n: p.grad for n, p in ref.named_parameters()})
    print(json.dumps({
        "lm_loss": [lm.item(), out.lm_loss.item()],
        "balance_loss": [stats.balance_loss, float(out.balance_loss)],
        "z_loss": [stats.z_loss, float(out.z_loss)],
        "grad_rel_diff": with_aux, "checkpoint_grad_diff": checkpoint_diff,
        "block_calls_per_block": len(calls) / len(blocks), "grad_rel_diff_without_aux": without_aux,
        "names": sorted(stage.global_names.values()) == sorted(dict(ref.named_parameters())),
    }))


if __name__ == "__main__":
    main()
