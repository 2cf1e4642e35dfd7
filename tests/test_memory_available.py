"""How much memory tileseg believes it may use: the machine's MemAvailable, capped by the memory
limits of the process's cgroup (a SLURM job's --mem, a container's --memory), which MemAvailable
does not show. The cgroup files are laid out in a temporary folder as the kernel lays them out."""

from __future__ import annotations

import pytest

import tilesegment.allocator as allocator

GIB = 2**30


def lay_out(tmp_path, monkeypatch, proc_cgroup: str, files: dict[str, str]) -> None:
    (tmp_path / "cgroup").write_text(proc_cgroup)
    for name, text in files.items():
        path = tmp_path / "sys" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    monkeypatch.setattr(allocator, "PROC_CGROUP", str(tmp_path / "cgroup"))
    monkeypatch.setattr(allocator, "CGROUP_ROOT", str(tmp_path / "sys"))


def test_a_cgroup_v2_limit_above_the_process_counts_without_the_page_cache(tmp_path, monkeypatch):
    lay_out(tmp_path, monkeypatch, "0::/job_7/step_0\n", {
        "memory.max": "max\n",
        "job_7/memory.max": f"{8 * GIB}\n",
        "job_7/memory.stat": f"anon {GIB}\nfile {6 * GIB}\n",  # the page cache can be reclaimed
        "job_7/step_0/memory.max": "max\n",
        "job_7/step_0/memory.stat": f"anon {GIB}\nfile {6 * GIB}\n",
    })
    assert allocator.cgroup_room() == 7 * GIB
    monkeypatch.setattr(allocator, "_meminfo_available", lambda: 100 * GIB)  # a big machine, a small job
    assert allocator.memory_available() == 7 * GIB


def test_a_cgroup_v1_memory_limit_and_the_tightest_of_several(tmp_path, monkeypatch):
    lay_out(tmp_path, monkeypatch, "5:cpu,cpuacct:/slurm/job_5\n4:memory:/slurm/job_5/step_0\n0::/\n", {
        "memory/memory.limit_in_bytes": "9223372036854771712\n",  # the root: no limit
        "memory/slurm/memory.limit_in_bytes": f"{64 * GIB}\n",
        "memory/slurm/memory.stat": f"total_rss {10 * GIB}\ntotal_cache {GIB}\n",
        "memory/slurm/job_5/memory.limit_in_bytes": "9223372036854771712\n",
        "memory/slurm/job_5/step_0/memory.limit_in_bytes": f"{4 * GIB}\n",
        "memory/slurm/job_5/step_0/memory.stat": f"total_rss {GIB}\ntotal_cache {2 * GIB}\n",
    })
    assert allocator.cgroup_room() == 3 * GIB
    monkeypatch.setattr(allocator, "_meminfo_available", lambda: 2 * GIB)  # the machine is the tighter
    assert allocator.memory_available() == 2 * GIB


@pytest.mark.parametrize("proc_cgroup, files", [
    ("0::/\n", {"memory.max": "max\n"}),  # v2 without a limit
    ("4:memory:/\n", {"memory/memory.limit_in_bytes": "9223372036854771712\n"}),  # v1 without a limit
    ("0::/user.slice\n", {}),  # no memory controller mounted
])
def test_no_limit_leaves_the_machines_figure(tmp_path, monkeypatch, proc_cgroup, files):
    lay_out(tmp_path, monkeypatch, proc_cgroup, files)
    assert allocator.cgroup_room() is None
    monkeypatch.setattr(allocator, "_meminfo_available", lambda: 5 * GIB)
    assert allocator.memory_available() == 5 * GIB


def test_the_forward_check_uses_the_cgroups_room(tmp_path, monkeypatch):
    """A --tile that fits the machine but not the job's cgroup is refused before the run."""
    from tilesegment.errors import OptionError
    from tilesegment.pipeline import segment

    from .conftest import random_volume, write_mrc

    small_mrc = write_mrc(tmp_path / "tomo.mrc", random_volume((24, 24, 24)))
    lay_out(tmp_path, monkeypatch, "0::/job\n", {"job/memory.max": f"{GIB // 4}\n", "job/memory.stat": "anon 0\n"})
    with pytest.raises(OptionError, match=r"0\.2 GiB of memory available on cpu"):
        segment(small_mrc, str(tmp_path / "out.zarr"), tile=128)
    assert not (tmp_path / "out.zarr").exists()
