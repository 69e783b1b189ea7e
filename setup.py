"""Builds the optional C++ extension fastrnn._C with torch.utils.cpp_extension, against the torch that is
already installed (use `pip install --no-build-isolation`). If torch or a compiler is missing, or the build
fails, the package still installs (numba / reference backends) and says how to build the extension.
Set FASTRNN_NO_EXTENSION=1 to skip the build on purpose.
"""

import glob
import os
import sys

from setuptools import setup


def _warn(msg: str) -> None:
    print(f"\n*** fastrnn: {msg}\n", file=sys.stderr)


def _extension_kwargs() -> dict:
    if os.environ.get("FASTRNN_NO_EXTENSION", "0") == "1":
        _warn("FASTRNN_NO_EXTENSION=1: the C++ extension is not built")
        return {}
    try:
        from torch.utils.cpp_extension import BuildExtension, CppExtension
    except ImportError:
        _warn(
            "torch is not installed in the build environment, so the C++ extension is not built. "
            "Install torch first and build with `pip install --no-build-isolation -e .`"
        )
        return {}

    class OptionalBuildExtension(BuildExtension):
        """A failed compile leaves a working pure-Python package behind instead of a failed install."""

        def run(self):
            try:
                super().run()
            except Exception as e:  # noqa: BLE001 - any build failure degrades to the Python backends
                _warn(
                    f"building the C++ extension failed ({e}); fastrnn falls back to numba/reference. "
                    "Install a C++ compiler and rerun `pip install --no-build-isolation -e .`"
                )

    cxx = ["-O3", "-fopenmp", "-std=c++17"]
    if os.environ.get("FASTRNN_NATIVE", "1") == "1":
        cxx.append("-march=native")  # the extension is built where it runs; set FASTRNN_NATIVE=0 for portable
    ext = CppExtension(
        "fastrnn._C",
        sorted(glob.glob(os.path.join("csrc", "*.cpp"))),
        include_dirs=[os.path.abspath("csrc")],
        extra_compile_args={"cxx": cxx},
        extra_link_args=["-fopenmp"],
    )
    return {"ext_modules": [ext], "cmdclass": {"build_ext": OptionalBuildExtension.with_options(use_ninja=True)}}


setup(**_extension_kwargs())
