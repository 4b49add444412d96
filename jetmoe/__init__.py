"""JetMoE pretraining: the model, its parallel layouts, data and the training loop."""

from jetmoe.errors import JetMoEError

__all__ = ["JetMoEConfig", "JetMoEForCausalLM", "JetMoEError"]


def __getattr__(name):
    # Lazy, so `import jetmoe` stays cheap for tools (plan.py) that need no torch model.
    if name in ("JetMoEConfig", "JetMoEForCausalLM"):
        from jetmoe import model

        return getattr(model, name)
    raise AttributeError(f"module 'jetmoe' has no attribute {name!r}")
