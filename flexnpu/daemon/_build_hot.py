"""cffi (API mode) builder of the daemon's C hot path (hotpath.c). Invoked by setup.py's
cffi_modules; the module is a plain CPython extension installed through one cffi entry point,
as the ring's fast path is (flexnpu/ring/pyfast.c)."""

import os

from cffi import FFI

ffibuilder = FFI()
ffibuilder.cdef("int fxh_install(uint64_t dict_addr);")
ffibuilder.set_source(
    "flexnpu.daemon._hot_core",
    "#include <stdint.h>\nint fxh_install(uint64_t dict_addr);\n",
    sources=[os.path.join("flexnpu", "daemon", "hotpath.c")],
    extra_compile_args=["-O2", "-std=gnu11", "-Wall"],
    py_limited_api=False,  # the full CPython API (METH_FASTCALL, vectorcall)
)

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
