"""cffi (API mode) builder for the ring's C core. Invoked by setup.py's cffi_modules."""

import os

from cffi import FFI

HERE = os.path.dirname(os.path.abspath(__file__))

with open(os.path.join(HERE, "ring.h"), encoding="utf-8") as f:
    _header = f.read()

# cdef takes only the declarations between the markers (no preprocessor lines).
_cdef = _header.split("/* CDEF-BEGIN */", 1)[1].split("/* CDEF-END */", 1)[0]

ffibuilder = FFI()
ffibuilder.cdef(_cdef)
ffibuilder.set_source(
    "flexnpu.ring._core",
    '#include "ring.h"\n',
    sources=[
        os.path.join("flexnpu", "ring", "ring.c"),
        os.path.join("flexnpu", "ring", "pyfast.c"),
        os.path.join("flexnpu", "ring", "coll.c"),
    ],
    include_dirs=[HERE],
    extra_compile_args=["-O2", "-std=gnu11", "-Wall"],
    # pyfast.c uses the full CPython API (METH_FASTCALL types), so no abi3 tag.
    py_limited_api=False,
)

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
