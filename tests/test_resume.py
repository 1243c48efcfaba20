"""--resume after a real SIGKILL: verified shards are kept, the result is bit-identical."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import TINY, perturb, random_model, write_model

BIG = dict(TINY, vocab_size=4000, hidden_size=256, intermediate_size=1024, num_hidden_layers=4,
           num_attention_heads=4, num_key_value_heads=2, head_dim=64)
CONFIG = """\
init: init
policies:
  - checkpoints: [a/1, a/2]
  - checkpoints: [b/1, b/2]
liti: {eta: [0.3, 1.0]}
output: {path: out, shard_size: 400KB}
"""


def shards(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*.safetensors")}


def merge(cfg: Path, *args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "warpmerge", "run", str(cfg), "-q",
                             "--threads", "1", "--chunk-size", "65536", *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


@pytest.mark.parametrize("shards_before_kill", [1, 12])
def test_sigkill_then_resume(tmp_path, shards_before_kill):
    init = random_model(0, BIG)
    write_model(tmp_path / "init", init, BIG, dtype=torch.bfloat16)
    for run in "ab":
        cur = init
        for t in (1, 2):
            cur = perturb(cur, ord(run) * 10 + t, 0.02)
            write_model(tmp_path / run / str(t), cur, BIG, dtype=torch.bfloat16)
    cfg = tmp_path / "warp.yaml"
    cfg.write_text(CONFIG)
    ref = merge(cfg, "--out", str(tmp_path / "ref"))
    assert ref.wait(120) == 0, ref.stderr.read()

    journal = tmp_path / ".out.warpmerge-partial" / ".warpmerge-journal.jsonl"
    proc = merge(cfg)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and proc.poll() is None:
        if journal.exists() and journal.read_text().count('"shard"') >= shards_before_kill:
            os.kill(proc.pid, signal.SIGKILL)
            break
        time.sleep(0.002)
    proc.wait(60)
    if proc.returncode == 0:
        pytest.skip("the merge finished before it could be killed")
    assert proc.returncode == -signal.SIGKILL
    assert not (tmp_path / "out").exists()  # nothing half-written under the final name
    kept = journal.read_text().count('"shard"')

    resumed = merge(cfg, "--resume")
    assert resumed.wait(120) == 0, resumed.stderr.read()
    assert shards(tmp_path / "out") == shards(tmp_path / "ref")
    assert not (tmp_path / ".out.warpmerge-partial").exists()
    assert kept >= shards_before_kill

    # without --resume, a leftover staging folder is simply cleared
    proc = merge(cfg, "--out", str(tmp_path / "again"))
    time.sleep(0.3)
    proc.kill()
    proc.wait(60)
    again = merge(cfg, "--out", str(tmp_path / "again"))
    assert again.wait(120) == 0
    assert shards(tmp_path / "again") == shards(tmp_path / "ref")
    assert not list(tmp_path.glob(".*warpmerge-partial"))
