"""The content digest: equal data means an equal digest whatever the allocation or the chunking;
any change of a byte or of a block's place changes it."""

from __future__ import annotations

import os

import pytest
import xxhash
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.namespace_digest import BLOCK_BYTES, ContentDigest, chunks, digest_extents

B = BLOCK_BYTES


def naive(image: bytes) -> str:
    """The definition, written out block by block."""
    h = xxhash.xxh3_128()
    previous = -2
    for lba in range(len(image) // B):
        block = image[lba * B:(lba + 1) * B]
        if block == bytes(B):
            continue
        if lba != previous + 1:
            h.update(b"@" + lba.to_bytes(8, "little"))
        h.update(block)
        previous = lba
    return "xxh3-128:" + h.hexdigest()


def image_of(blocks: dict[int, bytes], count: int) -> bytes:
    out = bytearray(count * B)
    for lba, block in blocks.items():
        out[lba * B:(lba + 1) * B] = block
    return bytes(out)


block_contents = st.one_of(st.just(bytes(B)), st.binary(min_size=1, max_size=8).map(lambda b: (b * B)[:B]))


@settings(max_examples=200, deadline=None)
@given(blocks=st.dictionaries(st.integers(0, 63), block_contents, max_size=24),
       chunk_blocks=st.integers(1, 70), extra_extent=st.booleans())
def test_any_chunking_and_any_covering_extents_give_the_definition(blocks: dict[int, bytes], chunk_blocks: int,
                                                                    extra_extent: bool) -> None:
    image = image_of(blocks, 64)
    # Extents that cover every non-zero block, maybe more (allocated zeroes), in chunks of any size.
    lbas = sorted(blocks) + ([40, 41, 42] if extra_extent else [])
    extents = [(lba * B, B) for lba in sorted(set(lbas))]
    digest = ContentDigest()
    for offset, length in chunks(extents, chunk_blocks * B):
        digest.update(offset, image[offset:offset + length])
    assert digest.hexdigest() == naive(image)
    assert digest_extents([(0, len(image))], lambda o, n: image[o:o + n]) == naive(image)


def test_a_hole_and_written_zeroes_are_the_same_and_a_moved_block_is_not() -> None:
    data = os.urandom(B)
    sparse = image_of({3: data}, 8)
    assert digest_extents([(3 * B, B)], lambda o, n: sparse[o:o + n]) == \
        digest_extents([(0, 8 * B)], lambda o, n: sparse[o:o + n])
    moved = image_of({4: data}, 8)
    assert naive(moved) != naive(sparse)
    split = image_of({3: data, 5: data}, 8)
    joined = image_of({3: data, 4: data}, 8)
    assert naive(split) != naive(joined)  # the same bytes hashed, but not at the same places
    flipped = bytearray(sparse)
    flipped[3 * B + 17] ^= 1
    assert naive(bytes(flipped)) != naive(sparse)


def test_chunks_must_be_whole_blocks_in_order() -> None:
    digest = ContentDigest()
    with pytest.raises(ValueError, match="not whole 4096-byte blocks"):
        digest.update(100, bytes(B))
    digest.update(8 * B, bytes(B))
    with pytest.raises(ValueError, match="goes back"):
        digest.update(0, bytes(B))
