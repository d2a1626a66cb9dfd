"""Build: two Cython extensions over the C sources in csrc/.

blobstore._native           checksums for the file format (csrc/crc32c.c)
blobstore.runtime._kernels  the compute kernels (every other csrc/*.c)

Wheels must run on any CPU of their platform, so nothing here targets the build
machine's CPU (no native-arch flags). SIMD code paths carry their own per-function target
attributes in C and are chosen at run time (csrc/cpu.c).
"""
import glob
import sys

from Cython.Build import cythonize
from setuptools import Extension, find_packages, setup

FORMAT_SOURCES = ["csrc/crc32c.c", "csrc/cpu.c"]


def compile_args():
    if sys.platform == "win32":
        # /std:c11 as -std=c11 below: the kernels are C11 and MSVC's default C dialect is older;
        # MSVC's default /fp:precise keeps IEEE semantics
        return ["/O2", "/std:c11"]
    # -O2 keeps IEEE semantics: no -ffast-math, results match the scalar reference.
    return ["-O2", "-std=c11", "-fno-strict-aliasing"]


def link_args():
    return [] if sys.platform == "win32" else ["-pthread"]


def native_extension():
    return Extension(
        "blobstore._native",
        ["blobstore/_native.pyx", *FORMAT_SOURCES],
        include_dirs=["csrc"],
        extra_compile_args=compile_args(),
    )


def kernels_extension():
    kernel_sources = sorted(
        path.replace("\\", "/") for path in glob.glob("csrc/*.c")
        if path.replace("\\", "/") != "csrc/crc32c.c"
    )
    # headers and the per-ISA .inc templates: a change to any of them rebuilds the extension
    kernel_depends = sorted(glob.glob("csrc/*.h") + glob.glob("csrc/*.inc"))
    return Extension(
        "blobstore.runtime._kernels",
        ["runtime/_kernels.pyx", *kernel_sources],
        depends=kernel_depends,
        include_dirs=["csrc"],
        extra_compile_args=compile_args(),
        extra_link_args=link_args(),
    )


def extensions():
    exts = [native_extension(), kernels_extension()]
    return cythonize(exts, language_level=3, compiler_directives={"boundscheck": False, "wraparound": False})


setup(
    packages=[*find_packages(include=["blobstore", "blobstore.*"]), "blobstore.runtime", "blobstore.runtime.serve"],
    package_dir={"blobstore": "blobstore", "blobstore.runtime": "runtime"},
    ext_modules=extensions(),
)
