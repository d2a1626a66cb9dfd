"""Packaging: the wheel workflow and its cibuildwheel settings, and the check that the shipped
kernels extension holds AVX code only in its dispatched functions (tools/check_wheel_isa.py)."""
from __future__ import annotations

import fnmatch
import importlib.util
import platform
import shutil
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
RUNNERS = ["ubuntu-latest", "ubuntu-24.04-arm", "macos-14", "macos-15-intel", "windows-latest"]


def load_tool():
    spec = importlib.util.spec_from_file_location("check_wheel_isa", ROOT / "tools" / "check_wheel_isa.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while building the class
    spec.loader.exec_module(module)
    return module


isa = load_tool()


# ---- the workflow and [tool.cibuildwheel] ----

def test_workflow_copies_are_identical():
    assert (ROOT / "wheels.yml").read_bytes() == (ROOT / ".github" / "workflows" / "wheels.yml").read_bytes()


def test_workflow_builds_every_platform_and_the_sdist():
    workflow = (ROOT / "wheels.yml").read_text(encoding="utf-8")
    for needed in [*RUNNERS, "pypa/cibuildwheel@", "python -m build --sdist",
                   "tools/check_wheel_isa.py sdist-check/", "actions/upload-artifact@"]:
        assert needed in workflow, f"wheels.yml: expected {needed!r}"


@pytest.fixture(scope="module")
def cibuildwheel():
    tomllib = pytest.importorskip("tomllib", reason="reading pyproject.toml needs Python 3.11+ (tomllib)")
    return tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["tool"]["cibuildwheel"]


def selected(patterns, identifier: str) -> bool:
    return any(fnmatch.fnmatch(identifier, pattern) for pattern in patterns)


def test_cibuildwheel_selects_cpython_39_to_313_without_musl_pypy_or_32_bit(cibuildwheel):
    def built(identifier):
        return selected(cibuildwheel["build"], identifier) and not selected(cibuildwheel["skip"], identifier)

    for version in ["cp39", "cp310", "cp311", "cp312", "cp313"]:
        for platform_tag in ["manylinux_x86_64", "manylinux_aarch64", "macosx_arm64", "macosx_x86_64", "win_amd64"]:
            assert built(f"{version}-{platform_tag}")
    for identifier in ["cp312-musllinux_x86_64", "pp310-manylinux_x86_64", "cp311-win32", "cp311-manylinux_i686",
                       "cp314-manylinux_x86_64", "cp313t-manylinux_x86_64", "cp38-win_amd64"]:
        assert not built(identifier), identifier
    assert cibuildwheel["archs"] == ["native"]  # macOS: one thin wheel per runner, no universal2
    assert cibuildwheel["manylinux-x86_64-image"] == cibuildwheel["manylinux-aarch64-image"] == "manylinux_2_28"


def test_cibuildwheel_tests_the_wheel_fast_and_portably(cibuildwheel):
    assert not any(name in req for req in cibuildwheel["test-requires"] for name in ("torch", "transformers"))
    assert "-march" not in repr(cibuildwheel) and "CFLAGS" not in repr(cibuildwheel)
    command = " && ".join(cibuildwheel["test-command"])
    assert "cpu_info()" in command and "pytest {project}/tests" in command


def test_cibuildwheel_reruns_the_tests_on_scalar_kernels_on_x86_64_linux(cibuildwheel):
    scalar = [o for o in cibuildwheel["overrides"] if "BLOBSTORE_ISA=scalar" in " ".join(o.get("test-command", []))]
    assert len(scalar) == 1
    override = scalar[0]
    assert override["inherit"]["test-command"] == "append"
    assert any("BLOBSTORE_ISA=scalar python -m pytest {project}/tests" in c for c in override["test-command"])
    patterns = [override["select"]] if isinstance(override["select"], str) else override["select"]
    assert selected(patterns, "cp39-manylinux_x86_64")
    assert not any(selected(patterns, i) for i in ["cp39-manylinux_aarch64", "cp39-macosx_x86_64", "cp39-win_amd64"])


# ---- tools/check_wheel_isa.py ----

def test_instruction_classification():
    listing = textwrap.dedent("""\
        0000000000001000 <f>:
            1000:\tvmovups (%rdi),%ymm0
            1004:\t{vex} vpdpbusd %ymm2,%ymm1,%ymm0
            100a:\trep stos %rax,%es:(%rdi)
            100d:\tnotrack jmp *%rax
            1010:\tmovaps %xmm0,%xmm1
            1013:\tvmcall
            1016:\tvaddss %xmm1,%xmm0,%xmm0
            101a:\tkmovw %k1,%eax
            101e:\tvfmadd231ps %zmm24,%zmm1,%zmm19
        """)
    found = [(mnemonic, isa.is_avx(mnemonic, operands), isa.is_vnni(mnemonic), isa.is_zmm(operands))
             for _, mnemonic, operands in isa.parse_instructions(listing)]
    assert found == [("vmovups", True, False, False), ("vpdpbusd", True, True, False), ("stos", False, False, False),
                     ("jmp", False, False, False), ("movaps", False, False, False), ("vmcall", False, False, False),
                     ("vaddss", True, False, False), ("kmovw", True, False, False),
                     ("vfmadd231ps", True, False, True)]


def test_symbols_belong_to_the_file_symbol_before_them():
    """Locals follow their FILE symbol (a path or a base name); globals have no file."""
    table = textwrap.dedent("""\
        0000000000000000 l    df *ABS*\t0000000000000000              kernels_scalar.c
        0000000000001000 l     F .text\t0000000000000020              read_sum
        0000000000000000 l    df *ABS*\t0000000000000000              csrc/kernels_avx2.c
        0000000000002000 l     F .text\t0000000000000040              read_sum
        0000000000003000 g     F .text\t0000000000000010              blob_matmul
        """)
    functions, sources = isa.parse_functions(table)
    assert [(f.name, f.source, f.start) for f in functions] == [
        ("read_sum", "kernels_scalar.c", 0x1000), ("read_sum", "kernels_avx2.c", 0x2000), ("blob_matmul", None, 0x3000)]
    assert sources == {"kernels_scalar.c", "kernels_avx2.c"}


def test_unreadable_inputs_are_named(tmp_path):
    text = tmp_path / "notes.so"
    text.write_text("not an extension")
    with pytest.raises(isa.CheckError, match=r"notes\.so: not an ELF file"):
        isa.check_paths([text])
    wheel = tmp_path / "pure-1.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        archive.writestr("pure/__init__.py", "")
    with pytest.raises(isa.CheckError, match=r"pure-1\.0-py3-none-any\.whl: no \.so extension"):
        isa.check_paths([wheel])


def why_the_isa_check_cannot_run():
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return f"checks x86-64 code; this machine is {platform.machine()}"
    if not sys.platform.startswith("linux"):
        return "reads ELF symbol tables: Linux builds only"
    if shutil.which("objdump") is None:
        return "objdump (binutils) is not installed"
    return None


requires_isa_check = pytest.mark.skipif(why_the_isa_check_cannot_run() is not None,
                                        reason=str(why_the_isa_check_cannot_run()))


def installed_extensions() -> list[Path]:
    import blobstore._native
    import blobstore.runtime._kernels
    return [Path(blobstore.runtime._kernels.__file__), Path(blobstore._native.__file__)]


def functions_from(functions: dict, source: str) -> list:
    return [fn for fn in functions if fn.source == source]


@requires_isa_check
def test_installed_kernels_hold_avx_only_in_dispatched_functions():
    kernels, native = isa.check_paths(installed_extensions())
    assert kernels.violations() == [] and native.violations() == []
    # the dispatched kernels are there and were seen: the check is not passing on an empty listing
    assert functions_from(kernels.avx_functions, "kernels_avx2.c")
    assert functions_from(kernels.avx_functions, "kernels_avx2_vnni.c")
    assert functions_from(kernels.avx_functions, "kernels_avx512.c")
    assert functions_from(kernels.vnni_functions, "kernels_avx2_vnni.c")
    assert all(fn.source in ("kernels_avx2_vnni.c", "kernels_avx512.c") for fn in kernels.vnni_functions)
    assert functions_from(kernels.zmm_functions, "kernels_avx512.c")
    assert all(fn.source in ("kernels_avx2_vnni.c", "kernels_avx512.c") for fn in kernels.zmm_functions)
    assert native.avx_functions == {}


@requires_isa_check
def test_command_line_checks_a_wheel(tmp_path):
    wheel = tmp_path / "blobstore_runtime-0.0-cp3-cp3-linux_x86_64.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        for extension in installed_extensions():
            archive.write(extension, f"blobstore/{extension.name}")
    done = subprocess.run([sys.executable, str(ROOT / "tools" / "check_wheel_isa.py"), str(wheel)],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert f"{wheel}!blobstore/_kernels" in done.stdout and "in kernels_avx512.c; VNNI in" in done.stdout


# As in csrc: dispatched functions are static, reached through an exported table of pointers.
DISPATCHED = {
    "kernels_avx2.c": """
        #include <immintrin.h>
        __attribute__((target("avx2,fma"))) static void scale_avx2(float *x, float a) {
            _mm256_storeu_ps(x, _mm256_mul_ps(_mm256_loadu_ps(x), _mm256_set1_ps(a)));
        }
        void *const ops_avx2 = (void *)scale_avx2;
        """,
    "kernels_avx2_vnni.c": """
        #include <immintrin.h>
        __attribute__((target("avx2,avx512vnni,avx512vl"))) static void dot_vnni(int *acc, const void *u, const void *s) {
            __m256i sum = _mm256_loadu_si256((const __m256i *)acc);
            sum = _mm256_dpbusd_epi32(sum, _mm256_loadu_si256((const __m256i *)u), _mm256_loadu_si256((const __m256i *)s));
            _mm256_storeu_si256((__m256i *)acc, sum);
        }
        void *const ops_vnni = (void *)dot_vnni;
        """,
    "kernels_avx512.c": """
        #include <immintrin.h>
        __attribute__((target("avx512f"))) static void scale_zmm(float *x, float a) {
            _mm512_storeu_ps(x, _mm512_mul_ps(_mm512_loadu_ps(x), _mm512_set1_ps(a)));
        }
        void *const ops_avx512 = (void *)scale_zmm;
        """,
    "kernels_scalar.c": """
        static void scale(float *x, float a) { x[0] *= a; }
        void *const ops_scalar = (void *)scale;
        void add(float *x, float a) { x[0] += a; }
        """,
}


def build_extension(folder: Path, sources: dict, *flags: str) -> Path:
    compiler = shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    if compiler is None:
        pytest.skip("no C compiler to build the bad extensions with")
    for name, code in sources.items():
        (folder / name).write_text(textwrap.dedent(code))
    subprocess.run([compiler, "-O2", "-shared", "-fPIC", *flags, *sources, "-o", "ext.so"], cwd=folder, check=True)
    return folder / "ext.so"


@requires_isa_check
def test_dispatched_code_alone_passes(tmp_path):
    (report,) = isa.check_paths([build_extension(tmp_path, DISPATCHED)])
    assert report.violations() == []
    assert [fn.name for fn in report.vnni_functions] == ["dot_vnni"]


@requires_isa_check
def test_baseline_compiled_for_avx_fails(tmp_path):
    """The -march=native mistake: every baseline function gets VEX-encoded code."""
    (report,) = isa.check_paths([build_extension(tmp_path, DISPATCHED, "-mavx2")])
    found = report.violations()
    assert any("scale (kernels_scalar.c) holds AVX instruction 'vmulss" in line for line in found)
    assert any("add (global symbol) holds AVX instruction 'vaddss" in line for line in found)
    assert len(found) == 2
    done = subprocess.run([sys.executable, str(ROOT / "tools" / "check_wheel_isa.py"), str(tmp_path / "ext.so")],
                          capture_output=True, text=True)
    assert done.returncode == 1 and "FAIL: " in done.stderr and "kernels_scalar.c" in done.stderr


@requires_isa_check
def test_vnni_outside_its_source_fails(tmp_path):
    vnni_in_avx2 = DISPATCHED["kernels_avx2_vnni.c"].replace("#include <immintrin.h>", "").replace("dot_vnni", "dot_in_avx2").replace("ops_vnni", "ops_in_avx2")
    sources = dict(DISPATCHED, **{"kernels_avx2.c": DISPATCHED["kernels_avx2.c"] + vnni_in_avx2})
    (report,) = isa.check_paths([build_extension(tmp_path, sources)])
    assert report.violations() == [
        f"{tmp_path / 'ext.so'}: dot_in_avx2 (kernels_avx2.c) holds VNNI instruction "
        f"'{report.vnni_functions[next(fn for fn in report.vnni_functions if fn.name == 'dot_in_avx2')]}'; "
        "only functions from kernels_avx2_vnni.c / kernels_avx512.c may"]


@requires_isa_check
def test_512_bit_registers_outside_their_source_fail(tmp_path):
    """The AVX2 path runs on CPUs without AVX-512: a zmm register there would fault."""
    zmm_in_avx2 = DISPATCHED["kernels_avx512.c"].replace("#include <immintrin.h>", "").replace("scale_zmm", "scale_in_avx2").replace("ops_avx512", "ops_in_avx2")
    sources = dict(DISPATCHED, **{"kernels_avx2.c": DISPATCHED["kernels_avx2.c"] + zmm_in_avx2})
    (report,) = isa.check_paths([build_extension(tmp_path, sources)])
    assert [line.split(" holds ")[0] for line in report.violations()] == [f"{tmp_path / 'ext.so'}: scale_in_avx2 (kernels_avx2.c)"]
    assert report.violations()[0].endswith("only functions from kernels_avx2_vnni.c / kernels_avx512.c may")
    assert {fn.name for fn in report.zmm_functions} == {"scale_zmm", "scale_in_avx2"}


@requires_isa_check
def test_an_extension_without_the_dispatched_sources_is_refused(tmp_path):
    """A stripped or LTO build loses the FILE symbols: the check must not pass by default."""
    extension = build_extension(tmp_path, {"kernels_scalar.c": DISPATCHED["kernels_scalar.c"]})
    with pytest.raises(isa.CheckError, match="names kernels_avx2.c, kernels_avx2_vnni.c, kernels_avx512.c"):
        isa.check_paths([extension])
