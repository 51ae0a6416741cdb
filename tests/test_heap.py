"""wsss.heap: a fixed mmap threshold, so that image-sized buffers of varied sizes go back to the system."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import yaml
from conftest import make_document

from wsss import heap

# In a fresh process: free one 8 MiB block (glibc's default then raises its threshold to 8 MiB), then
# ask for three image-sized blocks and count those served by their own mapping (a page + 16 bytes).
PROBE = """
import ctypes, sys
from wsss.cli import main
from wsss.heap import fix_mmap_threshold
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
if sys.argv[1] == "fixed":
    assert fix_mmap_threshold(1 << 20)
elif sys.argv[1] == "params":  # what every stage command does with compute.mmap_threshold_mib
    assert main(["check-params", "--root", sys.argv[2], "--params", sys.argv[3]]) == 0
libc.free(libc.malloc(8 << 20))
pointers = [libc.malloc(size) for size in (2 << 20, 3 << 20, (5 << 20) + 12345)]
print(sum((pointer - 16) % 4096 == 0 for pointer in pointers))
"""


def _mapped_blocks(mode: str, *args: str) -> int:
    env = {key: value for key, value in os.environ.items() if key != heap.ENV}
    done = subprocess.run([sys.executable, "-c", PROBE, mode, *args], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    return int(done.stdout.splitlines()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc")
def test_with_a_fixed_threshold_image_sized_blocks_get_their_own_mapping_after_a_larger_one_was_freed():
    assert _mapped_blocks("default") < 3  # glibc's moving threshold: they come from the heap
    assert _mapped_blocks("fixed") == 3


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc")
def test_the_commands_fix_the_threshold_from_compute_mmap_threshold_mib_and_leave_glibc_alone_without_it(tmp_path):
    for value, expected in ((1, 3), (None, 0)):
        path = tmp_path / f"params-{value}.yaml"
        path.write_text(yaml.safe_dump(make_document({"compute.mmap_threshold_mib": value})))
        mapped = _mapped_blocks("params", str(tmp_path), str(path))
        assert (mapped == 3) if expected == 3 else (mapped < 3), (value, mapped)


def test_the_threshold_is_left_to_the_environment_where_it_is_set(monkeypatch):
    monkeypatch.setenv(heap.ENV, "65536")
    assert heap.fix_mmap_threshold() is False
    with pytest.raises(ValueError, match="positive"):
        heap.fix_mmap_threshold(0)
