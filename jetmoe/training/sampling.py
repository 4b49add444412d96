"""Text samples while training: greedy and temperature continuations of a few fixed prompts, every
`train.sample_every` steps, run through the pipeline's own stages (any pp, dp, ep).

Every rank takes part (the stages hand activations on, expert-parallel ranks exchange tokens). Each new
token is one forward of a fixed window, prompts right-padded (causal attention: the padding never reaches
the positions read), so the stages agree on one activation shape per sampling; no KV cache at this size.
The last stage of data-parallel replica 0 picks the tokens and broadcasts them to every rank, so all
replicas feed the same ids and global rank 0 can decode them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.nn import functional as F

from jetmoe.errors import JetMoEError
from jetmoe.parallel.deepspeed_internals import pipeline_outputs

KINDS = ("greedy", "temperature")


@dataclass
class SampleSettings:
    every: int  # optimizer steps between samplings; 0 = off
    prompts: tuple[str, ...]
    tokens: int  # new tokens per continuation
    temperature: float
    seed: int

    @classmethod
    def from_train(cls, t) -> "SampleSettings":
        """From the `train` section (checked there)."""
        return cls(every=int(t.sample_every), prompts=tuple(str(p) for p in t.sample_prompts),
                   tokens=int(t.sample_tokens), temperature=float(t.sample_temperature), seed=int(t.seed))

    def due(self, step: int, max_steps: int) -> bool:
        return bool(self.every) and (step % self.every == 0 or step == max_steps)


def prompt_window(prompts: list[list[int]], new_tokens: int, max_positions: int, pad_id: int):
    """(ids [rows, L], lengths [rows]): each prompt right-padded into one window with room for `new_tokens`;
    prompts longer than the model allows keep their last tokens."""
    keep = max_positions - new_tokens
    if keep < 2:
        raise JetMoEError(f"train.sample_tokens={new_tokens} leaves no room for a prompt in "
                          f"{max_positions} positions; lower train.sample_tokens")
    prompts = [p[-keep:] for p in prompts]
    width = max(len(p) for p in prompts) + new_tokens
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, :len(p)] = torch.tensor(p, dtype=torch.long)
    return ids, torch.tensor([len(p) for p in prompts], dtype=torch.long)


def pick_tokens(last_logits: torch.Tensor, greedy_rows: int, temperature: float,
                generator: torch.Generator) -> torch.Tensor:
    """Next token per row: argmax for the first `greedy_rows`, a draw at `temperature` for the rest."""
    last_logits = last_logits.float().cpu()
    greedy = last_logits[:greedy_rows].argmax(-1)
    probs = torch.softmax(last_logits[greedy_rows:] / temperature, dim=-1)
    drawn = torch.multinomial(probs, 1, generator=generator).squeeze(-1) if len(probs) else greedy[:0]
    return torch.cat([greedy, drawn])


class Sampler:
    """Call `sample(step)` on every rank when `settings.due(step)`; rank 0 gets the records."""

    def __init__(self, settings: SampleSettings, engine, tokenizer, layout, max_positions: int, device):
        self.settings = settings
        self.engine = engine
        self.tokenizer = tokenizer
        self.layout = layout
        self.max_positions = max_positions
        self.device = device
        self.source = (layout.pp - 1) * layout.dp  # global rank of replica 0's last stage

    @torch.no_grad()
    def sample(self, step: int) -> list[dict] | None:
        s, tok = self.settings, self.tokenizer
        prompts = [[tok.eos_token_id] + tok.encode(p) for p in s.prompts]  # EOS separates documents in training
        rows = prompts * len(KINDS)
        ids, lengths = prompt_window(rows, s.tokens, self.max_positions, tok.eos_token_id)
        start = lengths.clone()
        positions = torch.arange(ids.shape[1]).expand_as(ids).contiguous()
        generator = torch.Generator().manual_seed(s.seed * 1_000_003 + step)
        everyone = torch.arange(len(rows))
        for _ in range(s.tokens):
            outputs = pipeline_outputs(self.engine, (ids.to(self.device), positions.to(self.device)),
                                       ids.to(self.device))
            if self.layout.rank == self.source:
                hidden, head_weight = outputs  # the last stage's (final hidden states, head matrix)
                last = hidden[everyone.to(hidden.device), (lengths - 1).to(hidden.device)]
                chosen = pick_tokens(F.linear(last, head_weight).float(), len(prompts), s.temperature, generator)
            else:
                chosen = torch.zeros(len(rows), dtype=torch.long)
            if dist.is_initialized() and dist.get_world_size() > 1:
                dist.broadcast(chosen, src=self.source)  # CPU tensor: gloo (the CUDA group is cpu:gloo,cuda:nccl)
            ids[everyone, lengths] = chosen
            lengths += 1
        if self.layout.rank != 0:
            return None
        records = []
        for row in range(len(rows)):
            new = ids[row, start[row]:lengths[row]].tolist()
            if tok.eos_token_id in new:
                new = new[:new.index(tok.eos_token_id)]
            records.append({"step": step, "prompt": s.prompts[row % len(prompts)],
                            "kind": KINDS[row // len(prompts)], "text": tok.decode(new)})
        return records


def format_samples(records: list[dict]) -> str:
    lines = [f"samples at step {records[0]['step']}:"]
    lines += [f"  [{r['kind']}] {r['prompt']!r} -> {r['text']!r}" for r in records]
    return "\n".join(lines)
