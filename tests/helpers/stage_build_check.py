"""One process: a pipeline stage built on its device in the run's dtype (meta, then allocated uninitialised)
holds exactly the weights of JetMoEForCausalLM(config, seed), rounded to that dtype. Uninitialised memory is
filled with NaN (torch's deterministic mode), so a parameter that the stage's init misses cannot pass.
Prints one JSON line per dtype: {dtype, devices, dtypes, mismatched}."""

import json
import os
import socket

import torch

from jetmoe.model import JetMoEConfig, JetMoEForCausalLM
from jetmoe.parallel.pipeline import build_pipeline
from jetmoe.parallel.topology import deepspeed_topology, make_layout


def main() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    import deepspeed

    deepspeed.init_distributed(dist_backend="gloo")
    torch.use_deterministic_algorithms(True)
    torch.utils.deterministic.fill_uninitialized_memory = True
    for tied in (True, False):
        config = JetMoEConfig.preset("jetmoe_tiny", hidden_size=32, num_key_value_heads=2, kv_channels=16,
                                     intermediate_size=64, num_hidden_layers=3, vocab_size=256,
                                     tie_word_embeddings=tied)
        reference = {n: p.detach() for n, p in JetMoEForCausalLM(config, seed=7).named_parameters()}
        layout = make_layout(1, 0, 1, 1, config.num_hidden_layers, config.num_local_experts)
        for dtype in (torch.float32, torch.bfloat16):
            stage = build_pipeline(config, layout, deepspeed_topology(layout), "uniform", 7, dtype=dtype)
            mismatched = [n for n, p in stage.named_parameters()
                          if not torch.equal(p.detach(), reference[stage.global_names[n]].to(dtype))]
            print(json.dumps({"tied": tied, "dtype": str(dtype), "mismatched": mismatched,
                              "parameters": len(list(stage.parameters())),
                              "devices": sorted({str(p.device) for p in stage.parameters()}),
                              "dtypes": sorted({str(p.dtype) for p in stage.parameters()})}), flush=True)


if __name__ == "__main__":
    main()
