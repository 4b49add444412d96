"""Data pipeline: builtin corpus + tokenizer, packing, layout-independent global batches, exact resume."""

import numpy as np
import pytest
import torch
from helpers.data_corpus import MAX_POS, TINY_VOCAB, builtin_data, packed

from jetmoe.data import DataConfig, GlobalBatchSampler, RankLoader, build_data
from jetmoe.data.builtin_corpus import iter_documents
from jetmoe.data.loader import position_ids
from jetmoe.data.sampler import EpochPermutation
from jetmoe.data.tokenizer import train_bpe
from jetmoe.errors import JetMoEError


def global_batch(loaders, step_lists=None):
    """Concatenate every rank's micro-batches in rank order: the global batch as one [G, T] tensor per key."""
    steps = step_lists or [ld.next_step() for ld in loaders]
    return {k: torch.cat([mb[k] for step in steps for mb in step]) for k in ("input_ids", "labels", "position_ids")}


# ---- builtin corpus and tokenizer ----------------------------------------------------------------------

def test_builtin_corpus_tokenizes_packs_and_caches(tmp_path_factory):
    data, cache = builtin_data(tmp_path_factory)
    assert data.tokenizer.vocab_size == TINY_VOCAB
    assert data.stats["num_documents"] > 500 and data.stats["num_tokens"] > 500_000
    assert len(data.train) > 20 * len(data.valid) > 0
    # every packed token comes from the text: the first window decodes to the corpus' opening
    first_doc = next(iter_documents())
    assert data.tokenizer.decode(data.train[0][:100]) == first_doc[: len(data.tokenizer.decode(data.train[0][:100]))]
    again = build_data(DataConfig(cache_dir=str(cache)), TINY_VOCAB, MAX_POS, seed=0)
    assert data.stats["built"] and not again.stats["built"]
    assert again.stats["cache"] == data.stats["cache"]
    np.testing.assert_array_equal(again.train.windows([0, 5, 7]), data.train.windows([0, 5, 7]))


def test_builtin_bpe_is_deterministic():
    docs = [d for _, d in zip(range(60), iter_documents())]
    a, b = train_bpe(docs, 400), train_bpe(docs, 400)
    assert a.to_str() == b.to_str()
    assert a.get_vocab_size() == 400


def test_labels_are_inputs_shifted_by_one(tmp_path_factory):
    data, _ = builtin_data(tmp_path_factory)
    (mb,) = data.train_loader(2, 2).next_step()
    assert mb["input_ids"].shape == mb["labels"].shape == mb["position_ids"].shape == (2, data.cfg.seq_len)
    assert mb["input_ids"].dtype == torch.long
    torch.testing.assert_close(mb["labels"][:, :-1], mb["input_ids"][:, 1:])
    # the last label is the first token of the next window in the stream (no padding, nothing lost)
    window_ids = data.train_loader(2, 2).rank_sample_ids()
    nxt = data.train.index(window_ids) + 1
    assert (mb["labels"][:, -1].numpy() == data.train.tokens[nxt * data.cfg.seq_len]).all()


def test_train_and_valid_windows_are_disjoint_and_cover_the_stream(tmp_path_factory):
    data, _ = builtin_data(tmp_path_factory)
    train_w = data.train.index(np.arange(len(data.train)))
    valid_w = data.valid.index(np.arange(len(data.valid)))
    assert not set(train_w) & set(valid_w)
    total = (data.stats["num_tokens"] - 1) // data.cfg.seq_len
    assert sorted(np.concatenate([train_w, valid_w])) == list(range(total))


# ---- sampler -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("n", [1, 2, 3, 7, 64, 1000, 4099])
def test_epoch_permutation_is_a_bijection(n):
    p = EpochPermutation(n, seed=3, epoch=1)(np.arange(n))
    assert sorted(p.tolist()) == list(range(n))


def test_global_batches_depend_on_seed_and_step_only():
    a, b, c = GlobalBatchSampler(1000, 32, 7), GlobalBatchSampler(1000, 32, 7), GlobalBatchSampler(1000, 32, 8)
    later_first = [b.indices(s) for s in (9, 3, 0)]
    np.testing.assert_array_equal(a.indices(0), later_first[2])
    np.testing.assert_array_equal(a.indices(3), later_first[1])
    np.testing.assert_array_equal(a.indices(9), later_first[0])
    assert not np.array_equal(a.indices(0), c.indices(0))
    assert not np.array_equal(a.indices(0), a.indices(1))


def test_epoch_rollover_visits_every_sample_once_per_epoch():
    n, g = 10, 4
    sampler = GlobalBatchSampler(n, g, seed=0)
    stream = np.concatenate([sampler.indices(s) for s in range(10)])  # 40 samples = 4 epochs
    epochs = stream.reshape(4, n)
    for e in epochs:
        assert sorted(e.tolist()) == list(range(n))
    assert len({tuple(e) for e in epochs}) > 1  # reshuffled each epoch
    # step 2 straddles epochs 0 and 1
    np.testing.assert_array_equal(sampler.indices(2), np.concatenate([epochs[0][8:], epochs[1][:2]]))
    loader_ds = packed(n)
    ld = RankLoader(loader_ds, g, 2, 0, 1, seed=0)
    for _ in range(3):
        ld.next_step()
    assert ld.epoch == 1 and ld.step == 3


