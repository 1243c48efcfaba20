"""The resume journal on its own: what it loads from a file a kill may have cut short, and which
recorded shards it still trusts."""

from __future__ import annotations

import json
import zlib
from pathlib import Path

from warpmerge.journal import Journal

FP = "f" * 64


def lines(*entries: dict) -> str:
    return "".join(json.dumps(e) + "\n" for e in entries)


def shard(path: str, data: bytes) -> dict:
    return {"kind": "shard", "path": path, "size": len(data), "crc32": zlib.crc32(data)}


GROUP = {"kind": "group", "index": 0, "result": {"name": "model.layers.0", "coefficients": [1.0]}}


def test_round_trip(tmp_path):
    path = tmp_path / "journal.jsonl"
    j = Journal(path)
    j.start(FP)
    j.shard_done("0/model-00001-of-00002.safetensors", 10, 1234)
    j.group_done(0, GROUP["result"])
    loaded = Journal.load(path, FP)
    assert loaded.shards == {"0/model-00001-of-00002.safetensors": (10, 1234)}
    assert loaded.groups == {0: GROUP["result"]}


def test_a_last_line_cut_short_is_ignored(tmp_path):
    path = tmp_path / "journal.jsonl"
    text = lines({"fingerprint": FP}, shard("0/a.safetensors", b"abc"), GROUP)
    cut = lines(shard("0/b.safetensors", b"xyz"))[:-9]  # killed mid-write: no newline either
    path.write_text(text + cut)
    loaded = Journal.load(path, FP)
    assert set(loaded.shards) == {"0/a.safetensors"}
    assert set(loaded.groups) == {0}


def test_another_merge_or_no_journal_gives_none(tmp_path):
    path = tmp_path / "journal.jsonl"
    path.write_text(lines({"fingerprint": "0" * 64}, shard("0/a.safetensors", b"abc")))
    assert Journal.load(path, FP) is None
    assert Journal.load(tmp_path / "missing.jsonl", FP) is None
    path.write_text("")
    assert Journal.load(path, FP) is None


def test_a_journal_whose_fingerprint_was_cut_short_gives_none(tmp_path):
    path = tmp_path / "journal.jsonl"
    path.write_text('{"fingerp')  # killed while writing the first line
    assert Journal.load(path, FP) is None
    # and a later run's appends after it must not make it trusted either
    path.write_text('{"fingerp' + lines(shard("0/a.safetensors", b"abc")))
    assert Journal.load(path, FP) is None


def test_only_shards_unchanged_on_disk_are_verified(tmp_path):
    roots = [tmp_path / "out", tmp_path / "emas"]
    (roots[0] / "eta-1").mkdir(parents=True)
    roots[1].mkdir()
    files = {"0/eta-1/a.safetensors": b"a" * 100, "0/eta-1/b.safetensors": b"b" * 100,
             "0/eta-1/c.safetensors": b"c" * 100, "1/d.safetensors": b"d" * 100}
    j = Journal(tmp_path / "journal.jsonl")
    for key, data in files.items():
        index, _, rel = key.partition("/")
        (roots[int(index)] / rel).write_bytes(data)
        j.shards[key] = (len(data), zlib.crc32(data))
    # changed size, same CRC-32 (two strings that collide)
    assert zlib.crc32(b"86821") == zlib.crc32(b"14740600")
    (roots[0] / "eta-1/b.safetensors").write_bytes(b"14740600")
    j.shards["0/eta-1/b.safetensors"] = (5, zlib.crc32(b"86821"))
    (roots[0] / "eta-1/c.safetensors").write_bytes(b"c" * 99 + b"C")  # same size, changed CRC
    j.shards["0/gone.safetensors"] = (5, 0)  # no longer on disk
    j.shards["2/x.safetensors"] = (5, 0)  # a root this run does not have
    j.shards["../x.safetensors"] = (5, 0)  # not '<root index>/<path>'
    assert j.verified_shards(roots) == {roots[0] / "eta-1/a.safetensors",
                                        roots[1] / "d.safetensors"}
    assert j.verified_shards(roots[:1]) == {roots[0] / "eta-1/a.safetensors"}


def test_appends_go_to_the_file(tmp_path: Path):
    path = tmp_path / "journal.jsonl"
    j = Journal(path)
    j.start(FP)
    j.shard_done("0/a.safetensors", 3, 7)
    assert [json.loads(x) for x in path.read_text().splitlines()] == [
        {"fingerprint": FP}, {"kind": "shard", "path": "0/a.safetensors", "size": 3, "crc32": 7}]
