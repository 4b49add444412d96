"""One process: what the trainer logs is what it backpropagated.

Runs `Trainer.train_step` once on a real DeepSpeed engine, recording each router weight's gradient as
backward produces it (summed over the step's micro-batches), and compares with the plain
JetMoEForCausalLM built with the same seed (the same weights) on the same global batch: the mean of its
objective over the micro-batches (its `.aux_loss` plus the LM loss on the loader's already-shifted
labels, which keep the window's last target), and that objective's gradient. Prints one JSON line.

    python tests/helpers/trainer_objective_check.py RUN_DIR [overrides...]
"""

import json
import sys

import torch

from jetmoe.model import JetMoEForCausalLM, causal_lm_loss
from trainer_setup import trainer_from_args


def main() -> None:
    trainer, cfg = trainer_from_args(sys.argv[1:])
    names = trainer.parts.global_names
    grads = {}
    for local, p in trainer.parts.module.named_parameters():
        if ".router." in names[local]:
            p.register_hook(lambda g, n=names[local]: grads.__setitem__(n, grads.get(n, 0) + g.detach().clone()))

    position = trainer.loader.state_dict()
    micro_batches = trainer.loader.next_step()
    trainer.loader.load_state_dict(position)  # train_step takes the same batch
    row = trainer.train_step()

    plain = JetMoEForCausalLM(trainer.model_config, seed=cfg.train.seed)
    outs = [plain(mb["input_ids"], position_ids=mb["position_ids"]) for mb in micro_batches]
    for o, mb in zip(outs, micro_batches):
        o.lm_loss = causal_lm_loss(o.logits, mb["labels"])
        o.loss = o.lm_loss + o.aux_loss
    loss = torch.stack([o.loss for o in outs]).mean()
    loss.backward(retain_graph=True)

    def worst() -> float:
        return max(float((grads[n] - p.grad).abs().max() / p.grad.abs().max()) for n, p in plain.named_parameters()
                   if n in grads)

    with_aux = worst()
    plain.zero_grad()
    torch.stack([o.lm_loss for o in outs]).mean().backward()  # the LM loss alone: a check that can fail
    lm_only = worst()
    mean = lambda key: float(torch.stack([getattr(o, key).detach() for o in outs]).mean())  # noqa: E731
    print(json.dumps({
        "logged": {k: row[k] for k in ("loss", "lm_loss", "aux_loss", "balance_loss", "z_loss")},
        "plain": {k: mean(k) for k in ("loss", "lm_loss", "aux_loss", "balance_loss", "z_loss")},
        "router_params": len(grads), "router_grad_rel_diff": with_aux, "router_grad_rel_diff_lm_only": lm_only,
    }))
    trainer.close()


if __name__ == "__main__":
    main()
