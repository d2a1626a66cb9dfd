"""Check that a built x86-64 extension runs on any x86-64 CPU: AVX code only where dispatched.

    python tools/check_wheel_isa.py dist/blobstore_runtime-*.whl      # every extension in a wheel
    python tools/check_wheel_isa.py path/to/_kernels.cpython-*.so      # or extension files

The kernels are compiled per instruction set: csrc/kernels_avx2.c, csrc/kernels_avx2_vnni.c and
csrc/kernels_avx512.c carry target attributes and run only after csrc/cpu.c has seen the CPU
support them; every other function must be baseline x86-64 code. This disassembles each ELF
extension with objdump and fails if a function outside those sources holds an AVX instruction (any
VEX/EVEX-encoded one: a "v" mnemonic, a ymm/zmm register or an AVX-512 mask register), a function
outside the sources compiled for AVX-512 holds a VNNI dot product (VPDPBUSD and kin) or a 512-bit
zmm register (kernels_avx2.c runs on CPUs without AVX-512; the VNNI variant of the AVX2 path is
chosen only on CPUs with AVX512-VNNI, whose target lets the compiler use zmm for copies).

Functions are attributed to sources through the ELF symbol table: the compiler's FILE symbol
names each object's source, and that object's local (static) symbols follow it. The kernels'
functions are static, shared by name between the scalar and AVX2 sources and reached only through
each source's exported table (blob_ops_avx2, ...), so the file, not the function name, is what
counts; a global function has no file and may never hold AVX. A stripped or LTO-built extension
loses the FILE symbols; the check then fails rather than guess.
Exit status 0 when every file passes, 1 with one line per offending function otherwise.
"""
from __future__ import annotations

import argparse
import bisect
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

AVX_SOURCES = ("kernels_avx2.c", "kernels_avx2_vnni.c", "kernels_avx512.c")
AVX512_SOURCES = ("kernels_avx2_vnni.c", "kernels_avx512.c")   # may hold VNNI and zmm

# Privileged VMX/SVM instructions and verr/verw: mnemonics that start with "v" but are not AVX.
NOT_AVX = frozenset({
    "verr", "verw", "vmcall", "vmclear", "vmfunc", "vmlaunch", "vmload", "vmmcall", "vmptrld",
    "vmptrst", "vmread", "vmresume", "vmrun", "vmsave", "vmwrite", "vmxoff", "vmxon",
})
# ymm/zmm vectors and the AVX-512 mask registers k0-k7 (kmovw and kin do not start with "v")
AVX_REGISTER = re.compile(r"%(?:[yz]mm\d|k[0-7]\b)")
ZMM_REGISTER = re.compile(r"%zmm\d")
# objdump -d line: "  1f2c0:\tvmovups %ymm0,(%rax)"; prefixes such as "rep" or "{vex}" precede the mnemonic.
INSTRUCTION = re.compile(r"^\s*([0-9a-f]+):\s+(.*)$")
PREFIXES = frozenset({"rep", "repz", "repnz", "repe", "repne", "lock", "notrack", "bnd", "data16", "addr32"})
# objdump -t line: address, flags, section, size, name (the size column follows the section's tab).
SYMBOL = re.compile(r"^([0-9a-f]+) (.{7}) (\S+)\s+([0-9a-f]+)\s+(.*)$")


class CheckError(Exception):
    """The file cannot be checked (wrong format, no symbols, objdump failed)."""


@dataclass(frozen=True)
class Function:
    name: str
    source: str | None  # the C source it was compiled from; None for global symbols
    start: int
    size: int

    def label(self) -> str:
        return f"{self.name} ({self.source or 'global symbol'})"


@dataclass
class Report:
    path: str
    functions: int
    avx_functions: dict  # Function -> first AVX instruction seen in it
    vnni_functions: dict
    zmm_functions: dict
    sources: set  # every source named by a FILE symbol

    def violations(self) -> list[str]:
        found = [f"{self.path}: {fn.label()} holds AVX instruction '{insn}'; only functions from "
                 f"{' / '.join(AVX_SOURCES)} may" for fn, insn in self.avx_functions.items()
                 if fn.source not in AVX_SOURCES]
        found += [f"{self.path}: {fn.label()} holds VNNI instruction '{insn}'; only functions from "
                   f"{' / '.join(AVX512_SOURCES)} may" for fn, insn in self.vnni_functions.items()
                  if fn.source not in AVX512_SOURCES]
        found += [f"{self.path}: {fn.label()} holds 512-bit instruction '{insn}'; only functions from "
                  f"{' / '.join(AVX512_SOURCES)} may" for fn, insn in self.zmm_functions.items()
                  if fn.source not in AVX512_SOURCES]
        return found


def require_x86_64_elf(path: Path) -> None:
    head = path.read_bytes()[:20]
    if head[:4] != b"\x7fELF":
        raise CheckError(f"{path}: not an ELF file (found magic {head[:4]!r}, expected b'\\x7fELF'); "
                         "this check reads Linux x86-64 extensions")
    machine = int.from_bytes(head[18:20], "little")
    if head[4] != 2 or machine != 62:
        raise CheckError(f"{path}: ELF class {head[4]} machine {machine}, expected class 2 machine 62 (x86-64)")


def objdump(path: Path, *flags: str) -> str:
    tool = shutil.which("objdump")
    if tool is None:
        raise CheckError("objdump not found: install binutils")
    done = subprocess.run([tool, *flags, str(path)], capture_output=True, text=True)
    if done.returncode != 0:
        raise CheckError(f"{path}: objdump {' '.join(flags)} failed: {done.stderr.strip()}")
    return done.stdout


