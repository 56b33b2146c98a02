"""xz, block by block: the stretches of the data that compress well are LZMA2 blocks, the others
(zlib data, and the parts of the C libraries that LZMA shrinks least) are LZMA2 blocks of stored
chunks, which an xz decoder copies instead of decoding bit by bit. One stream with a CRC32 check, the format of
https://tukaani.org/xz/xz-file-format.txt, as staticx's bootloader reads it (its XZ Embedded
decoder: CRC32 only, a dictionary of 8 MiB at most). Standard library only, so the tests check
it against Python's lzma module, an independent decoder."""
import binascii
import lzma
import struct

PIECE = 64 * 1024  # the unit of the compress-or-store decision (and an LZMA2 stored chunk's most)
# A piece is compressed when LZMA makes it at most this fraction of its size. Decoding costs
# start time at every start; storing costs flash once. The C libraries' pieces shrink to 0.22 to
# 0.81 (half of them to 0.41 or less): at 0.9 all were compressed, the binary was 6.31 MB and
# staticx's launcher took 0.16 s; at 0.4 the half that LZMA shrinks least is stored, the binary
# is 7.46 MB and a start 0.07 s shorter (x86_64; see the README's "The binary's memory").
WORTH_IT = 0.4
DICT_MAX = 8 << 20  # staticx's bootloader refuses a larger LZMA2 dictionary
TRIAL = {"id": lzma.FILTER_LZMA2, "preset": 6, "dict_size": PIECE}  # the decision's quick compression


# ---- the xz container (https://tukaani.org/xz/xz-file-format.txt), CRC32 check -----------------
# (the lzma module's FILTER_* constants are the format's filter ids: 0x04 x86 BCJ, 0x21 LZMA2)
CHECK_CRC32 = 0x01


def crc32(data: bytes) -> bytes:
    return struct.pack("<I", binascii.crc32(data) & 0xFFFFFFFF)


def varint(n: int) -> bytes:
    out = bytearray()
    while n >= 0x80:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def pad4(data: bytes) -> bytes:
    return data + b"\0" * (-len(data) % 4)


def dict_size_code(size: int) -> tuple:
    """The smallest LZMA2 dictionary of at least `size` bytes: (its property byte, its size)."""
    for code in range(40):
        dict_size = (2 | (code & 1)) << (code // 2 + 11)
        if dict_size >= size:
            return code, dict_size
    raise ValueError(size)


def block_header(bcj: list, dict_code: int) -> bytes:
    filters = b"".join(varint(f["id"]) + varint(0) for f in bcj)  # BCJ filters: no properties
    filters += varint(lzma.FILTER_LZMA2) + varint(1) + bytes([dict_code])
    body = bytes([len(bcj)]) + filters  # flags: number of filters - 1 (= the BCJ ones), no sizes
    size = len(body) + 1 + 4
    size += -size % 4
    header = bytes([size // 4 - 1]) + body
    header += b"\0" * (size - 4 - len(header))
    return header + crc32(header)


def stored_lzma2(data: bytes) -> bytes:
    """LZMA2 data made of stored chunks: the first resets the dictionary, the others do not."""
    out = bytearray()
    for at in range(0, len(data), PIECE):
        chunk = data[at:at + PIECE]
        out += bytes([0x01 if at == 0 else 0x02]) + struct.pack(">H", len(chunk) - 1) + chunk
    return bytes(out + b"\0")


def xz_block(data: bytes, compress: bool, bcj: list) -> tuple:
    """One block: (its bytes, its unpadded size for the index). `bcj`: the branch-call-jump
    filters a compressed block goes through first (staticx's bootloader has the one for its
    architecture), e.g. [{"id": lzma.FILTER_X86}]."""
    if compress:
        code, dict_size = dict_size_code(min(max(len(data), 4096), DICT_MAX))
        lzma2 = {"id": lzma.FILTER_LZMA2, "preset": 6, "dict_size": dict_size}
        payload = lzma.compress(data, format=lzma.FORMAT_RAW, filters=bcj + [lzma2])
    else:
        bcj = []  # stored chunks go through no filter
        code, _ = dict_size_code(PIECE)
        payload = stored_lzma2(data)
    header = block_header(bcj, code)
    unpadded = len(header) + len(payload) + 4
    return pad4(header + payload) + crc32(data), unpadded


def xz_stream(blocks: list, bcj: list) -> bytes:
    """An xz stream of [(data, compress?)] blocks, in order."""
    flags = bytes([0, CHECK_CRC32])
    out = bytearray(b"\xfd7zXZ\0" + flags + crc32(flags))
    index = bytearray(b"\0" + varint(len(blocks)))
    for data, compress in blocks:
        block, unpadded = xz_block(data, compress, bcj)
        out += block
        index += varint(unpadded) + varint(len(data))
    index = pad4(bytes(index))
    index += crc32(index)
    out += index
    footer = struct.pack("<I", len(index) // 4 - 1) + flags
    return bytes(out + crc32(footer) + footer + b"YZ")


def plan_blocks(data: bytes) -> list:
    """Cut `data` into runs of pieces that compress (one LZMA2 block each, so they share a
    dictionary) and runs of pieces that do not (stored)."""
    runs: list = []
    for at in range(0, len(data), PIECE):
        piece = data[at:at + PIECE]
        compress = len(lzma.compress(piece, format=lzma.FORMAT_RAW, filters=[TRIAL])) <= WORTH_IT * len(piece)
        if runs and runs[-1][1] == compress:
            runs[-1][0].append(piece)
        else:
            runs.append(([piece], compress))
    return [(b"".join(pieces), compress) for pieces, compress in runs]


def compress_blockwise(data: bytes, bcj: list = ()) -> bytes:
    """`data` as an xz stream, each stretch compressed or stored as it deserves."""
    return xz_stream(plan_blocks(data), list(bcj))
