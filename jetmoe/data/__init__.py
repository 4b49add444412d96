"""Data: text sources -> tokenizer -> packed windows -> layout-independent global batches -> per-rank loaders."""

from jetmoe.data.build import Data, build_data, prepare_tokens
from jetmoe.data.config import DataConfig
from jetmoe.data.loader import EvalLoader, RankLoader
from jetmoe.data.packing import PackedDataset
from jetmoe.data.sampler import GlobalBatchSampler
from jetmoe.data.tokenizer import TextTokenizer

__all__ = ["Data", "DataConfig", "EvalLoader", "GlobalBatchSampler", "PackedDataset", "RankLoader",
           "TextTokenizer", "build_data", "prepare_tokens"]
