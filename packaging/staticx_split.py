"""staticx for a PyInstaller program whose archive is a file of its own (EXE append_pkg=False):
`<prog>` (the bootloader alone) and `<prog>.pkg` beside it. staticx bundles the program with
the C libraries it and the archive's shared objects need, and carries the archive as one more
file of its bundle, so that both land in the same directory at run time, where PyInstaller's
bootloader looks for `<prog>.pkg`. Why: a program that runs keeps its file alive; with the
archive apart, the agent can delete the archive's copy once Python runs (see
drop_unpacked_archive in ggc_ota.py) and TMPDIR, RAM on OpenWrt, gets 6 MiB back.

The bundle is compressed here, not by staticx: staticx runs its whole tar through one xz
stream, and most of it (PyInstaller's archive: zlib data) does not compress, yet the
bootloader's decoder pays LZMA's bit-by-bit decoding for every byte of it, about 0.1 s of
each start on a slow machine. xz_blocks.py writes the same format (which staticx's
bootloader reads and checks) in blocks: what compresses well is compressed with staticx's own
filters, the rest is stored and decodes as a copy (xz_blocks.WORTH_IT says where the line is
and what it costs in size).

Usage: python staticx_split.py PROG OUTPUT"""
import io
import lzma
import os
import sys

from PyInstaller.archive.readers import CArchiveReader
from staticx.api import StaticxGenerator
from staticx.archive import SxArchive, get_xz_filters
from staticx.hooks.pyinstaller import PyInstallHook
from xz_blocks import compress_blockwise


class BlockwiseArchive(SxArchive):
    """staticx's archive, its tar written plain to memory, then compressed block by block into
    the file staticx appends to its bootloader."""

    def __init__(self, fileobj) -> None:
        self.target = fileobj
        super().__init__(fileobj=io.BytesIO(), mode="w", compress=False)

    def close(self) -> None:
        if self.tar:
            super().close()
            bcj = [f for f in get_xz_filters() if f["id"] != lzma.FILTER_LZMA2]  # what staticx would use
            self.target.write(compress_blockwise(self.fileobj.getvalue(), bcj))
            self.fileobj = self.target  # what staticx appends


def main(prog: str, output: str) -> None:
    pkg = prog + ".pkg"
    with StaticxGenerator(prog, strip=True, compress=False) as gen:
        gen.sxar = BlockwiseArchive(gen.sxar.fileobj)
        # the C libraries the archive's shared objects need (staticx's own PyInstaller hook
        # finds them only in an archive appended to the program)
        with PyInstallHook(gen, CArchiveReader(pkg)) as hook:
            hook.process()
        gen.sxar.add_file(pkg, arcname=os.path.basename(pkg))
        gen.generate(output)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