# ---- loaders: layouts and resume -----------------------------------------------------------------------

def test_same_global_batches_for_any_dp_and_micro_batch(tmp_path_factory):
    data, _ = builtin_data(tmp_path_factory)
    G = 8
    ref_loader = data.train_loader(G, 8, 0, 1)
    reference = [global_batch([ref_loader]) for _ in range(4)]
    for dp in (1, 2, 4):
        for mb in (1, 2):
            loaders = [data.train_loader(G, mb, r, dp) for r in range(dp)]
            assert loaders[0].micro_steps == G // (mb * dp)
            for step in range(4):
                got = global_batch(loaders)
                for k in reference[step]:
                    torch.testing.assert_close(got[k], reference[step][k], msg=f"dp={dp} mb={mb} step={step} {k}")


def test_resume_is_exact_mid_epoch_even_with_a_new_layout():
    ds = packed(37)
    G = 6
    straight = RankLoader(ds, G, 3, 0, 1, seed=5)
    expected = [global_batch([straight]) for _ in range(12)]  # 72 samples: crosses the epoch boundary
    first = RankLoader(ds, G, 3, 0, 1, seed=5)
    for _ in range(4):
        first.next_step()
    state = first.state_dict()
    assert state["consumed_samples"] == 4 * G
    resumed = [RankLoader(ds, G, 1, r, 2, seed=5) for r in range(2)]  # resized: dp 1 -> 2, mb 3 -> 1
    for ld in resumed:
        ld.load_state_dict(dict(state))
    for step in range(4, 12):
        got = global_batch(resumed)
        torch.testing.assert_close(got["input_ids"], expected[step]["input_ids"])
    assert resumed[0].step == 12


def test_resume_refuses_a_different_seed_or_dataset():
    state = RankLoader(packed(20), 4, 2, 0, 1, seed=1).state_dict()
    with pytest.raises(JetMoEError, match="seed"):
        RankLoader(packed(20), 4, 2, 0, 1, seed=2).load_state_dict(state)
    with pytest.raises(JetMoEError, match="samples"):
        RankLoader(packed(21), 4, 2, 0, 1, seed=1).load_state_dict(state)


def test_batch_that_does_not_divide_is_a_clear_error():
    with pytest.raises(JetMoEError, match="not a multiple"):
        RankLoader(packed(20), 6, 4, 0, 1, seed=0)
    with pytest.raises(JetMoEError, match="not a multiple"):
        RankLoader(packed(20), 8, 2, 0, 3, seed=0)


def test_eval_loader_is_fixed_and_layout_independent(tmp_path_factory):
    data, _ = builtin_data(tmp_path_factory)
    one = list(data.eval_loader(8, 4, 0, 1, max_steps=3))
    assert len(one) == 3
    again = list(data.eval_loader(8, 4, 0, 1, max_steps=3))
    two = [data.eval_loader(8, 2, r, 2, max_steps=3) for r in range(2)]
    per_rank = [list(e) for e in two]
    for s in range(3):
        ref = global_batch(None, [one[s]])
        torch.testing.assert_close(global_batch(None, [again[s]])["input_ids"], ref["input_ids"])
        torch.testing.assert_close(global_batch(None, [per_rank[0][s], per_rank[1][s]])["input_ids"], ref["input_ids"])
    expected = data.valid.windows(np.arange(8))[:, :-1]
    np.testing.assert_array_equal(global_batch(None, [one[0]])["input_ids"].numpy(), expected)


# ---- document mask ---------------------------------------------------------------------------------------

def test_position_ids_restart_after_eos_only_with_document_mask():
    eos = 0
    inputs = np.array([[5, 6, eos, 7, 8, 9, eos, eos, 4], [eos, 1, 2, 3, 4, 5, 6, 7, 8]])
    np.testing.assert_array_equal(position_ids(inputs, eos, False), np.tile(np.arange(9), (2, 1)))
    np.testing.assert_array_equal(position_ids(inputs, eos, True),
                                  [[0, 1, 2, 0, 1, 2, 3, 0, 0], [0, 0, 1, 2, 3, 4, 5, 6, 7]])


def test_document_mask_flows_into_loader_batches(tmp_path_factory):
    data, cache = builtin_data(tmp_path_factory)
    masked = build_data(DataConfig(cache_dir=str(cache), document_mask=True), TINY_VOCAB, MAX_POS, seed=0)
    mb = masked.train_loader(64, 64).next_step()[0]
    eos = masked.tokenizer.eos_token_id
    ids, pos = mb["input_ids"], mb["position_ids"]
    after_eos = torch.zeros_like(ids, dtype=torch.bool)
    after_eos[:, 1:] = ids[:, :-1] == eos
    assert after_eos.any()
    assert (pos[after_eos] == 0).all()
    assert (pos[:, 0] == 0).all()
    inner = ~after_eos
    inner[:, 0] = False
    assert (pos[:, 1:][inner[:, 1:]] == (pos[:, :-1] + 1)[inner[:, 1:]]).all()
