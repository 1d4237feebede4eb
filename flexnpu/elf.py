"""The shared libraries an ELF file names (its DT_NEEDED entries), read from the file itself.

`flexnpu run --interpose auto` picks the native front end for a program linked to
libascendcl.so. Scanning the whole file for the name would read up to the size of the program
and be fooled by the string appearing anywhere; the dynamic section says it exactly, in a few
small reads (ELF header, program headers, the dynamic section, the strings it points at).
"""

from __future__ import annotations

import struct
from typing import BinaryIO

__all__ = ["needed_libraries"]

_PT_LOAD, _PT_DYNAMIC = 1, 2
_DT_NULL, _DT_NEEDED, _DT_STRTAB, _DT_STRSZ = 0, 1, 5, 10
_MAX_PHDRS = 4096
_MAX_DYN = 1 << 16
_MAX_NAME = 4096


def needed_libraries(path: str) -> list[str]:
    """DT_NEEDED names of the ELF file at `path`, in order; [] for anything that is not a
    dynamically linked ELF file (scripts, static binaries, unreadable or truncated files)."""
    try:
        with open(path, "rb") as f:
            return _needed(f)
    except (OSError, struct.error, ValueError):
        return []


def _needed(f: BinaryIO) -> list[str]:
    ident = f.read(16)
    if len(ident) < 16 or ident[:4] != b"\x7fELF" or ident[4] not in (1, 2) or ident[5] not in (1, 2):
        return []
    wide = ident[4] == 2
    e = "<" if ident[5] == 1 else ">"
    word = "Q" if wide else "I"
    # e_phoff, e_phentsize, e_phnum
    if wide:
        f.seek(0x20)
        (phoff,) = struct.unpack(e + "Q", f.read(8))
        f.seek(0x36)
    else:
        f.seek(0x1C)
        (phoff,) = struct.unpack(e + "I", f.read(4))
        f.seek(0x2A)
    phentsize, phnum = struct.unpack(e + "HH", f.read(4))
    if not 0 < phnum <= _MAX_PHDRS or phentsize < (56 if wide else 32):
        return []
    loads: list[tuple[int, int, int]] = []  # (vaddr, file offset, file size)
    dynamic: tuple[int, int] | None = None
    for i in range(phnum):
        f.seek(phoff + i * phentsize)
        raw = f.read(phentsize)
        if wide:
            p_type, _flags, p_offset, p_vaddr, _paddr, p_filesz = struct.unpack_from(e + "IIQQQQ", raw)
        else:
            p_type, p_offset, p_vaddr, _paddr, p_filesz = struct.unpack_from(e + "IIIII", raw)
        if p_type == _PT_LOAD:
            loads.append((p_vaddr, p_offset, p_filesz))
        elif p_type == _PT_DYNAMIC:
            dynamic = (p_offset, p_filesz)
    if dynamic is None:
        return []
    entry = struct.Struct(e + word + word)
    off, size = dynamic
    n = min(size // entry.size, _MAX_DYN)
    f.seek(off)
    data = f.read(n * entry.size)
    needed: list[int] = []
    strtab = strsz = None
    for tag, val in entry.iter_unpack(data[: len(data) - len(data) % entry.size]):
        if tag == _DT_NULL:
            break
        if tag == _DT_NEEDED:
            needed.append(val)
        elif tag == _DT_STRTAB:
            strtab = val
        elif tag == _DT_STRSZ:
            strsz = val
    if strtab is None:
        return []
    base = _file_offset(loads, strtab)
    if base is None:
        return []
    names = []
    for idx in needed:
        if strsz is not None and idx >= strsz:
            continue
        f.seek(base + idx)
        raw = f.read(_MAX_NAME)
        names.append(raw.split(b"\0", 1)[0].decode("utf-8", "replace"))
    return names


def _file_offset(loads: list[tuple[int, int, int]], vaddr: int) -> int | None:
    # DT_STRTAB is a virtual address: the loadable segment holding it says where it is in the file
    for seg_vaddr, seg_off, seg_size in loads:
        if seg_vaddr <= vaddr < seg_vaddr + seg_size:
            return seg_off + (vaddr - seg_vaddr)
    return None
