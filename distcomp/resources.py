"""What this node can give: cores and memory, honouring cgroup limits (v1 and v2).

psutil sees the whole machine. Inside a container or a systemd unit with ``MemoryMax`` the real
ceiling is the cgroup's, so capacity and available memory take the smaller of the two. Process
trees are measured by session id from one pass over /proc, which also catches children that
re-parented themselves away from the task's main process; a worker that owns its cgroup also
finds there the processes that left their task's session (``own_cgroup``).
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import psutil

CGROUP_ROOT = Path("/sys/fs/cgroup")
_UNLIMITED = 1 << 60
PAGE = os.sysconf("SC_PAGE_SIZE")
_BOOT_ID = Path("/proc/sys/kernel/random/boot_id").read_text().strip()


@dataclass(frozen=True)
class CgroupMemory:
    """One level of the cgroup path that has a limit."""

    limit_file: Path
    usage_file: Path
    stat_file: Path
    file_keys: tuple[str, str, str]  # memory.stat's inactive, active and mapped page cache
    events_file: Path
    # cgroup v2's memory.high: above it the kernel throttles the cgroup's processes and reclaims
    # hard, so tasks crawl long before memory.max; it bounds what the tasks can use like a limit.
    high_file: Path | None = None
    # memory.stat's kernel memory the kernel reclaims under pressure (v2's slab_reclaimable:
    # dentries and inodes); v1 gives no such figure.
    slab_key: str | None = None

    def oom_kills(self) -> int:
        """Processes the kernel OOM-killed in this cgroup (v1 memory.oom_control, v2
        memory.events; 0 where the kernel does not count them)."""
        for line in (_read(self.events_file) or "").splitlines():
            key, _, value = line.partition(" ")
            if key == "oom_kill":
                return int(value)
        return 0

    def limit(self) -> int:
        return min(_limit(self.limit_file), _limit(self.high_file))

    def usage(self) -> int:
        """Memory in use, minus the page cache the kernel drops before it OOM-kills: the
        inactive list, and the active one too except what processes have mapped (their
        programs and libraries). The active list is reclaimed under a limit as well: counted as
        used, a task's input read twice left the worker evicting tasks for memory the kernel
        would have given back, and never did, since the worker kept the pressure away. The
        reclaimable slab too: a sweep of short tasks leaves dentries and inodes by the
        hundred MiB, charged to the cgroup and dropped as soon as memory is short."""
        used = int(_read(self.usage_file) or 0)
        pages = dict.fromkeys((*self.file_keys, self.slab_key), 0)
        for line in (_read(self.stat_file) or "").splitlines():
            key, _, value = line.partition(" ")
            if key in pages:
                pages[key] = int(value)
        inactive, active, mapped = (pages[k] for k in self.file_keys)
        return max(0, used - inactive - max(0, active - mapped) - pages[self.slab_key])


def _limit(path: Path | None) -> int:
    text = None if path is None else _read(path)
    if text is None or text == "max":
        return _UNLIMITED
    return int(text)


def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except OSError:
        return None


def _cgroup_paths(proc_cgroup: str) -> tuple[str | None, str | None]:
    """(v1 memory path, v2 path) of this process from /proc/self/cgroup."""
    v1 = v2 = None
    for line in proc_cgroup.splitlines():
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        if parts[0] == "0" and parts[1] == "":
            v2 = parts[2]
        elif "memory" in parts[1].split(","):
            v1 = parts[2]
    return v1, v2


def memory_cgroups(root: Path = CGROUP_ROOT, proc_cgroup: str | None = None) -> list[CgroupMemory]:
    """Every cgroup level from this process up to the root that may carry a memory limit."""
    if proc_cgroup is None:
        proc_cgroup = _read(Path("/proc/self/cgroup")) or ""
    v1, v2 = _cgroup_paths(proc_cgroup)
    levels: list[CgroupMemory] = []
    if v1 is not None and (root / "memory").is_dir():
        base = root / "memory"
        path = Path(v1)
        for ancestor in [path, *path.parents]:
            d = base / str(ancestor).lstrip("/")
            if (d / "memory.limit_in_bytes").exists():
                levels.append(CgroupMemory(d / "memory.limit_in_bytes",
                                           d / "memory.usage_in_bytes", d / "memory.stat",
                                           ("total_inactive_file", "total_active_file",
                                            "total_mapped_file"), d / "memory.oom_control"))
    elif v2 is not None and (root / "cgroup.controllers").exists():
        path = Path(v2)
        for ancestor in [path, *path.parents]:
            d = root / str(ancestor).lstrip("/")
            if (d / "memory.max").exists():
                levels.append(CgroupMemory(d / "memory.max", d / "memory.current",
                                           d / "memory.stat",
                                           ("inactive_file", "active_file", "file_mapped"),
                                           d / "memory.events", d / "memory.high",
                                           "slab_reclaimable"))
    return levels


def cgroup_cpu_limit(root: Path = CGROUP_ROOT, proc_cgroup: str | None = None) -> float | None:
    """CPU quota in cores (v2 cpu.max or v1 cfs quota), the tightest along the path."""
    if proc_cgroup is None:
        proc_cgroup = _read(Path("/proc/self/cgroup")) or ""
    best: float | None = None
    for line in proc_cgroup.splitlines():
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        controllers = parts[1].split(",")
        path = Path(parts[2])
        for ancestor in [path, *path.parents]:
            rel = str(ancestor).lstrip("/")
            quota = None
            if parts[0] == "0" and parts[1] == "":
                text = _read(root / rel / "cpu.max")
                if text and not text.startswith("max"):
                    q, p = text.split()
                    quota = int(q) / int(p)
            elif "cpu" in controllers:
                q = _read(root / "cpu,cpuacct" / rel / "cpu.cfs_quota_us") or _read(
                    root / "cpu" / rel / "cpu.cfs_quota_us")
                p = _read(root / "cpu,cpuacct" / rel / "cpu.cfs_period_us") or _read(
                    root / "cpu" / rel / "cpu.cfs_period_us")
                if q and p and int(q) > 0:
                    quota = int(q) / int(p)
            if quota is not None:
                best = quota if best is None else min(best, quota)
    return best


def usable_cores() -> float:
    cores = float(len(os.sched_getaffinity(0)))
    quota = cgroup_cpu_limit()
    return min(cores, quota) if quota else cores


def memory_capacity(cgroups: list[CgroupMemory] | None = None) -> int:
    """The smaller of physical memory and every cgroup limit above this process."""
    total = psutil.virtual_memory().total
    for cg in memory_cgroups() if cgroups is None else cgroups:
        total = min(total, cg.limit())
    return total


def memory_available(cgroups: list[CgroupMemory]) -> int:
    """Memory that can still be allocated before the kernel (or a cgroup) runs out."""
    avail = psutil.virtual_memory().available
    for cg in cgroups:
        limit = cg.limit()
        if limit < _UNLIMITED:
            avail = min(avail, limit - cg.usage())
    return avail


def _processes() -> Iterator[tuple[int, bytes, int, int]]:
    """(pid, state, session id, rss bytes) of every process, from one pass over /proc."""
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat", "rb") as fh:
                stat = fh.read()
        except OSError:
            continue
        fields = stat[stat.rfind(b")") + 2:].split()
        yield int(entry.name), fields[0], int(fields[3]), int(fields[21]) * PAGE


def process_start(pid: int) -> str:
    """An identity for process ``pid`` that a reused pid cannot match: the boot it belongs to
    and its start time in clock ticks since that boot, both exact. "" if it is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            stat = fh.read()
    except OSError:
        return ""
    return f"{_BOOT_ID}:{int(stat[stat.rfind(b')') + 2:].split()[19])}"


