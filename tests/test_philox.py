"""Philox keep-masks: the published Philox4x32-10 vectors, and masks that depend only on the
entry index (any chunking, any number of threads, run to run)."""

from __future__ import annotations

import pytest
import torch

import mergecli.methods.philox as philox
from mergecli.methods import TensorInputs
from mergecli.methods.philox import keep_mask, philox_block
from tests.dense import philox_uniform

# Random123's kat_vectors for philox4x32_10: counter, key, output
KAT = [
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    (
        (0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344),
        (0xA4093822, 0x299F31D0),
        (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1),
    ),
]


@pytest.mark.parametrize(("counter", "key", "words"), KAT)
def test_philox_matches_published_vectors(counter, key, words) -> None:
    assert philox_block(counter, key) == words


def test_entry_i_is_word_i_mod_4_of_block_i_div_4() -> None:
    key = 0x1234_5678_9ABC_DEF0
    words = philox_block((2, 0, 0, 0), (key & 0xFFFFFFFF, key >> 32))
    p = words[1] / 2**32  # entry 9: block 2, word 1; kept iff u < p, so p = u drops it
    assert not keep_mask(key, 9, (1,), p)[0]
    assert keep_mask(key, 9, (1,), p + 2**-40)[0]


def test_mask_does_not_depend_on_chunks_or_threads(monkeypatch: pytest.MonkeyPatch) -> None:
    n, key = 10_001, 99
    probability = torch.rand(n, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    whole = keep_mask(key, 0, (n,), 0.3)
    varying = keep_mask(key, 0, (n,), probability)
    monkeypatch.setattr(philox, "PART_ENTRIES", 1000)
    threads = torch.get_num_threads()
    torch.set_num_threads(3)
    try:
        assert torch.equal(keep_mask(key, 0, (n,), 0.3), whole)  # three threads
        assert torch.equal(keep_mask(key, 0, (n,), probability), varying)
    finally:
        torch.set_num_threads(threads)
    for start, stop in [(0, 5), (5, 4003), (4003, 4004), (4004, n)]:
        part = keep_mask(key, start, (stop - start,), 0.3)
        assert torch.equal(part, whole[start:stop])
        part = keep_mask(key, start, (stop - start,), probability[start:stop])
        assert torch.equal(part, varying[start:stop])
    assert torch.equal(keep_mask(key, 0, (n,), 0.3), whole)  # run to run
    assert abs(whole.double().mean() - 0.3) < 0.02
    assert not torch.equal(keep_mask(key + 1, 0, (n,), 0.3), whole)


def test_probabilities_zero_and_one() -> None:
    assert not keep_mask(5, 0, (4, 500), 0.0).any()
    assert keep_mask(5, 0, (4, 500), 1.0).all()


def test_row_pieces_draw_their_part_of_the_tensor_mask() -> None:
    base = torch.zeros(40, 7)
    whole = TensorInputs("w", base, [base] * 2, [None] * 2, seed=4)
    rows = whole.rows(13, 29)
    assert rows.offset == 13 * 7
    assert torch.equal(rows.philox_mask(1, 0.5), whole.philox_mask(1, 0.5)[13:29])
    assert torch.equal(rows.rows(2, 5).philox_mask(1, 0.5), whole.philox_mask(1, 0.5)[15:18])


def test_masks_equal_the_independent_reference() -> None:
    key = 0xDEAD_BEEF_0123_4567
    assert torch.equal(keep_mask(key, 0, (37, 11), 0.45), philox_uniform(key, (37, 11)) < 0.45)
