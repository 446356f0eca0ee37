"""Node capacity: cgroup v1 and v2 limits, read the way a worker in a unit or container sees them."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from distcomp.resources import (
    cgroup_cpu_limit,
    cgroup_members,
    memory_available,
    memory_capacity,
    memory_cgroups,
    own_cgroup,
    session_rss,
    task_of,
)


def write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def test_v2_limits_take_the_tightest_level(tmp_path):
    write(tmp_path / "cgroup.controllers", "cpu memory")
    write(tmp_path / "system.slice/memory.max", "max")
    write(tmp_path / "system.slice/memory.current", "0")
    write(tmp_path / "system.slice/memory.stat", "inactive_file 0\n")
    unit = tmp_path / "system.slice/distcomp-worker.service"
    write(unit / "memory.max", str(512 << 20))
    write(unit / "memory.current", str(300 << 20))
    write(unit / "memory.stat", f"anon 1\ninactive_file {60 << 20}\nactive_file {70 << 20}\n"
                                f"file_mapped {30 << 20}\n")
    write(unit / "cpu.max", "150000 100000")
    proc = "0::/system.slice/distcomp-worker.service\n"
    levels = memory_cgroups(tmp_path, proc)
    assert levels[0].limit() == 512 << 20
    assert memory_capacity(levels) == 512 << 20
    # 300 MiB used of which 100 MiB is cache the kernel reclaims before an OOM kill: 60 MiB
    # inactive, and 40 of the 70 MiB active that no process maps. 312 MiB still available.
    assert memory_available(levels) == (512 - 200) << 20
    assert cgroup_cpu_limit(tmp_path, proc) == 1.5
    # A tighter quota on a parent is the one that holds.
    write(tmp_path / "system.slice/cpu.max", "50000 100000")
    assert cgroup_cpu_limit(tmp_path, proc) == 0.5


def test_reclaimable_slab_counts_as_available_under_a_v2_limit(tmp_path):
    """A sweep of short tasks leaves dentries and inodes charged to the cgroup by the hundred
    MiB (1.3 M failed stat() calls: 248 MiB), which the kernel drops as soon as memory is short;
    counted as used, available memory shrank with every task and the worker held claims and
    evicted for memory the kernel would give back."""
    write(tmp_path / "cgroup.controllers", "cpu memory")
    unit = tmp_path / "system.slice/distcomp-worker.service"
    write(unit / "memory.max", str(1 << 30))
    write(unit / "memory.current", str(600 << 20))
    write(unit / "memory.stat", f"anon {100 << 20}\ninactive_file 0\nactive_file 0\n"
                                f"file_mapped 0\nslab_reclaimable {250 << 20}\n"
                                f"slab_unreclaimable {50 << 20}\n")
    levels = memory_cgroups(tmp_path, "0::/system.slice/distcomp-worker.service\n")
    assert memory_available(levels) == (1024 - 350) << 20


def test_a_v2_memory_high_below_the_max_is_the_limit(tmp_path):
    """Above memory.high the kernel throttles the cgroup and reclaims hard: tasks crawl long
    before memory.max. The worker counted only memory.max, and packed past the point where
    its tasks slowed to a crawl."""
    write(tmp_path / "cgroup.controllers", "cpu memory")
    unit = tmp_path / "system.slice/distcomp-worker.service"
    write(unit / "memory.max", str(1 << 30))
    write(unit / "memory.high", str(768 << 20))
    write(unit / "memory.current", str(268 << 20))
    write(unit / "memory.stat", "inactive_file 0\nactive_file 0\nfile_mapped 0\n")
    levels = memory_cgroups(tmp_path, "0::/system.slice/distcomp-worker.service\n")
    assert memory_capacity(levels) == 768 << 20
    assert memory_available(levels) == 500 << 20
    write(unit / "memory.high", "max")
    assert memory_capacity(levels) == 1 << 30


def test_a_v1_cpu_quota_limits_the_cores(tmp_path):
    write(tmp_path / "cpu,cpuacct/docker/abc/cpu.cfs_quota_us", "200000")
    write(tmp_path / "cpu,cpuacct/docker/abc/cpu.cfs_period_us", "100000")
    assert cgroup_cpu_limit(tmp_path, "3:cpu,cpuacct:/docker/abc\n") == 2.0


def test_v1_limits(tmp_path):
    d = tmp_path / "memory/docker/abc/system.slice/w.service"
    write(tmp_path / "memory/memory.limit_in_bytes", str(1 << 62))
    write(tmp_path / "memory/docker/abc/memory.limit_in_bytes", str(1 << 30))
    write(d / "memory.limit_in_bytes", str(200 << 20))
    write(d / "memory.usage_in_bytes", str(50 << 20))
    write(d / "memory.stat", "total_inactive_file 0\n")
    levels = memory_cgroups(tmp_path, "4:memory:/docker/abc/system.slice/w.service\n")
    assert sorted(lv.limit() for lv in levels)[:2] == [200 << 20, 1 << 30]
    assert memory_capacity(levels) == 200 << 20


V1_MEMORY = Path("/sys/fs/cgroup/memory")


def _own_v1_memory_cgroup() -> Path | None:
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        _, controllers, path = line.split(":", 2)
        if "memory" in controllers.split(","):
            return V1_MEMORY / path.lstrip("/")
    return None


@pytest.mark.skipif(not os.access(V1_MEMORY, os.W_OK), reason="no writable cgroup v1 memory")
def test_a_real_cgroup_limit_caps_the_capacity():
    parent = _own_v1_memory_cgroup()
    if parent is None or not os.access(parent, os.W_OK):
        pytest.skip("own memory cgroup is not writable")
    child = parent / f"distcomp-test-{uuid.uuid4().hex[:8]}"
    child.mkdir()
    try:
        (child / "memory.limit_in_bytes").write_text(str(300 << 20))
        code = ("import sys; sys.path.insert(0, sys.argv[1]); "
                "from distcomp.resources import memory_capacity; print(memory_capacity())")
        out = subprocess.run(
            ["sh", "-c", f'echo $$ > {child}/cgroup.procs && exec "$0" -c "$1" "$2"',
             sys.executable, code, str(Path(__file__).resolve().parent.parent)],
            capture_output=True, text=True, check=True)
        assert int(out.stdout) == 300 << 20
    finally:
        child.rmdir()


@pytest.mark.skipif(not os.access(V1_MEMORY, os.W_OK), reason="no writable cgroup v1 memory")
def test_page_cache_the_kernel_would_reclaim_counts_as_available(tmp_path):
    """In a real 600 MiB cgroup, a 300 MiB file read three times sits on the active list. It
    counted as used (about 290 MiB available), yet the kernel hands it back: the process then
    allocates 450 MiB with no OOM kill."""
    parent = _own_v1_memory_cgroup()
    if parent is None or not os.access(parent, os.W_OK):
        pytest.skip("own memory cgroup is not writable")
    child = parent / f"distcomp-test-{uuid.uuid4().hex[:8]}"
    child.mkdir()
    data = tmp_path / "input.bin"
    code = f"""