def oom_kills(cgroups: list[CgroupMemory]) -> int:
    """A counter that grows whenever the kernel OOM-kills a process this worker could own:
    machine-wide (/proc/vmstat) plus every cgroup level above the worker."""
    total = sum(cg.oom_kills() for cg in cgroups)
    for line in (_read(Path("/proc/vmstat")) or "").splitlines():
        if line.startswith("oom_kill "):
            total += int(line.split()[1])
    return total


def session_rss(members: set[int] | None = None
                ) -> tuple[dict[int, int], dict[int, tuple[int, int]]]:
    """Resident memory summed per session id, in bytes, and from the same pass the (session
    id, rss) of each live process among ``members``."""
    totals: dict[int, int] = {}
    found: dict[int, tuple[int, int]] = {}
    for pid, state, sid, rss in _processes():
        totals[sid] = totals.get(sid, 0) + rss
        if members and pid in members and state != b"Z":
            found[pid] = (sid, rss)
    return totals, found


def own_cgroup(root: Path = CGROUP_ROOT, proc_cgroup: str | None = None) -> Path:
    """The ``cgroup.procs`` file of this process's cgroup, which lists every process in it:
    in the unified hierarchy (cgroup v2, or v2 mounted at ``unified/`` beside v1), else in
    v1's ``name=systemd`` hierarchy, where systemd keeps each unit's processes. Raises
    ValueError when the process sits in a root cgroup, which is everybody's."""
    if proc_cgroup is None:
        proc_cgroup = _read(Path("/proc/self/cgroup")) or ""
    paths = {}
    for line in proc_cgroup.splitlines():
        parts = line.split(":", 2)
        if len(parts) == 3:
            paths[parts[1]] = parts[2]
    for hierarchy, base in (("", root), ("", root / "unified"), ("name=systemd", root / "systemd")):
        path = paths.get(hierarchy)
        if path is None or not (base / "cgroup.procs").is_file():
            continue
        if path == "/":
            # Only the real root has no cgroup.events: at the top of a cgroup namespace (a
            # container's), "/" is the container's own cgroup, every process of it together.
            raise ValueError(
                "this process is at the top of its container's cgroup, shared with every "
                "process of the container" if (base / "cgroup.events").is_file() else
                "this process is in the root cgroup, shared with the whole system")
        procs = base / path.lstrip("/") / "cgroup.procs"
        if procs.is_file():
            return procs
    raise ValueError("found no cgroup of this process to list (cgroup v2, or v1 with systemd's "
                     "hierarchy)")


