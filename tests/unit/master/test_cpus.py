"""chatd.master.cpus: ``workers = 0`` follows the CPUs the process may use, not the machine's."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from chatd.master import cpus


def write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def test_cgroup_v2_quota_of_the_group_and_its_ancestors(tmp_path: Path) -> None:
    write(tmp_path / "cpu.max", "max 100000\n")
    write(tmp_path / "kubepods/cpu.max", "400000 100000\n")  # 4 CPUs on the parent
    write(tmp_path / "kubepods/pod1/chatd/cpu.max", "150000 100000\n")  # 1.5 on the group
    assert cpus.cgroup_quota(tmp_path, "0::/kubepods/pod1/chatd\n") == 1.5
    write(tmp_path / "kubepods/cpu.max", "100000 100000\n")
    assert cpus.cgroup_quota(tmp_path, "0::/kubepods/pod1/chatd\n") == 1.0
    assert cpus.cgroup_quota(tmp_path, "0::/\n") is None  # "max": no limit


def test_cgroup_v1_quota(tmp_path: Path) -> None:
    write(tmp_path / "cpu,cpuacct/system.slice/chatd.service/cpu.cfs_quota_us", "250000\n")
    write(tmp_path / "cpu,cpuacct/system.slice/chatd.service/cpu.cfs_period_us", "100000\n")
    write(tmp_path / "cpu,cpuacct/cpu.cfs_quota_us", "-1\n")
    write(tmp_path / "cpu,cpuacct/cpu.cfs_period_us", "100000\n")
    own = "4:cpu,cpuacct:/system.slice/chatd.service\n4:memory:/x\n"
    assert cpus.cgroup_quota(tmp_path, own) == 2.5


def test_no_cgroup_files_means_no_limit(tmp_path: Path) -> None:
    assert cpus.cgroup_quota(tmp_path, "0::/nowhere\n1:cpu:/nowhere\n") is None
    assert cpus.cgroup_quota(tmp_path, "garbage") is None


def test_the_quota_rounds_up_and_the_affinity_bounds_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    write(tmp_path / "cpu.max", "150000 100000\n")
    write(tmp_path / "self", "0::/\n")
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(64)))
    assert cpus.usable_cpus(str(tmp_path), str(tmp_path / "self")) == 2  # 1.5 -> 2, not 64
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0})
    assert cpus.usable_cpus(str(tmp_path), str(tmp_path / "self")) == 1


def test_a_real_affinity_mask_counts() -> None:
    """``taskset -c 0``: a real process pinned to one CPU counts one."""
    r = subprocess.run(
        ["taskset", "-c", "0", sys.executable, "-c",
         "from chatd.master.cpus import usable_cpus; print(usable_cpus())"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    if r.returncode != 0 and "taskset" in r.stderr:
        pytest.skip(f"NOT TESTED: taskset failed here: {r.stderr.strip()}")
    assert r.returncode == 0 and r.stdout.strip() == "1", r.stderr
