"""Builds the optional native CPU kernels (moejax/native/*.cc) as a plain shared library.

Everything else is in pyproject.toml. The library uses no Python C-API: it only exports XLA FFI
handlers, which moejax.native loads with ctypes. It needs jaxlib's FFI headers (a build requirement
in pyproject.toml) and a C++17 compiler; when either is missing, or compiling fails, the package
installs without it and moejax uses the pure-XLA path.
"""

import os
import sys

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext


class OptionalBuildExt(build_ext):
    """build_ext that adds jaxlib's FFI headers and never fails the install."""

    def build_extension(self, ext):
        try:
            import jaxlib

            # -isystem, not -I: jaxlib's headers have warnings of their own (e.g. -Wreturn-type on exhaustive
            # switches) that are not ours to fix; kernels.cc itself still gets every warning.
            include = os.path.join(os.path.dirname(os.path.abspath(jaxlib.__file__)), "include")
            ext.extra_compile_args = [*ext.extra_compile_args, "-isystem", include]
            super().build_extension(ext)
        except Exception as err:  # no jaxlib, no compiler, a compile error: fall back to XLA
            print(f"moejax: native kernels not built ({err}); the pure-XLA path will be used", file=sys.stderr)

    def get_export_symbols(self, ext):
        return []  # not a Python module: no PyInit_ symbol to export


native = Extension(
    "moejax.native._kernels",
    sources=["moejax/native/kernels.cc"],
    language="c++",
    # -O3 and per-function ISA variants (in the source, chosen at load time) rather than -march=native: the
    # build may run on another machine than the one that runs it. -Wno-psabi: the vector helpers are always
    # inlined, so the note that passing an AVX vector by value changes the ABI concerns no real call.
    extra_compile_args=["-std=gnu++17", "-O3", "-g0", "-Wall", "-Wextra", "-Wno-psabi"],
    optional=True,
)

setup(ext_modules=[native] if os.name == "posix" else [], cmdclass={"build_ext": OptionalBuildExt})
