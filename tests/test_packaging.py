"""The build's own code that ends up in every binary: the block-wise xz of staticx's bundle
(packaging/xz_blocks.py), checked against Python's lzma module (liblzma, an independent
decoder). That staticx's bootloader reads it too, every frozen test shows: each one starts
dist/ggc-ota."""
from __future__ import annotations

import importlib.util
import lzma
import random

import pytest

from tests.conftest import REPO


@pytest.fixture(scope="module")
def xz_blocks():
    spec = importlib.util.spec_from_file_location("xz_blocks", REPO / "packaging/xz_blocks.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def text(n: int, seed: int) -> bytes:
    rng = random.Random(seed)
    words = [b"agent", b"core", b"update", b"job", b"status", b"greengrass", b"swap", b"\n"]
    out = b" ".join(rng.choices(words, k=n // 4 + 1))
    return out[:n]


def noise(n: int, seed: int) -> bytes:
    return random.Random(seed).getrandbits(8 * n).to_bytes(n, "little")


def decode(stream: bytes, memlimit=None) -> tuple:
    decoder = lzma.LZMADecompressor(format=lzma.FORMAT_XZ, memlimit=memlimit)
    return decoder.decompress(stream), decoder


def test_what_compresses_is_compressed_and_what_does_not_is_stored(xz_blocks):
    head, middle, tail = text(300_000, 1), noise(1_000_003, 2), text(200_001, 3)
    data = head + middle + tail
    stream = xz_blocks.compress_blockwise(data, [{"id": lzma.FILTER_X86}])
    out, decoder = decode(stream)
    assert out == data and decoder.eof and decoder.check == lzma.CHECK_CRC32  # staticx reads CRC32 only
    plan = xz_blocks.plan_blocks(data)
    stored = sum(len(block) for block, compress in plan if not compress)
    piece = xz_blocks.PIECE
    assert len(middle) - 2 * piece <= stored <= len(middle) + 2 * piece
    assert [compress for _, compress in plan] == [True, False, True]
    # the stored part costs 3 bytes per 64 KiB chunk; the text shrinks to well under a half
    assert len(stream) < stored + 3 * (stored // piece + 1) + (len(data) - stored) // 2


def test_only_noise_or_only_text_makes_one_block(xz_blocks):
    for data, compress in ((noise(150_000, 4), False), (text(150_000, 5), True)):
        assert [c for _, c in xz_blocks.plan_blocks(data)] == [compress]
        assert decode(xz_blocks.compress_blockwise(data))[0] == data


def test_the_dictionary_stays_within_what_the_bootloader_allocates(xz_blocks):
    """staticx's bootloader takes an LZMA2 dictionary of 8 MiB at most; liblzma needs a little
    more than the dictionary to decode, so a 16 MiB one would exceed this limit."""
    data = text(1 << 20, 6) * 9
    stream = xz_blocks.compress_blockwise(data)
    assert decode(stream, memlimit=12 << 20)[0] == data
    small = xz_blocks.compress_blockwise(data[:100_000])
    assert decode(small, memlimit=1 << 20)[0] == data[:100_000]  # a small block, a small dictionary


def test_empty_and_tiny_inputs(xz_blocks):
    for data in (b"", b"x", noise(1, 7)):
        assert decode(xz_blocks.compress_blockwise(data))[0] == data


def test_what_lzma_only_halves_is_stored(xz_blocks):
    """Pieces that LZMA shrinks only to about half are stored: decoding them at every start costs
    more than the flash they would save (the C libraries' pieces shrink to 0.2 to 0.8)."""
    piece = xz_blocks.PIECE
    half = b"".join(noise(piece // 2, 10 + i) + bytes(piece // 2) for i in range(4))
    well = text(4 * piece, 11)
    plan = xz_blocks.plan_blocks(half + well)
    assert [(len(block), compress) for block, compress in plan] == [(len(half), False), (len(well), True)]
    assert decode(xz_blocks.compress_blockwise(half + well))[0] == half + well
