"""A minimal DeepSpeed PipelineEngine run (ZeRO-1, one stage) of a tiny JetMoE with expert
parallelism, used by the expert-parallel engine tests to compare layouts against one process."""

import torch
import torch.distributed as dist
from torch import nn

from jetmoe.model import JetMoEConfig, JetMoEForCausalLM, causal_lm_loss, sum_router_losses
from jetmoe.parallel.expert import (apply_expert_parallel, create_expert_groups, expert_parallel_engine,
                                    moe_param_groups)

SEQ, VOCAB, GLOBAL_BATCH, MICRO_BATCH = 8, 64, 4, 1


def tiny_config():
    return JetMoEConfig.preset("jetmoe_tiny", vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2,
                               num_key_value_heads=2, kv_channels=8, intermediate_size=32, num_local_experts=4,
                               num_experts_per_tok=2, max_position_embeddings=64)


class WholeModel(nn.Module):
    """The model as one pipeline layer: ids -> (logits, aux); records router losses per micro-batch."""

    def __init__(self, model):
        super().__init__()
        self.model = model
        self.records = []

    def forward(self, input_ids):
        hidden, router_losses = self.model.model(input_ids)
        logits = self.model.lm_head(hidden)
        balance, z = sum_router_losses(router_losses.values())
        cfg = self.model.config
        self.records.append(torch.stack([balance.detach(), z.detach()]))
        return logits, cfg.aux_loss_coef * balance + cfg.z_loss_coef * z


def _loss(outputs, labels):
    logits, aux = outputs
    return causal_lm_loss(logits, labels) + aux


def step_batch(step):
    g = torch.Generator().manual_seed(1000 + step)
    ids = torch.randint(0, VOCAB, (GLOBAL_BATCH, SEQ + 1), generator=g)
    return ids[:, :-1], ids[:, 1:]


def run(rank, world, ep, steps, wiring, out_path):
    """Train `steps` steps on `world` ranks (dp = world, one stage); rank 0 saves losses and full params.

    wiring: "expert" (correct); "dense" (the bug to catch: expert slices left unmarked, so the engine
    broadcasts and reduces them over the whole dp group like dense parameters); "no_engine_hook"
    (marked, but deepspeed.initialize not wrapped in expert_parallel_engine: ZeRO-1 then fails loudly).
    """
    import deepspeed
    from deepspeed.pipe import PipelineModule

    deepspeed.init_distributed(dist_backend="gloo")
    dp = world
    torch.manual_seed(0)
    whole = WholeModel(JetMoEForCausalLM(tiny_config()))
    module = PipelineModule(layers=[whole], loss_fn=_loss, num_stages=1)
    ep_group = None
    if ep > 1:
        ep_group, ep_rank = create_expert_groups(ep, pp_size=1)
        apply_expert_parallel(module, ep_group, ep_rank, ep)
        if wiring == "dense":
            for p in module.parameters():
                if hasattr(p, "group_name"):
                    del p.allreduce, p.group_name
    gas = GLOBAL_BATCH // (MICRO_BATCH * dp)
    config = {"train_batch_size": GLOBAL_BATCH, "train_micro_batch_size_per_gpu": MICRO_BATCH,
              "gradient_accumulation_steps": gas, "zero_optimization": {"stage": 1},
              "gradient_clipping": 1.0, "steps_per_print": 10**9, "zero_allow_untested_optimizer": True}
    groups = moe_param_groups([{"params": list(module.parameters()), "name": "params"}])
    optimizer = torch.optim.AdamW(groups, lr=3e-3, weight_decay=0.1)
    if wiring == "no_engine_hook":
        engine, *_ = deepspeed.initialize(model=module, optimizer=optimizer, config=config)
    else:
        with expert_parallel_engine(module):
            engine, *_ = deepspeed.initialize(model=module, optimizer=optimizer, config=config)

    losses = []
    for step in range(steps):
        ids, labels = step_batch(step)
        lo = rank * gas * MICRO_BATCH
        micro = [(ids[i:i + MICRO_BATCH], labels[i:i + MICRO_BATCH])
                 for i in range(lo, lo + gas * MICRO_BATCH, MICRO_BATCH)]
        whole.records.clear()
        loss = engine.train_batch(iter(micro))
        router = torch.stack(whole.records).mean(0)
        dist.all_reduce(router)
        losses.append(torch.cat([loss.detach().reshape(1), router / dp]))

    params = {}
    for name, p in whole.named_parameters():
        t = p.detach().clone()
        if ep > 1 and t.shape[0] == 4 // ep and name.endswith("_linear.weight"):
            parts = [torch.empty_like(t) for _ in range(ep)]
            dist.all_gather(parts, t, group=ep_group)
            t = torch.cat(parts)
        params[name] = t
    if rank == 0:
        torch.save({"losses": torch.stack(losses), "params": params, "has_moe": engine.has_moe_layers}, out_path)
