"""Builds the Cython modules of hotpath/.

Environment switches (as asyncpg's setup.py has them):
  ORDO_DEBUG=1          compile with linetrace and assertions on (for profiling the .pyx).
  ORDO_CYTHON_ANNOTATE=1 write the HTML annotation next to each .pyx.
  HOTPATH_NO_EXTENSIONS=1 skip the compiled modules entirely (the pure twins are used).
"""

import os

from setuptools import Extension, setup

#: Each is hotpath/_<name>.pyx with a pure twin hotpath/<name>.py; a name without its .pyx fails the build.
COMPILED_MODULES = ["ring", "dispatcher"]


def _extensions():
    if os.environ.get("HOTPATH_NO_EXTENSIONS"):
        return []
    from Cython.Build import cythonize

    debug = bool(os.environ.get("ORDO_DEBUG"))
    directives = {
        "language_level": "3",
        "boundscheck": debug,
        "wraparound": debug,
        "linetrace": debug,
        # Keep names in the native frames so `py-spy record --native` shows them.
        "embedsignature": True,
    }
    macros = [("CYTHON_TRACE", "1")] if debug else []
    extensions = [
        Extension(
            f"hotpath._{name}",
            [f"hotpath/_{name}.pyx"],
            define_macros=macros,
            extra_compile_args=["-O2", "-g"] if not debug else ["-O0", "-g"],
        )
        for name in COMPILED_MODULES
    ]
    return cythonize(
        extensions,
        compiler_directives=directives,
        annotate=bool(os.environ.get("ORDO_CYTHON_ANNOTATE")),
    )


setup(ext_modules=_extensions())
