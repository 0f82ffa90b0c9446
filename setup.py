"""The one thing pyproject.toml cannot say: the optional compiled helper.

``threadserve._speedups`` (src/threadserve/_speedups.c) makes socket calls
that cannot block without releasing the GIL. It is optional: where no C
compiler is found the build goes on without it, and threadserve falls back
to the standard socket methods (see _nowait.py).
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "threadserve._speedups",
            sources=["src/threadserve/_speedups.c"],
            optional=True,
        )
    ]
)