def cgroup_members(procs: Path) -> set[int]:
    """The processes listed in a ``cgroup.procs`` file (none if it cannot be read)."""
    return {int(pid) for pid in (_read(procs) or "").split()}


def task_of(pid: int) -> tuple[str, int] | None:
    """(task id, attempt) from a process's environment, which a task's processes inherit
    (``DISTCOMP_TASK_ID``, ``DISTCOMP_ATTEMPT``); None if it names none or is gone. Raises
    PermissionError when the environment is closed to this user: the process made itself not
    dumpable (ssh-agent, gpg-agent), and cannot say its task."""
    try:
        with open(f"/proc/{pid}/environ", "rb") as fh:
            env = dict(item.partition(b"=")[::2] for item in fh.read().split(b"\0") if item)
    except PermissionError:
        raise
    except OSError:
        return None
    tid, attempt = env.get(b"DISTCOMP_TASK_ID"), env.get(b"DISTCOMP_ATTEMPT", b"")
    if not tid or not attempt.isdigit():
        return None
    return tid.decode(errors="replace"), int(attempt)


def session_pids(sid: int) -> list[int]:
    """Live processes of session ``sid``: a task's whole tree, even re-parented children."""
    return [pid for pid, state, s, _ in _processes() if s == sid and state != b"Z"]


def gib(n_bytes: float) -> str:
    return f"{n_bytes / 2**30:.2f} GiB"


def mib(n_bytes: float) -> int:
    return math.ceil(n_bytes / 2**20)
