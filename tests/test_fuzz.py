"""Fuzzing with hypothesis: configs, safetensors headers and index files from the wild.

Whatever a user or a downloaded model folder holds, warpmerge answers with its own error
(ConfigError for configs, InputError for model files) or works; it never crashes with anything
else, and a header or index never makes it open, or point a read at, anything outside the model
folder. Each test runs a few hundred examples; the file runs in well under a minute.

The tests at the end pin the crashes fuzzing found (now fixed) with their exact inputs.
"""

from __future__ import annotations

import builtins
import io
import json
import os
import shutil
import struct
from contextlib import contextmanager
from pathlib import Path
from unittest import mock

import pytest
import torch
import yaml
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

from warpmerge.config import WarpConfig, build_config, load_config
from warpmerge.errors import ConfigError, InputError
from warpmerge.modelfolder import open_checkpoint

FUZZ = settings(max_examples=300, deadline=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture,
                                       HealthCheck.too_slow, HealthCheck.filter_too_much])

# --- configs ---------------------------------------------------------------------------------

scalars = (st.none() | st.booleans() | st.integers(-10**12, 10**12)
           | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=12))
junk = st.recursive(scalars, lambda inner: st.lists(inner, max_size=3)
                    | st.dictionaries(st.text(max_size=8), inner, max_size=3), max_leaves=8)
numbers = (st.floats(-2, 2) | st.integers(-3, 3) | st.sampled_from([0, 1, 0.0, 1.0, 1e-9, -0.0])
           | st.floats(allow_nan=True, allow_infinity=True))


def maybe(strategy):
    """A plausible value most of the time, random junk sometimes."""
    return st.one_of(*[strategy] * 7, junk)


def typo(key: str):
    """The key, or a near miss of it."""
    return st.one_of(st.just(key), st.builds(lambda i, c: key[:i] + c + key[i + 1:],
                                             st.integers(0, len(key) - 1),
                                             st.sampled_from(["", "_", "x", key[-1]])))


def section(fields: dict, required: tuple[str, ...] = ()):
    """A dict of some of `fields` (each a key -> value strategy), the `required` ones mostly
    present, and now and then a mistyped or unknown key."""
    must = {k: v for k, v in fields.items() if k in required}
    rest = {k: v for k, v in fields.items() if k not in required}
    return st.builds(
        lambda base, extra: {**base, **extra},
        st.one_of(*[st.fixed_dictionaries(must, optional=rest)] * 3,
                  st.fixed_dictionaries({}, optional=fields)),
        st.just({}) | st.just({}) | st.just({}) | st.dictionaries(
            st.one_of(*(typo(k) for k in fields), st.text(max_size=6)), junk, max_size=1),
    )


paths = st.one_of(st.sampled_from(["init", "runs/a/step-*", "runs/b/step-1", "../x", "/abs",
                                   "org/name", "org/name@main", "~/m", ""]), st.text(max_size=15))
sizes = st.one_of(st.integers(-5, 10**13), st.sampled_from(
    ["5GB", "500MB", "1.5 kib", "0MB", "10", "GB", "5 TB", " 7KB ", "1e3GB", "-1GB", "0.0001B"]),
    st.from_regex(r"\s?[0-9]{0,4}\.?[0-9]{0,3}\s?[A-Za-z]{0,3}", fullmatch=True))
policy = section({
    "name": maybe(st.none() | st.sampled_from(["a", "b", "run-b", "x.y_z", "a", "bad name", "",
                                                "-a", "a/b"])),
    "checkpoints": maybe(paths | st.lists(paths, max_size=3)),
    "weight": maybe(numbers),
}, required=("checkpoints",))
config_dicts = section({
    "init": maybe(paths),
    "policies": maybe(st.lists(policy, min_size=1, max_size=3) | st.lists(policy, max_size=0)),
    "ema": maybe(section({
        "mu": maybe(numbers), "every": maybe(st.integers(-2, 5) | numbers),
        "start": maybe(st.sampled_from(["init", "first", "last", "INIT"])),
        "use": maybe(st.sampled_from(["ema", "last", "first"])),
        "save": maybe(st.none() | paths),
    })),
    "slerp": maybe(section({
        "granularity": maybe(st.sampled_from(["layer", "tensor", "model", "block"])),
        "lambda": maybe(st.none() | numbers),
    })),
    "liti": maybe(section({"eta": maybe(numbers | st.lists(numbers, max_size=4))})),
    "output": maybe(section({
        "path": maybe(st.none() | paths),
        "dtype": maybe(st.sampled_from(["bfloat16", "float16", "float32", "int8", "bf16"])
                       | st.none()),
        "shard_size": maybe(sizes),
        "copy_tokenizer": maybe(st.booleans()),
        "push_to_hub": maybe(st.none() | section({
            "repo_id": maybe(st.sampled_from(["user/name", "name", "a/b/c", "u/n.m-1"])),
            "private": maybe(st.booleans()), "revision": maybe(st.none() | st.text(max_size=8)),
        })),
    })),
    "check": maybe(st.none() | section({
        "prompts": maybe(st.none() | st.lists(st.text(max_size=10), max_size=3)),
        "max_new_tokens": maybe(st.integers(-2, 5000)),
    })),
}, required=("init", "policies"))


