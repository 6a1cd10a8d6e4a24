"""The store refuses a filesystem where flock does not hold, naming it (quantkit.storelocks).

The probe runs for real on the filesystems this machine has (ext4 under the test's folder, tmpfs in
/dev/shm), where locks hold. No filesystem here drops them, so the refusal is checked through the
functions that decide and word it, on this machine's real /proc/mounts with one NFS line added as a
client writes it (nfs(5): ``local_lock=flock`` keeps flocks on the client).
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

import pytest

from quantkit.store import Store
from quantkit.storelocks import (LocksDoNotHold, Mount, local_only_locks, mount_of, probe, refusal,
                                 require_working_locks)

NFS_LINE = ("filer:/export/quantkit /mnt/shared\\040store nfs "
            "rw,relatime,vers=3,rsize=1048576,wsize=1048576,hard,proto=tcp,local_lock=flock,addr=10.0.0.5 0 0")


@pytest.mark.parametrize("where", ["tmp", "shm"])
def test_the_probe_finds_that_locks_hold(tmp_path, where):
    folder = tmp_path if where == "tmp" else Path("/dev/shm")
    if not folder.is_dir():
        pytest.skip("no /dev/shm")
    before = set(folder.iterdir())
    assert probe(folder) is None
    assert set(folder.iterdir()) == before, "the probe left its lock file"


def test_the_probe_sees_another_holder(tmp_path):
    """What the probe relies on, by hand: a second open description of a locked file is refused."""
    path = tmp_path / "x.lock"
    a, b = os.open(path, os.O_RDWR | os.O_CREAT), os.open(path, os.O_RDWR)
    try:
        fcntl.flock(a, fcntl.LOCK_EX | fcntl.LOCK_NB)
        with pytest.raises(BlockingIOError):
            fcntl.flock(b, fcntl.LOCK_EX | fcntl.LOCK_NB)
    finally:
        os.close(a)
        os.close(b)


def test_a_store_on_a_working_filesystem_is_used(tmp_path):
    require_working_locks(tmp_path / "store")  # creates the root, probes it, leaves nothing behind
    assert list((tmp_path / "store").iterdir()) == []
    entry = Store(tmp_path / "store").ensure("step", {"a": 1}, lambda d: (d.path / "out.txt").write_text("x"))
    assert entry.file("out.txt").read_text() == "x"


def test_mount_of_reads_this_machines_mounts(tmp_path):
    mount = mount_of(tmp_path)
    assert mount is not None and (tmp_path.resolve() == mount.point or mount.point in tmp_path.resolve().parents)
    assert any(line.split()[1] == str(mount.point) and line.split()[2] == mount.fstype
               for line in Path("/proc/mounts").read_text().splitlines())
    assert local_only_locks(mount) is None  # this machine's own filesystem


def test_an_nfs_mount_with_client_side_locks_is_refused_by_name():
    mounts = Path("/proc/mounts").read_text() + NFS_LINE + "\n"
    mount = mount_of(Path("/mnt/shared store/quantkit"), mounts)
    options = tuple(NFS_LINE.split()[3].split(","))
    assert mount == Mount("filer:/export/quantkit", Path("/mnt/shared store"), "nfs", options)
    why = local_only_locks(mount)
    assert why and "local_lock=flock" in why
    err = refusal(Path("/mnt/shared store/quantkit"), mount, why)
    assert isinstance(err, LocksDoNotHold)
    assert str(err).startswith("the store /mnt/shared store/quantkit is on nfs (filer:/export/quantkit mounted at "
                               "/mnt/shared store, options rw,relatime,vers=3,")
    assert "local_lock=flock" in str(err) and "docs/distributed.md" in err.tip
    for ok in ("vers=4.2,local_lock=none", "vers=3,local_lock=posix"):
        assert local_only_locks(Mount.parse(f"filer:/x /mnt/x nfs4 rw,{ok} 0 0")) is None


def test_a_refusal_names_the_real_filesystem(tmp_path):
    """The message a user gets when the probe fails, worded from this machine's real mount of the store."""
    mount = mount_of(tmp_path)
    err = refusal(tmp_path, mount, "a second open of a lock file got the exclusive lock the first one held")
    assert f"is on {mount.fstype} ({mount.device} mounted at {mount.point}" in str(err)
