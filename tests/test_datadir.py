"""The agent's data dir on a disk that fills (a real tmpfs): atomic writes leave nothing behind,
a destination that cannot be recorded stays pending and resumable, leftovers are swept, and the
free space reported is the filesystem's."""

from __future__ import annotations

import errno
import os
from collections.abc import Callable
from pathlib import Path

import pytest

from agent.backends.emulated_hosting import EmulatedHosting
from agent.datadir import free_bytes, no_space, no_space_message, sweep_temp_files, write_atomically
from tests.diskfill import fill_disk

MIB = 1 << 20
Tmpfs = Callable[..., Path]


@pytest.mark.parametrize("durable", [True, False], ids=["fsynced", "not-fsynced"])
def test_a_write_that_fails_for_lack_of_space_keeps_the_old_file_and_leaves_no_temp_file(
        tmpfs: Tmpfs, durable: bool) -> None:
    disk = tmpfs("disk", size="2m")
    record = disk / "c1.mig-1.state"
    write_atomically(record, b"old", durable=durable)
    assert record.read_bytes() == b"old"
    fill_disk(disk)
    with pytest.raises(OSError) as failed:
        write_atomically(record, b"new" * MIB, durable=durable)
    assert no_space(failed.value) is not None
    assert record.read_bytes() == b"old"
    assert sorted(p.name for p in disk.iterdir()) == ["c1.mig-1.state", "filler"]


def test_a_disk_full_message_names_the_node_the_path_and_what_to_do(tmpfs: Tmpfs) -> None:
    disk = tmpfs("disk", size="1m")
    message = no_space_message("n2", disk / "c1.json.tmp", OSError(errno.ENOSPC, "No space left on device"))
    assert message.startswith(f"node 'n2': no space left on device writing {disk / 'c1.json.tmp'} (")
    assert message.endswith("free space in its data dir or choose another node")
    wrapped = RuntimeError("while loading")
    wrapped.__cause__ = OSError(errno.EDQUOT, "Disk quota exceeded")
    assert no_space(wrapped) is wrapped.__cause__ and no_space(ValueError("x")) is None


def test_free_bytes_is_what_statvfs_says_and_shrinks_as_the_disk_fills(tmpfs: Tmpfs) -> None:
    disk = tmpfs("disk", size="4m")
    before = free_bytes(disk)
    assert 3 * MIB < before <= 4 * MIB
    (disk / "data").write_bytes(b"x" * MIB)
    assert free_bytes(disk) == before - MIB


def test_leftover_temp_files_are_swept_and_nothing_else(tmp_path: Path) -> None:
    for name in ("c1.mig-1.state.tmp", "c1.json.tmp", "nvme-passthru.slots.tmp", "c1.json", "c1.ns"):
        (tmp_path / name).write_bytes(b"x")
    swept = sweep_temp_files(tmp_path)
    assert sorted(p.name for p in swept) == ["c1.json.tmp", "c1.mig-1.state.tmp", "nvme-passthru.slots.tmp"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c1.json", "c1.ns"]


def test_a_destination_that_cannot_be_recorded_stays_pending_and_can_be_adopted_later(tmpfs: Tmpfs) -> None:
    # root, the incoming namespace: no inode is left for the metadata record
    disk = tmpfs("disk", size="4m", nr_inodes=2)
    hosting = EmulatedHosting(disk, 4 * MIB)
    dst = hosting.create_destination("c2", "mig-1", MIB)
    try:
        with pytest.raises(OSError) as failed:
            hosting.adopt_destination("c2", "mig-1")
        assert failed.value.errno == errno.ENOSPC
        assert hosting.hosted_ids() == [] and hosting.pending_destinations() == [("c2", "mig-1")]
        assert hosting.allocated_bytes() == MIB
        assert sorted(os.listdir(disk)) == ["c2.mig-1.incoming"]
    finally:
        dst.close()
    # a restarted agent sees the same
    assert EmulatedHosting(disk, 4 * MIB).pending_destinations() == [("c2", "mig-1")]


def test_unadopt_undoes_adopt(tmp_path: Path) -> None:
    hosting = EmulatedHosting(tmp_path, 4 * MIB)
    hosting.create_destination("c2", "mig-1", MIB).close()
    hosting.adopt_destination("c2", "mig-1")
    assert hosting.hosted_ids() == ["c2"] and hosting.pending_destinations() == []
    hosting.unadopt_destination("c2", "mig-1")
    assert hosting.hosted_ids() == [] and hosting.pending_destinations() == [("c2", "mig-1")]
    assert hosting.allocated_bytes() == MIB and not (tmp_path / "c2.json").exists()
    restarted = EmulatedHosting(tmp_path, 4 * MIB)
    assert restarted.pending_destinations() == [("c2", "mig-1")]