@pytest.mark.slow
@FUZZ
@given(config_dicts)
@example({"init": "i", "policies": [{"checkpoints": "r/*"}]})
@example({"init": "i", "policies": [{"checkpoints": ["a"]}, {"checkpoints": ["b"]}],
          "slerp": {"lambda": 0.5}, "liti": {"eta": [0, 1, 2.5]}})
def test_config_dicts_raise_only_config_error(data):
    try:
        config = build_config(**data)
    except ConfigError as exc:
        assert str(exc).startswith("config")
        return
    assert isinstance(config, WarpConfig)
    # a valid config survives its own dump: what warpmerge.json records can be rerun
    again = build_config(**config.to_dict())
    assert again.to_dict() == config.to_dict()


yaml_keys = st.one_of(st.text(max_size=8), st.integers(-3, 3), st.none(), st.booleans())
yaml_junk = st.recursive(scalars, lambda inner: st.lists(inner, max_size=3)
                         | st.dictionaries(yaml_keys, inner, max_size=3), max_leaves=8)


@pytest.mark.slow
@FUZZ
@given(config_dicts | st.dictionaries(yaml_keys, yaml_junk, max_size=4) | yaml_junk)
def test_config_yaml_files_raise_only_config_error(tmp_path_factory, data):
    path = tmp_path_factory.getbasetemp() / "fuzz-warp.yaml"
    path.write_text(yaml.safe_dump(data, allow_unicode=True), encoding="utf-8")
    try:
        load_config(path)
    except ConfigError as exc:
        assert str(exc).startswith("fuzz-warp.yaml")


GOOD_YAML = """\
init: init
policies:
  - name: a
    checkpoints: run-a/step-*
    weight: 2
  - checkpoints: [run-b/step-1, run-b/step-2]
ema: {mu: 0.1, every: 2, start: first, save: emas}
slerp: {granularity: tensor, lambda: 0.5}
liti: {eta: [0.3, 1.0]}
output: {path: out, shard_size: 20KB, dtype: bfloat16, push_to_hub: {repo_id: u/n}}
check: {max_new_tokens: 8}
"""
yaml_chars = st.sampled_from(list(":-[]{},#&*!|>'\"%@` \n\t?.0123456789abcxyz") + ["\u00e9", "🙂"])


@st.composite
def yaml_texts(draw):
    """Random text, or the good config with a few characters inserted, deleted or replaced."""
    if draw(st.integers(0, 3)) == 0:
        return draw(st.text(max_size=200))
    text = GOOD_YAML
    for _ in range(draw(st.integers(1, 4))):
        i = draw(st.integers(0, len(text)))
        op = draw(st.sampled_from(["insert", "delete", "replace"]))
        c = draw(yaml_chars | yaml_chars | yaml_chars | st.characters(exclude_categories=["Cs"]))
        if op == "insert":
            text = text[:i] + c + text[i:]
        elif op == "delete":
            text = text[:i] + text[i + 1:]
        else:
            text = text[:i] + c + text[i + 1:]
    return text


@pytest.mark.slow
@FUZZ
@given(yaml_texts())
@example(GOOD_YAML)
def test_config_yaml_text_raises_only_config_error(tmp_path_factory, text):
    path = tmp_path_factory.getbasetemp() / "fuzz-text.yaml"
    path.write_text(text, encoding="utf-8")
    try:
        load_config(path)
    except ConfigError as exc:
        assert str(exc).startswith("fuzz-text.yaml")


# --- safetensors headers ------------------------------------------------------------------------

