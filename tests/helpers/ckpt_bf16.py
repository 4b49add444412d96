"""Checkpoint probe for bf16 runs (under torchrun):

    ckpt_bf16.py save RUN_DIR [overrides...]    two steps, then an asynchronous save of step 2 whose blocking
                                                part is profiled; prints 'rank R: collectives while blocking:
                                                [...]' (the c10d ops the profiler saw), then commits
    ckpt_bf16.py resave RUN_DIR [overrides...]  resume (checkpoint.resume=...) and save that step again,
                                                synchronously, in this layout
"""

import sys

from torch.profiler import ProfilerActivity, profile

from jetmoe.parallel.process_group import close_process_group

from trainer_setup import trainer_from_args  # this folder is on the path of a script run from it


def collectives_during(fn) -> list[str]:
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    return sorted(e.name for e in prof.events() if e.name.startswith("c10d::"))


def main() -> None:
    mode, argv = sys.argv[1], sys.argv[2:]
    trainer, _ = trainer_from_args(argv)
    try:
        if mode == "save":
            trainer.train_step()
            trainer.train_step()
            seen = collectives_during(lambda: trainer.checkpoint.save(trainer.state.step, background=True))
            print(f"rank {trainer.rank}: collectives while blocking: {seen}", flush=True)
            trainer.checkpoint.commit_pending()
        else:
            trainer.checkpoint.resume()
            trainer.checkpoint.save(trainer.state.step)
    finally:
        trainer.close()
    close_process_group()


if __name__ == "__main__":
    main()