def parse_functions(symbol_table: str) -> tuple[list[Function], set]:
    """Function symbols of `objdump -t` output, each with the source of the FILE symbol before it."""
    functions, sources, source = [], set(), None
    for line in symbol_table.splitlines():
        match = SYMBOL.match(line)
        if not match:
            continue
        address, flags, _section, size, name = match.groups()
        name = name.split()[-1] if name.strip() else ""  # the last column: after any symbol version
        if flags[6] == "f":  # FILE symbol: the locals that follow were compiled from `name`
            source = name.replace("\\", "/").rsplit("/", 1)[-1]  # some compilers keep the path
            sources.add(source)
        elif flags[6] == "F" and int(size, 16) > 0:
            functions.append(Function(name, source if flags[0] == "l" else None, int(address, 16), int(size, 16)))
    return sorted(functions, key=lambda fn: fn.start), sources


def parse_instructions(disassembly: str):
    """(address, mnemonic, operands) for each instruction of `objdump -d --no-show-raw-insn` output."""
    for line in disassembly.splitlines():
        match = INSTRUCTION.match(line)
        if not match:
            continue
        words = match.group(2).split(None, 1)
        while words and (words[0] in PREFIXES or words[0].startswith("{")):
            words = words[1].split(None, 1) if len(words) > 1 else []
        if words:
            yield int(match.group(1), 16), words[0], words[1] if len(words) > 1 else ""


def is_avx(mnemonic: str, operands: str) -> bool:
    return (mnemonic.startswith("v") and mnemonic not in NOT_AVX) or bool(AVX_REGISTER.search(operands))


def is_vnni(mnemonic: str) -> bool:
    return mnemonic.startswith("vpdp")  # vpdpbusd(s), vpdpwssd(s) and the AVX-VNNI-INT8/16 forms


def is_zmm(operands: str) -> bool:
    return bool(ZMM_REGISTER.search(operands))


def function_at(functions: list[Function], starts: list[int], address: int) -> Function:
    i = bisect.bisect_right(starts, address) - 1
    if i >= 0 and address < functions[i].start + functions[i].size:
        return functions[i]
    return Function(f"<code at {address:#x} outside any function symbol>", None, address, 0)


def check_extension(path: Path, shown_as: str | None = None) -> Report:
    require_x86_64_elf(path)
    functions, sources = parse_functions(objdump(path, "-t"))
    if not functions:
        raise CheckError(f"{path}: no function symbols (stripped?); cannot tell dispatched code from baseline")
    starts = [fn.start for fn in functions]
    report = Report(shown_as or str(path), len(functions), {}, {}, {}, sources)
    for address, mnemonic, operands in parse_instructions(objdump(path, "-d", "--no-show-raw-insn")):
        if is_avx(mnemonic, operands):
            fn = function_at(functions, starts, address)
            report.avx_functions.setdefault(fn, f"{mnemonic} {operands}".strip())
            if is_vnni(mnemonic):
                report.vnni_functions.setdefault(fn, f"{mnemonic} {operands}".strip())
            if is_zmm(operands):
                report.zmm_functions.setdefault(fn, f"{mnemonic} {operands}".strip())
    return report


def check_wheel(path: Path) -> list[Report]:
    with zipfile.ZipFile(path) as wheel, tempfile.TemporaryDirectory() as tmp:
        members = [name for name in wheel.namelist() if name.endswith(".so")]
        if not members:
            raise CheckError(f"{path}: no .so extension in the wheel (a Windows or pure-Python wheel?)")
        return [check_extension(Path(wheel.extract(name, tmp)), f"{path}!{name}") for name in members]


def check_paths(paths: list[Path]) -> list[Report]:
    """Reports for every extension in `paths`; raises CheckError if any cannot be read."""
    reports = []
    for path in paths:
        reports += check_wheel(path) if path.suffix == ".whl" else [check_extension(path)]
    if not any(set(AVX_SOURCES) <= report.sources for report in reports):
        raise CheckError(f"none of {', '.join(map(str, paths))} names {', '.join(AVX_SOURCES)} in its "
                         "symbol table: not the kernels extension, or built with LTO / stripped")
    return reports


def summary(report: Report) -> str:
    def count(functions: dict, source: str) -> int:
        return sum(fn.source == source for fn in functions)
    dispatched = ", ".join(f"{count(report.avx_functions, source)} in {source}" for source in AVX_SOURCES
                           if source in report.sources)
    return (f"{report.path}: {report.functions} functions; AVX in {len(report.avx_functions)}"
            + (f" ({dispatched}; VNNI in {len(report.vnni_functions)}, zmm in {len(report.zmm_functions)})"
               if dispatched else ""))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("paths", nargs="+", type=Path, help="wheels (.whl) or ELF extension modules (.so)")
    args = parser.parse_args(argv)
    try:
        reports = check_paths(args.paths)
    except (CheckError, OSError, zipfile.BadZipFile) as error:
        print(f"check_wheel_isa: {error}", file=sys.stderr)
        return 1
    violations = [line for report in reports for line in report.violations()]
    for report in reports:
        print(summary(report))
    for line in violations:
        print(f"FAIL: {line}", file=sys.stderr)
    return 1 if violations else 0


if __name__ == "__main__":
    sys.exit(main())