def _base_file() -> bytes:
    import tempfile

    tensors = {
        "w": torch.arange(12, dtype=torch.float32).view(3, 4),
        "b": torch.arange(5, dtype=torch.bfloat16),
        "ids": torch.arange(4, dtype=torch.int64).view(2, 2),
        "empty": torch.zeros(0, 3, dtype=torch.float16),
        "flag": torch.tensor([True, False]),
    }
    with tempfile.TemporaryDirectory() as d:
        save_file(tensors, f"{d}/m.safetensors", metadata={"format": "pt"})
        return Path(f"{d}/m.safetensors").read_bytes()


BASE = _base_file()
BASE_N = struct.unpack("<Q", BASE[:8])[0]
BASE_HEADER = json.loads(BASE[8:8 + BASE_N])
BASE_DATA = BASE[8 + BASE_N:]


@contextmanager
def opens_recorded():
    """Record the real path of every file opened (builtins.open, io.open, os.open)."""
    opened: list[str] = []
    real_open, real_os_open = builtins.open, os.open

    def rec_open(file, *args, **kwargs):
        if isinstance(file, str | bytes | os.PathLike):
            opened.append(os.path.realpath(os.fsdecode(file)))
        return real_open(file, *args, **kwargs)

    def rec_os_open(path, *args, **kwargs):
        opened.append(os.path.realpath(os.fsdecode(path)))
        return real_os_open(path, *args, **kwargs)

    with mock.patch.object(builtins, "open", rec_open), mock.patch.object(io, "open", rec_open), \
            mock.patch.object(os, "open", rec_os_open):
        yield opened


def check_open(folder: Path) -> None:
    """open_checkpoint succeeds or raises InputError; it only ever opens files in `folder`;
    on success every tensor lies inside its file's data and can be read."""
    root = os.path.realpath(folder)
    ckpt = None
    with opens_recorded() as opened:
        try:
            ckpt = open_checkpoint(folder, "fuzz")
        except InputError as exc:
            assert str(exc).startswith("fuzz: ")
        if ckpt is not None:
            try:
                for info in ckpt.tensors.values():
                    size = info.file.stat().st_size
                    n = struct.unpack("<Q", info.file.read_bytes()[:8])[0]
                    assert 8 + n <= info.offset <= info.offset + info.nbytes <= size, info
                    assert info.nbytes == info.numel * info.dtype.itemsize
                    x = ckpt.read(info, 0, info.numel)
                    assert x.numel() == info.numel
            finally:
                ckpt.close()
    outside = [p for p in opened if os.path.commonpath([root, p]) != root]
    assert outside == [], f"opened outside the model folder: {outside}"


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("fuzz-model")


def write_single(folder: Path, data: bytes) -> None:
    for p in folder.iterdir():
        p.unlink() if not p.is_dir() or p.is_symlink() else shutil.rmtree(p)
    (folder / "model.safetensors").write_bytes(data)


@st.composite
def byte_mutations(draw):
    """The valid file with its length field, bytes or end changed."""
    data = bytearray(BASE)
    kind = draw(st.sampled_from(["length", "flip", "truncate", "extend", "random", "splice"]))
    if kind == "length":
        n = draw(st.integers(0, 2**64 - 1) | st.integers(BASE_N - 16, BASE_N + 16)
                 | st.sampled_from([0, 1, 2**63, 2**64 - 1, len(BASE) - 8, len(BASE)]))
        data[:8] = struct.pack("<Q", max(0, min(n, 2**64 - 1)))
    elif kind == "flip":
        for _ in range(draw(st.integers(1, 6))):
            i = draw(st.integers(0, len(data) - 1))
            data[i] = draw(st.integers(0, 255))
    elif kind == "truncate":
        data = data[:draw(st.integers(0, len(data)))]
    elif kind == "extend":
        data += draw(st.binary(min_size=1, max_size=64))
    elif kind == "random":
        data = bytearray(draw(st.binary(max_size=300)))
    else:  # a slice of the JSON replaced by random text
        i = draw(st.integers(8, 8 + BASE_N))
        j = draw(st.integers(i, 8 + BASE_N))
        data[i:j] = draw(st.text(max_size=12)).encode()
    return bytes(data)


@pytest.mark.slow
@FUZZ
@given(byte_mutations())
def test_mutated_safetensors_bytes(folder, data):
    write_single(folder, data)
    check_open(folder)


ints = st.integers(-3, 40) | st.sampled_from([2**31, 2**62, 2**64, -2**63]) | st.integers()
json_scalars = (st.none() | st.booleans() | ints | st.floats(allow_nan=False)
                | st.text(max_size=6))
json_values = st.recursive(json_scalars, lambda inner: st.lists(inner, max_size=3)
                           | st.dictionaries(st.text(max_size=5), inner, max_size=3), max_leaves=6)
