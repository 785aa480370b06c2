"""Only the optional C accelerator lives here; everything else is in pyproject.toml.

`optional=True`: without a C compiler (or zlib's header) the build skips it and
canopy_host.protocol uses its Python twin, scan_readings_py: same results, about half
the ingest rate. `canopy monitor` then says so on its dashboard, and
`dev.sh bench --only ingest` prints which one ran (docs/performance.md).
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "canopy_host._fastscan",
            sources=["canopy_host/_fastscan.c"],
            libraries=["z"],
            optional=True,
        )
    ]
)
