"""Two changes to the spec pyi-makespec writes for ggc-ota, for the native and the cross builds:

- PyInstaller's archive becomes a file of its own beside the bootloader (EXE append_pkg=False)
  rather than appended to it: the running program then keeps only the small bootloader file
  alive in TMPDIR, and the agent can free the archive's copy once Python runs
  (drop_unpacked_archive in ggc_ota.py);
- the archive leaves out the zlib shared library: the bootloader itself links it, so staticx
  carries it already, and a second copy would be unpacked into TMPDIR (RAM on OpenWrt) and
  never mapped.

Usage: python tailor_spec.py SPEC"""
import re
import sys

NAME_LINE = re.compile(r"^    name='ggc-ota-dynamic',$", re.M)
PYZ_LINE = re.compile(r"^pyz = PYZ\(a\.pure\)$", re.M)
DROP_ZLIB = "a.binaries = [entry for entry in a.binaries if not entry[0].startswith('libz.so')]\n"


def tailor(text: str) -> str:
    if not NAME_LINE.search(text) or not PYZ_LINE.search(text):
        raise SystemExit("tailor_spec: the spec does not have the lines expected of pyi-makespec's output")
    text = NAME_LINE.sub(lambda m: m.group(0) + "\n    append_pkg=False,", text, count=1)
    return PYZ_LINE.sub(lambda m: DROP_ZLIB + m.group(0), text, count=1)


def main(path: str) -> None:
    with open(path) as f:
        text = f.read()
    with open(path, "w") as f:
        f.write(tailor(text))


if __name__ == "__main__":
    main(sys.argv[1])