dtypes = st.sampled_from(["F32", "F16", "BF16", "F64", "I64", "I32", "I16", "I8", "U8", "BOOL",
                          "F8_E4M3", "U64", "f32", "", "C64"]) | json_values
shapes = st.lists(ints, max_size=4) | json_values
offsets = st.lists(ints, min_size=0, max_size=3) | st.tuples(ints, ints).map(list) | json_values


@st.composite
def header_mutations(draw, dtype_values=dtypes):
    """The valid header, parsed, with fields changed, then written back with a length field
    that is right (mostly) or off, and the data region kept, cut or grown."""
    header = json.loads(json.dumps(BASE_HEADER))
    names = [k for k in header if k != "__metadata__"]
    for _ in range(draw(st.integers(0, 3))):
        op = draw(st.sampled_from(["dtype", "shape", "offsets", "drop", "entry", "add", "meta",
                                   "swap", "shift"]))
        name = draw(st.sampled_from(names))
        entry = header.get(name)
        if not isinstance(entry, dict):
            entry = header[name] = {}
        if op == "dtype":
            entry["dtype"] = draw(dtype_values)
        elif op == "shape":
            entry["shape"] = draw(shapes)
        elif op == "offsets":
            entry["data_offsets"] = draw(offsets)
        elif op == "drop":
            entry.pop(draw(st.sampled_from(["dtype", "shape", "data_offsets"])), None)
        elif op == "entry":
            header[name] = draw(json_values)
        elif op == "add":
            header[draw(st.text(max_size=5))] = {
                "dtype": draw(dtype_values), "shape": draw(shapes),
                "data_offsets": draw(offsets)}
        elif op == "meta":
            header["__metadata__"] = draw(json_values)
        elif op == "swap":  # another tensor's offsets: overlapping or mis-sized
            other = header.get(draw(st.sampled_from(names)))
            if isinstance(other, dict) and "data_offsets" in other:
                entry["data_offsets"] = other["data_offsets"]
        else:  # shift both offsets
            off = entry.get("data_offsets")
            if isinstance(off, list) and all(type(o) is int for o in off):
                d = draw(st.integers(-64, 64))
                entry["data_offsets"] = [o + d for o in off]
    body = json.dumps(header).encode()
    body += b" " * draw(st.integers(0, 7))
    n = len(body) + draw(st.sampled_from([0] * 12 + [-1, 1, 8, -8]))
    data = BASE_DATA
    cut = draw(st.sampled_from(["keep"] * 6 + ["cut", "grow"]))
    if cut == "cut":
        data = data[:draw(st.integers(0, len(data)))]
    elif cut == "grow":
        data = data + bytes(draw(st.integers(1, 64)))
    return struct.pack("<Q", max(n, 0)) + body + data


@pytest.mark.slow
@FUZZ
@given(header_mutations())
def test_mutated_safetensors_headers(folder, data):
    write_single(folder, data)
    check_open(folder)


@pytest.mark.slow
@FUZZ
@given(st.dictionaries(st.text(max_size=6), json_values, max_size=4)
       | st.dictionaries(st.text(max_size=6), st.fixed_dictionaries(
           {"dtype": dtypes, "shape": shapes, "data_offsets": offsets}), max_size=4),
       st.binary(max_size=200))
def test_random_safetensors_headers(folder, header, data):
    body = json.dumps(header).encode()
    write_single(folder, struct.pack("<Q", len(body)) + body + data)
    check_open(folder)


# --- index files -------------------------------------------------------------------------------

SHARDS = {"a.safetensors": {"x": torch.ones(3), "y": torch.zeros(2, 2)},
          "b.safetensors": {"z": torch.arange(4, dtype=torch.int32)}}
PLACES = ["a.safetensors", "b.safetensors", "missing.safetensors", "link.safetensors",
          "dirlink.safetensors", "sub/c.safetensors", "sub", ".", "..", "", "./a.safetensors",
          "a.safetensors/..", "../outside.safetensors", "../../outside.safetensors", "@ABS",
          "@ABS_INSIDE", "/etc/passwd", "a.safetensors\x00", "..\\outside.safetensors",
          "C:\\outside.safetensors", "model.safetensors.index.json", "~/outside.safetensors",
          "%2e%2e/outside.safetensors"]


