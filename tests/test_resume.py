"""--resume after a real SIGKILL: the verified shards are kept, a damaged one is rewritten, and
the result is bit-identical to an uninterrupted run."""

from __future__ import annotations

import pytest
from conftest import (
    OLD_NS,
    assert_same_model,
    journaled_shards,
    n_shards,
    rerun,
    sigkill,
    staging_of,
    stamp_old,
    start_merge,
    wait_for,
)


@pytest.mark.slow
def test_sigkill_then_resume_keeps_verified_shards(big, big_reference, tmp_path, monkeypatch,
                                                   capsys):
    out = tmp_path / "out"
    total = n_shards(big_reference)
    proc = start_merge(big, out, "--threads", "1")
    reached = wait_for(proc, lambda: len(journaled_shards(out)) >= 3)
    sigkill(proc)  # fails, rather than skips, if the merge ended first
    assert reached
    assert not out.exists()  # nothing half-written under the final name
    staging = staging_of(out)
    kept = [staging / key.partition("/")[2] for key in journaled_shards(out)]
    assert 3 <= len(kept) < total
    # stamp every finished shard: one the resumed run rewrites loses the stamp
    for path in kept:
        stamp_old(path)
    damaged = kept[1]  # same size, one byte flipped: its CRC no longer matches the journal
    data = bytearray(damaged.read_bytes())
    data[-1] ^= 0xFF
    damaged.write_bytes(bytes(data))
    stamp_old(damaged)

    rerun(big, out, monkeypatch, capsys, "--resume")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    assert_same_model(out, big_reference)
    stamped = {p.name for p in out.iterdir() if p.stat().st_mtime_ns == OLD_NS}
    assert stamped == {p.name for p in kept} - {damaged.name}
