"""The config layer on its own: sizes, natural sort of checkpoint folders, and the one-line
errors that name the file, the line and the key."""

from __future__ import annotations

import pytest

from warpmerge.config import load_config, natural_key, parse_size
from warpmerge.errors import ConfigError


@pytest.mark.parametrize("text,size", [
    ("5GB", 5 * 10**9), ("500MB", 500 * 10**6), (" 7KB ", 7000), ("0.5KB", 500),
    ("1.5 kib", 1536), ("2GiB", 2 * 2**30), ("3TiB", 3 * 2**40), ("1TB", 10**12),
    ("10", 10), ("10B", 10), (10, 10), ("2mb", 2 * 10**6),
])
def test_parse_size(text, size):
    assert parse_size(text) == size


@pytest.mark.parametrize("value,message", [
    ("GB", "must be like '5GB'"), ("5 XB", "must be like '5GB'"), ("-1GB", "must be like '5GB'"),
    ("1e3GB", "must be like '5GB'"), ("", "must be like '5GB'"),
    ("0MB", "greater than 0"), (0, "greater than 0"), ("0.0001B", "greater than 0"),
    ("9" * 400 + "GB", "too large"), (2**63, "too large"),
    (True, "number of bytes"),
])
def test_parse_size_errors_name_the_setting(value, message):
    with pytest.raises(ValueError, match=message) as exc:
        parse_size(value, "shard_size")
    assert str(exc.value).startswith("shard_size ")


def test_natural_key_sorts_numbers_as_numbers():
    names = ["step-10", "step-2", "step-1", "step-100", "step-9"]
    assert sorted(names, key=natural_key) == ["step-1", "step-2", "step-9", "step-10", "step-100"]
    assert sorted(["r2/c10", "r10/c1", "r2/c9"], key=natural_key) == ["r2/c9", "r2/c10", "r10/c1"]
    assert sorted(["a", "a1", "a01b"], key=natural_key) == ["a", "a1", "a01b"]


GOOD = "init: i\npolicies:\n  - checkpoints: a\n"


@pytest.mark.parametrize("text,error", [
    (GOOD + "ema:\n  mu_: 0.1\n", "warp.yaml:5: ema.mu_: unknown key (did you mean 'mu'?)"),
    (GOOD + "  - checkpoints: b\n    weight: -1\n",
     "warp.yaml:5: policies[1].weight: input should be greater than 0 (got -1)"),
    (GOOD + "output:\n  path: o\n  shard_size: lots\n",
     "warp.yaml:6: output.shard_size: shard_size must be like '5GB', '500MB' or a number of "
     "bytes (got 'lots')"),
    (GOOD + "ema: {mu: 0.1, mu: 0.2}\n", "warp.yaml:4: YAML syntax error: key 'mu' is given twice"),
    ("init: i\npolicies:\n  - checkpoints: [a\nema: {mu: 0.1}\n",
     "warp.yaml:4: YAML syntax error: expected ',' or ']', but got ':'"),
    ("policies:\n  - checkpoints: a\n", "warp.yaml: init: field required"),
    ("- a\n- b\n", "warp.yaml: expected a mapping of keys (init, policies, ...)"),
])
def test_yaml_errors_name_file_line_and_key(tmp_path, text, error):
    (tmp_path / "warp.yaml").write_text(text)
    with pytest.raises(ConfigError) as exc:
        load_config(tmp_path / "warp.yaml")
    assert str(exc.value) == error


def test_yaml_reads_exponents_as_floats(tmp_path):
    (tmp_path / "warp.yaml").write_text(GOOD + "ema: {mu: 1e-2}\nslerp: {granularity: model}\n")
    config = load_config(tmp_path / "warp.yaml")
    assert config.ema.mu == 0.01 and config.slerp.granularity == "model"
    assert config.base_dir == tmp_path.resolve()
