"""The one compiled module, optional: if it fails to build, the package still
installs and reads in Python (see src/threadserve/_accel.py). Everything else
about the package is in pyproject.toml."""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "threadserve._fastread",
            sources=["src/threadserve/_fastread.c"],
            optional=True,
        )
    ]
)
