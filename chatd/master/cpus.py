"""How many CPUs this process may use: what ``[server] workers = 0`` forks one worker for.

``os.cpu_count()`` counts the machine's CPUs. A container limited to 2 CPUs on a 64-core node
would fork 64 workers that share 2 CPUs (and 64 × the memory). So, the smallest of:

1. the CPUs the process may run on (``sched_getaffinity``: ``taskset``, cpusets, systemd's
   ``CPUAffinity=``);
2. the CPU quota of its cgroup and of every ancestor, rounded up: cgroup v2 ``cpu.max``
   (``"200000 100000"`` is 2 CPUs, ``"max 100000"`` no limit); cgroup v1
   ``cpu.cfs_quota_us`` / ``cpu.cfs_period_us`` (``-1``: no limit). This is what Kubernetes'
   CPU limits and systemd's ``CPUQuota=`` set.

At least 1. Files that are missing or unreadable count as no limit.
"""

from __future__ import annotations

import math
import os
from pathlib import Path


def usable_cpus(cgroup_root: str = "/sys/fs/cgroup", self_cgroup: str = "/proc/self/cgroup") -> int:
    """The CPUs this process may use (see the module docstring)."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cpus = os.cpu_count() or 1
    quota = cgroup_quota(Path(cgroup_root), _read(Path(self_cgroup)))
    if quota is not None:
        cpus = min(cpus, max(1, math.ceil(quota)))
    return max(1, cpus)


def cgroup_quota(root: Path, proc_self_cgroup: str) -> float | None:
    """The smallest CPU quota (in CPUs) of the process's cgroup and its ancestors, or None."""
    quotas: list[float] = []
    for line in proc_self_cgroup.splitlines():
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        _, controllers, path = parts
        if controllers == "":  # cgroup v2: the unified hierarchy
            base = root / "unified" if (root / "unified" / "cgroup.controllers").exists() else root
            for directory in _ancestry(base, path):
                quotas += _v2_quota(directory / "cpu.max")
        elif "cpu" in controllers.split(","):  # cgroup v1, the cpu controller
            mounts = [root / controllers, root / "cpu", root / "cpu,cpuacct"]
            v1 = next((m for m in mounts if m.is_dir()), None)
            if v1 is not None:
                for directory in _ancestry(v1, path):
                    quotas += _v1_quota(directory)
    return min(quotas) if quotas else None


def _ancestry(base: Path, path: str) -> list[Path]:
    """``base/path`` and each of its parents up to ``base`` itself."""
    parts = [p for p in path.strip("/").split("/") if p and p not in (".", "..")]
    return [base.joinpath(*parts[:n]) for n in range(len(parts), -1, -1)]


def _v2_quota(cpu_max: Path) -> list[float]:
    fields = _read(cpu_max).split()
    if len(fields) != 2 or fields[0] == "max":
        return []
    try:
        quota, period = int(fields[0]), int(fields[1])
    except ValueError:
        return []
    return [quota / period] if quota > 0 and period > 0 else []


def _v1_quota(directory: Path) -> list[float]:
    try:
        quota = int(_read(directory / "cpu.cfs_quota_us") or "-1")
        period = int(_read(directory / "cpu.cfs_period_us") or "0")
    except ValueError:
        return []
    return [quota / period] if quota > 0 and period > 0 else []


def _read(path: Path) -> str:
    try:
        return path.read_text().strip()
    except OSError:
        return ""