@pytest.fixture(scope="module")
def sharded(tmp_path_factory) -> Path:
    """A folder with two good shards, a subfolder, and links out to a valid file outside."""
    base = tmp_path_factory.mktemp("fuzz-index")
    folder = base / "model"
    (folder / "sub").mkdir(parents=True)
    for name, tensors in SHARDS.items():
        save_file(tensors, str(folder / name))
    save_file({"x": torch.ones(3)}, str(folder / "sub" / "c.safetensors"))
    save_file({"x": torch.ones(3), "y": torch.zeros(2, 2), "z": torch.zeros(4, dtype=torch.int32)},
              str(base / "outside.safetensors"))
    (base / "outdir").mkdir()
    (folder / "link.safetensors").symlink_to(base / "outside.safetensors")
    (folder / "dirlink.safetensors").symlink_to(base / "outdir")
    return folder


def place(value, folder: Path):
    if value == "@ABS":
        return str(folder.parent / "outside.safetensors")
    if value == "@ABS_INSIDE":
        return str(folder / "a.safetensors")
    return value


hashable_scalars = st.none() | st.booleans() | ints | st.floats() | st.text(max_size=8)
index_values = st.sampled_from(PLACES) | hashable_scalars | json_values
index_names = st.sampled_from(["x", "y", "z", "w", "", "__metadata__"]) | st.text(max_size=5)


@st.composite
def index_documents(draw, values=index_values):
    kind = draw(st.integers(0, 9))
    if kind == 0:
        return draw(json_values)
    if kind == 1:  # not a mapping of names
        return {"weight_map": draw(json_scalars | st.lists(json_values, max_size=3))}
    doc = {"weight_map": draw(st.dictionaries(index_names, values, max_size=5))}
    if draw(st.booleans()):
        doc["metadata"] = draw(json_values)
    return doc


def write_index(folder: Path, doc) -> None:
    def resolve(v):
        return place(v, folder) if isinstance(v, str) else v

    if isinstance(doc, dict) and isinstance(doc.get("weight_map"), dict):
        doc = dict(doc, weight_map={k: resolve(v) for k, v in doc["weight_map"].items()})
    (folder / "model.safetensors.index.json").write_text(json.dumps(doc))


@pytest.mark.slow
@FUZZ
@given(index_documents())
@example({"weight_map": {"x": "a.safetensors", "y": "a.safetensors", "z": "b.safetensors"}})
@example({"weight_map": {"x": "link.safetensors"}})
@example({"weight_map": {"x": "@ABS"}})
@example({"weight_map": {"x": "../outside.safetensors"}})
@example({"weight_map": {"x": "dirlink.safetensors"}})
def test_index_files(sharded, doc):
    write_index(sharded, doc)
    check_open(sharded)


@pytest.mark.slow
@FUZZ
@given(st.binary(max_size=200) | st.text(max_size=200).map(str.encode))
def test_index_bytes(sharded, data):
    (sharded / "model.safetensors.index.json").write_bytes(data)
    check_open(sharded)


def test_index_symlink_leading_outside(sharded):
    outside = sharded.parent / "outside-index.json"
    outside.write_text(json.dumps({"weight_map": {"x": "a.safetensors"}}))
    index = sharded / "model.safetensors.index.json"
    index.unlink(missing_ok=True)
    index.symlink_to(outside)
    try:
        with opens_recorded() as opened, pytest.raises(InputError, match="outside"):
            open_checkpoint(sharded, "fuzz")
        assert str(outside.resolve()) not in opened
    finally:
        index.unlink()


# --- crashes found by fuzzing, fixed ------------------------------------------------------------

def header_with(name: str, **fields) -> bytes:
    header = json.loads(json.dumps(BASE_HEADER))
    header[name].update(fields)
    body = json.dumps(header).encode()
    return struct.pack("<Q", len(body)) + body + BASE_DATA


@pytest.mark.parametrize("dtype", [["F32"], {"F32": 1}], ids=["list", "object"])
def test_unhashable_dtype(folder, dtype):
    write_single(folder, header_with("w", dtype=dtype))
    check_open(folder)


@pytest.mark.parametrize("value", [["a.safetensors"], {"file": "a.safetensors"}],
                         ids=["list", "object"])
def test_unhashable_index_values(sharded, value):
    write_index(sharded, {"weight_map": {"x": value}})
    check_open(sharded)


@pytest.mark.parametrize("where", ["header", "index"])
def test_deeply_nested_json(folder, sharded, where):
    deep = b"[" * 100_000 + b"]" * 100_000
    if where == "header":
        write_single(folder, struct.pack("<Q", len(deep)) + deep)
        check_open(folder)
    else:
        (sharded / "model.safetensors.index.json").write_bytes(b'{"weight_map": ' + deep + b"}")
        check_open(sharded)
