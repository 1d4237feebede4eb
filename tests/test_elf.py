"""flexnpu.elf: the DT_NEEDED list of real executables, as `--interpose auto` uses it."""

from __future__ import annotations

import shutil
import subprocess
import sys

import pytest

from flexnpu.cmd_run import choose_front
from flexnpu.elf import needed_libraries

CC = shutil.which("cc") or shutil.which("gcc")


def test_needed_libraries_of_real_files(tmp_path):
    assert "libc.so.6" in needed_libraries("/bin/ls")
    script = tmp_path / "s.sh"
    script.write_text("#!/bin/sh\necho libascendcl.so\n")
    assert needed_libraries(str(script)) == []
    assert needed_libraries(str(tmp_path / "missing")) == []
    truncated = tmp_path / "t"
    truncated.write_bytes(open("/bin/ls", "rb").read(100))
    assert needed_libraries(str(truncated)) == []
    garbage = tmp_path / "g"
    garbage.write_bytes(b"\x7fELF\x02\x01" + b"\xff" * 200)
    assert needed_libraries(str(garbage)) == []


@pytest.mark.skipif(CC is None, reason="needs a C compiler")
def test_auto_goes_by_the_dynamic_section_not_by_strings(tmp_path):
    # the name appears in the program's data, but the program is not linked to the library
    src = tmp_path / "p.c"
    src.write_text('#include <stdio.h>\nint main(void){puts("libascendcl.so");return 0;}\n')
    exe = tmp_path / "p"
    subprocess.run([CC, str(src), "-o", str(exe)], check=True)
    assert "libascendcl.so" in open(exe, "rb").read().decode("latin-1")
    assert "libascendcl.so" not in needed_libraries(str(exe))
    assert choose_front("auto", [str(exe)]) == "python"
    # and one that is linked to a library of that name is native
    lib = tmp_path / "libascendcl.so"
    (tmp_path / "l.c").write_text("int aclInit(const char *c){(void)c;return 0;}\n")
    subprocess.run([CC, "-shared", "-fPIC", str(tmp_path / "l.c"), "-o", str(lib)], check=True)
    (tmp_path / "m.c").write_text("int aclInit(const char *);int main(void){return aclInit(0);}\n")
    linked = tmp_path / "m"
    subprocess.run(
        [CC, str(tmp_path / "m.c"), "-L", str(tmp_path), "-lascendcl", "-o", str(linked)], check=True
    )
    assert needed_libraries(str(linked))[0] == "libascendcl.so"
    assert choose_front("auto", [str(linked)]) == "native"
    assert choose_front("auto", [sys.executable, "app.py"]) in ("python", "native")
