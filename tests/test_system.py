"""The base helpers every stage may use: core counts."""

from __future__ import annotations

from imgtune.system import usable_cores


def test_usable_cores_respects_a_container_cpu_quota(tmp_path):
    affinity = usable_cores(tmp_path / "absent")
    quota = tmp_path / "cpu.max"
    quota.write_text("150000 100000\n")  # 1.5 CPUs
    assert usable_cores(quota) == min(affinity, 2)
    quota.write_text("max 100000\n")
    assert usable_cores(quota) == affinity
    quota.write_text("50000 100000\n")
    assert usable_cores(quota) == 1
