"""staticx for a PyInstaller program whose archive is a file of its own (EXE append_pkg=False):
`<prog>` (the bootloader alone) and `<prog>.pkg` beside it. staticx bundles the program with
the C libraries it and the archive's shared objects need, and carries the archive as one more
file of its bundle, so that both land in the same directory at run time, where PyInstaller's
bootloader looks for `<prog>.pkg`. Why: a program that runs keeps its file alive; with the
archive apart, the agent can delete the archive's copy once Python runs (see
drop_unpacked_archive in ggc_ota.py) and TMPDIR, RAM on OpenWrt, gets 6 MiB back.

Usage: python staticx_split.py PROG OUTPUT"""
import os
import sys

from PyInstaller.archive.readers import CArchiveReader
from staticx.api import StaticxGenerator
from staticx.hooks.pyinstaller import PyInstallHook


def main(prog: str, output: str) -> None:
    pkg = prog + ".pkg"
    with StaticxGenerator(prog, strip=True) as gen:
        # the C libraries the archive's shared objects need (staticx's own PyInstaller hook
        # finds them only in an archive appended to the program)
        with PyInstallHook(gen, CArchiveReader(pkg)) as hook:
            hook.process()
        gen.sxar.add_file(pkg, arcname=os.path.basename(pkg))
        gen.generate(output)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
