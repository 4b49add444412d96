"""A model and batch small enough for multi-process trainer tests on two CPU cores."""

SMALL = [
    "model.hidden_size=32", "model.num_key_value_heads=2", "model.kv_channels=16", "model.intermediate_size=64",
    "model.num_hidden_layers=4", "data.seq_len=32", "train.global_batch_size=8", "train.micro_batch_size=2",
    "train.max_steps=3", "train.eval_every=3", "train.eval_batches=1", "logging=quiet", "optim.warmup_steps=1",
]