import sys
sys.path.insert(0, {str(Path(__file__).resolve().parent.parent)!r})
from distcomp.resources import memory_available, memory_cgroups
with open({str(data)!r}, "wb") as f:
    for _ in range(300):
        f.write(b"x" * (1 << 20))
for _ in range(3):
    with open({str(data)!r}, "rb") as f:
        while f.read(1 << 20):
            pass
print(memory_available(memory_cgroups()) >> 20)
grown = bytearray(450 << 20)
grown[::4096] = b"y" * len(grown[::4096])
"""
    try:
        (child / "memory.limit_in_bytes").write_text(str(600 << 20))
        out = subprocess.run(
            ["sh", "-c", f'echo $$ > {child}/cgroup.procs && exec "$0" -c "$1"',
             sys.executable, code], capture_output=True, text=True, timeout=120, check=False)
        oom = dict(line.split() for line in (child / "memory.oom_control").read_text()
                   .splitlines())["oom_kill"]
        assert (out.returncode, oom) == (0, "0"), out.stderr
        assert int(out.stdout) >= 450, out.stdout
    finally:
        child.rmdir()  # the process has ended: run() waited for it


def test_session_rss_sees_this_process():
    assert session_rss()[0][os.getsid(0)] > 0


UNIT = "/system.slice/distcomp-worker.service"


@pytest.mark.parametrize("layout", ["v2", "hybrid", "v1"])
def test_own_cgroup_lists_the_units_processes_in_each_layout(tmp_path, layout):
    base = {"v2": tmp_path, "hybrid": tmp_path / "unified", "v1": tmp_path / "systemd"}[layout]
    write(base / "cgroup.procs", "1\n")
    write(base / UNIT.lstrip("/") / "cgroup.procs", "4242\n4343\n")
    write(tmp_path / "memory/cgroup.procs", "1\n")
    proc = {"v2": f"0::{UNIT}\n", "hybrid": f"4:memory:/\n1:name=systemd:{UNIT}\n0::{UNIT}\n",
            "v1": f"4:memory:/\n1:name=systemd:{UNIT}\n"}[layout]
    procs = own_cgroup(tmp_path, proc)
    assert procs == base / UNIT.lstrip("/") / "cgroup.procs"
    assert cgroup_members(procs) == {4242, 4343}


def test_own_cgroup_refuses_the_root_cgroup_and_a_missing_hierarchy(tmp_path):
    write(tmp_path / "cgroup.procs", "1\n")
    with pytest.raises(ValueError, match="root cgroup"):
        own_cgroup(tmp_path, "0::/\n")
    with pytest.raises(ValueError, match="found no cgroup"):
        own_cgroup(tmp_path / "elsewhere", f"0::{UNIT}\n")


def test_own_cgroup_says_when_it_is_a_containers_whole_cgroup(tmp_path):
    """In a container with its own cgroup namespace "/" is the container's cgroup, not the
    system's root (which has no cgroup.events): the refusal said "shared with the whole
    system". Refused still: every other process of the container would go as a stray."""
    write(tmp_path / "cgroup.procs", "1\n")
    write(tmp_path / "cgroup.events", "populated 1\nfrozen 0\n")
    with pytest.raises(ValueError, match="at the top of its container's cgroup, shared with "
                                         "every process of the container"):
        own_cgroup(tmp_path, "0::/\n")


def test_a_process_names_its_task_through_its_environment():
    """The children say they are up: Popen returns once the kernel has swapped in the new
    program, a moment before it has laid out the new environment, which reads empty until then."""
    env = {**os.environ, "DISTCOMP_TASK_ID": "0123abcd", "DISTCOMP_ATTEMPT": "3"}
    up = [sys.executable, "-c", "import time; print('up', flush=True); time.sleep(30)"]
    with subprocess.Popen(up, env=env, stdout=subprocess.PIPE) as named, \
            subprocess.Popen(up, stdout=subprocess.PIPE) as unnamed:
        try:
            assert named.stdout.readline() == unnamed.stdout.readline() == b"up\n"
            assert task_of(named.pid) == ("0123abcd", 3)
            assert task_of(unnamed.pid) is None
            totals, found = session_rss({named.pid, unnamed.pid})
            assert set(found) == {named.pid, unnamed.pid}
            assert found[named.pid][0] == os.getsid(0) and found[named.pid][1] > 0
            assert totals[os.getsid(0)] >= found[named.pid][1]
        finally:
            named.kill()
            unnamed.kill()
