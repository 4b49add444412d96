"""A tiny JetMoE with a plain AdamW + LambdaLR + counting loader, for single-process checkpoint tests."""

from __future__ import annotations

import torch

from jetmoe.model import JetMoEConfig, JetMoEForCausalLM


def tiny_config(**overrides) -> JetMoEConfig:
    base = dict(num_hidden_layers=2, hidden_size=32, kv_channels=8, num_key_value_heads=2,
                intermediate_size=64, vocab_size=97, max_position_embeddings=64)
    return JetMoEConfig.preset("jetmoe_tiny", **{**base, **overrides})


class CountingLoader:
    """Batch of step s is a function of (seed, s) alone; its state is the number of steps consumed."""

    def __init__(self, vocab: int, seed: int = 0, batch: int = 2, seq: int = 16):
        self.vocab, self.seed, self.batch, self.seq, self.consumed = vocab, seed, batch, seq, 0

    def next(self) -> torch.Tensor:
        g = torch.Generator().manual_seed(self.seed * 100_003 + self.consumed)
        self.consumed += 1
        return torch.randint(0, self.vocab, (self.batch, self.seq), generator=g)

    def state_dict(self) -> dict:
        return {"consumed": self.consumed, "seed": self.seed}

    def load_state_dict(self, sd: dict) -> None:
        self.consumed, self.seed = sd["consumed"], sd["seed"]


def make_run(config: JetMoEConfig, seed: int = 0, max_steps: int = 8):
    torch.manual_seed(seed)
    model = JetMoEForCausalLM(config)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 3) * (1 - s / (2 * max_steps)))
    return model, opt, sched, CountingLoader(config.vocab_size, seed)


def train_steps(model, opt, sched, loader, n: int) -> list[float]:
    losses = []
    for _ in range(n):
        ids = loader.next()
        out = model(ids, labels=ids)
        out.loss.backward()
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(out.loss.item())
    return losses
