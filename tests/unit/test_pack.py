"""Packing: dtype choice, EOS between documents, the remainder carried across feeds."""

from __future__ import annotations

import numpy as np
import pytest

from distclm.data.pack import Packer, concat_docs, token_dtype


def test_token_dtype_boundary():
    assert token_dtype(50257) == np.uint16  # GPT-2: max id 50256 < 2**16
    assert token_dtype(65536) == np.uint16  # ids 0..65535 still fit
    assert token_dtype(65537) == np.uint32


def test_concat_with_and_without_eos():
    docs = [[1, 2, 3], [4], [5, 6]]
    np.testing.assert_array_equal(concat_docs(docs, 0, np.dtype(np.uint16)), [1, 2, 3, 0, 4, 0, 5, 6, 0])
    np.testing.assert_array_equal(concat_docs(docs, None, np.dtype(np.uint16)), [1, 2, 3, 4, 5, 6])
    assert concat_docs(docs, 9, np.dtype(np.uint16)).dtype == np.uint16
    assert len(concat_docs([], 9, np.dtype(np.uint16))) == 0


def test_concat_rejects_ids_that_do_not_fit():
    with pytest.raises(ValueError, match="70000 does not fit in uint16"):
        concat_docs([[1, 70000]], None, np.dtype(np.uint16))
    np.testing.assert_array_equal(concat_docs([[1, 70000]], None, np.dtype(np.uint32)), [1, 70000])


@pytest.mark.parametrize("block_size", [2, 7, 128])
def test_packer_carries_remainder_across_feeds(block_size):
    """Any cut of the stream into feeds gives the blocks of cutting the whole stream at once."""
    rng = np.random.default_rng(block_size)
    stream = rng.integers(0, 50257, size=5003).astype(np.uint16)
    expected = stream[: len(stream) // block_size * block_size].reshape(-1, block_size)
    for trial in range(5):
        cuts = np.sort(rng.choice(np.arange(1, len(stream)), size=trial * 7 + 1, replace=False))
        packer = Packer(block_size, np.dtype(np.uint16))
        got = [packer.feed(part) for part in np.split(stream, cuts)]
        assert all(b.shape[1] == block_size for b in got)
        np.testing.assert_array_equal(np.concatenate(got), expected)
        assert packer.dropped == len(stream) % block_size


def test_packer_resumes_from_a_saved_carry():
    stream = np.arange(100, dtype=np.uint16)
    first = Packer(8, np.dtype(np.uint16))
    a = first.feed(stream[:37])
    second = Packer(8, np.dtype(np.uint16), carry=np.array(first.carry.tolist()))  # as saved in the state file
    b = second.feed(stream[37:])
    np.testing.assert_array_equal(np.concatenate([a, b]), stream[:96].reshape(12, 8))
    assert second.dropped == 4


def test_packer_small_feeds_yield_no_block_until_full():
    packer = Packer(4, np.dtype(np.uint16))
    assert packer.feed(np.array([1, 2], np.uint16)).shape == (0, 4)
    assert packer.dropped == 2
    np.testing.assert_array_equal(packer.feed(np.array([3, 4, 5], np.uint16)), [[1, 2, 3, 4]])
    assert packer.dropped == 1
