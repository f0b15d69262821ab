"""Only the compiled helpers live here; everything else is in pyproject.toml.

``optional=True``: without a C compiler the install still succeeds and the sandbox uses its ctypes
path (host/sandbox/invoke.py says which one runs, and why).
"""

from setuptools import Extension, setup

_FLAGS = ["-O2", "-Wall", "-Wextra", "-Wno-unused-parameter"]

setup(ext_modules=[
    Extension("sandbus.host.sandbox._native", ["host/sandbox/_native.c"], optional=True, extra_compile_args=_FLAGS),
    # A component's call (host/sandbox/component.py falls back to wasmtime-py's component API without it).
    Extension("sandbus.host.sandbox._component", ["host/sandbox/_component.c"], optional=True,
              extra_compile_args=_FLAGS),
    # The epoch ticker as a thread that never takes the GIL (host/sandbox/engine.py falls back to Python).
    Extension("sandbus.host.sandbox._ticker", ["host/sandbox/_ticker.c"], optional=True, extra_compile_args=_FLAGS),
    # NATS message frames cut in C (sdk/nats_guard.py parses them with nats-py's parser without it).
    Extension("sandbus.sdk._frames", ["sdk/_frames.c"], optional=True, extra_compile_args=_FLAGS),
])
