"""A dispatch mode that records ops adding into a buffer at data-dependent rows (atomics on CUDA)."""

from torch.utils._python_dispatch import TorchDispatchMode

ACCUMULATING = {"index_add", "index_add_", "scatter_add", "scatter_add_", "index_reduce", "index_reduce_",
                "put_", "embedding_dense_backward"}


class AccumulatingOps(TorchDispatchMode):
    """Records ops that add into a buffer at data-dependent rows (atomics on CUDA)."""

    def __init__(self):
        super().__init__()
        self.seen = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func._schema.name.split("::")[-1]
        accumulate = name in ("index_put", "index_put_", "_index_put_impl_") and (
            kwargs.get("accumulate") or (len(args) > 3 and args[3]))
        if name in ACCUMULATING or accumulate:
            self.seen.append(name)
        return func(*args, **kwargs)
