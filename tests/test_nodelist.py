"""SLURM node list syntax, checked against expansions a SLURM controller gives."""

import pytest

from launcher.backends.nodelist import expand, port_for_job


@pytest.mark.parametrize("text, hosts", [
    ("n1", ["n1"]),
    ("n[1-3,5]", ["n1", "n2", "n3", "n5"]),
    ("gpu-a[01-02],gpu-b7", ["gpu-a01", "gpu-a02", "gpu-b7"]),
    ("node-[001-003]", ["node-001", "node-002", "node-003"]),
    ("linux[1,2]", ["linux1", "linux2"]),
    ("my-long-node-name", ["my-long-node-name"]),
    ("r[1-2]-n[1-2]", ["r1-n1", "r1-n2", "r2-n1", "r2-n2"]),
    ("a[8-10]", ["a8", "a9", "a10"]),
    ("a[08-10],b[1-2],c", ["a08", "a09", "a10", "b1", "b2", "c"]),
])
def test_expand(text, hosts):
    assert expand(text) == hosts


@pytest.mark.parametrize("bad", ["n[1-3", "n1-3]", "n[a-b]", "n[3-1]"])
def test_expand_rejects_malformed(bad):
    with pytest.raises(ValueError):
        expand(bad)


def test_port_depends_on_job_and_stays_in_range():
    ports = {port_for_job(j) for j in (1, 2, 12345, "12345_7")}
    assert len(ports) == 4 and all(10000 <= p < 30000 for p in ports)
