"""K-quants (Q2_K … Q6_K), IQ4_NL and IQ4_XS against ggml itself: tests/ggml/kquants.npz holds
fixed inputs, the bytes ggml's quantize_q*_K / quantize_iq4_* write for them and the values its
dequantize_row_* reads back (made by tests/ggml/make_fixtures.py from llama.cpp's
ggml-quants.c, as vendored by llama-cpp-python 0.3.36; how to remake them is written there)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from loratool.errors import FormatError
from loratool.headers.gguf import byte_size
from loratool.headers.safetensors import TensorInfo
from loratool.numerics.iquants import QUANTIZERS as IQ_TYPES
from loratool.numerics.kquants import BLOCK_BYTES, nearest_int
from loratool.numerics.quant import dequantize, quantize

FIXTURES = np.load(Path(__file__).parent / "ggml" / "kquants.npz")
TYPES = [*BLOCK_BYTES, *IQ_TYPES]
BLOCK = {t: 32 if t == "IQ4_NL" else 256 for t in TYPES}  # values per block


def _rows(data: bytes, type_name: str, n: int) -> np.ndarray:
    return np.frombuffer(data, dtype=np.uint8).reshape(n, -1)


@pytest.mark.parametrize("type_name", TYPES)
def test_quantize_gives_ggmls_bytes(type_name):
    """Every row (typical weights, outliers, one-signed rows, zero, constant and tiny
    sub-blocks, ties, bfloat16 values) is ggml's bytes exactly; compared row by row so that a
    failure names the input that differs."""
    x = torch.from_numpy(FIXTURES["input"])
    want = FIXTURES[type_name].reshape(x.shape[0], -1)
    got = _rows(quantize(x, type_name), type_name, x.shape[0])
    assert got.size == byte_size(tuple(x.shape), type_name)
    differ = [i for i in range(x.shape[0]) if not np.array_equal(got[i], want[i])]
    assert differ == []


@pytest.mark.parametrize("type_name", TYPES)
def test_dequantize_gives_ggmls_values(type_name):
    """What the merge starts from: ggml's bytes read back as ggml reads them, bit for bit."""
    x = FIXTURES["input"]
    raw = FIXTURES[type_name].tobytes()
    info = TensorInfo("t", type_name, x.shape, len(raw), 0)
    got = dequantize(raw, info).numpy()
    want = FIXTURES[f"{type_name}.dequantized"].reshape(x.shape)
    assert np.array_equal(got.view(np.uint32), want.view(np.uint32))


@pytest.mark.parametrize("type_name", TYPES)
def test_any_shape_of_whole_super_blocks(type_name):
    """A 3-D tensor (experts) quantizes row by row as its 2-D view does; the byte count is the
    header's; a row of partial blocks is refused with the block size named."""
    x = torch.from_numpy(FIXTURES["input"][:6]).reshape(2, 3, 512)
    data = quantize(x, type_name)
    assert data == quantize(x.reshape(6, 512), type_name)
    assert len(data) == byte_size((2, 3, 512), type_name)
    block = BLOCK[type_name]
    with pytest.raises(FormatError, match=f"blocks of {block}"):
        quantize(torch.zeros(2, block + block // 4), type_name)


def test_nearest_int_is_round_half_to_even():
    """ggml's rounding (add 1.5·2²³, read the bits): halves go to the even neighbour."""
    v = torch.tensor([0.5, 1.5, 2.5, -0.5, -1.5, 0.49999997, 4194303.0, -7.5])
    assert nearest_int(v).tolist() == [0.0, 2.0, 2.0, -0.0, -2.0, 0.0, 4194303.0, -8.0]


@pytest.mark.parametrize("type_name", TYPES)
def test_quantize_with_an_importance_matrix_gives_ggmls_bytes(type_name):
    """quantize_q*_K / quantize_iq4_* with quant_weights (what llama-quantize --imatrix
    calls): the same importance for every row, one weight per column, some zero."""
    x = torch.from_numpy(FIXTURES["input"])
    im = torch.from_numpy(FIXTURES["imatrix"])
    want = FIXTURES[f"{type_name}.imatrix"].reshape(x.shape[0], -1)
    got = _rows(quantize(x, type_name, im), type_name, x.shape[0])
    differ = [i for i in range(x.shape[0]) if not np.array_equal(got[i], want[i])]
    assert differ == []
    assert not np.array_equal(got, FIXTURES[type_name].reshape(x.shape[0], -1))  # it mattered


# --------------------------------------------------------------------------- imatrix files

def write_imatrix_gguf(path: Path, entries: dict[str, tuple[np.ndarray, np.ndarray]],
                       metadata: bool = True) -> None:
    """An importance matrix as llama-imatrix writes one (tools/imatrix/imatrix.cpp): per
    tensor ``<name>.in_sum2`` [experts, columns] and ``<name>.counts`` [experts, 1], F32."""
    import gguf

    w = gguf.GGUFWriter(str(path), arch="imatrix")
    w.add_string("general.type", "imatrix")
    if metadata:
        w.add_array("imatrix.datasets", ["wiki.train.raw"])
        w.add_uint32("imatrix.chunk_count", 100)
        w.add_uint32("imatrix.chunk_size", 512)
    for name, (sums, counts) in entries.items():
        w.add_tensor(f"{name}.in_sum2", sums.astype(np.float32))
        w.add_tensor(f"{name}.counts", counts.astype(np.float32).reshape(-1, 1))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def write_imatrix_dat(path: Path, entries: dict[str, tuple[int, np.ndarray]]) -> None:
    """The legacy format: count; per entry name length, name, ncall, nval, values; trailer."""
    import struct

    out = struct.pack("<i", len(entries))
    for name, (ncall, values) in entries.items():
        b = name.encode()
        out += struct.pack("<i", len(b)) + b + struct.pack("<ii", ncall, len(values))
        out += values.astype(np.float32).tobytes()
    out += struct.pack("<i", 100) + struct.pack("<i", 4) + b"wiki"
    path.write_bytes(out)


def test_imatrix_files_are_read_as_llama_quantize_reads_them(tmp_path):
    """GGUF: each expert's sums divided by its count in float32, 1 where the count is 0;
    legacy .dat: the sums divided by the call count."""
    from loratool.io.imatrix import read_imatrix

    rng = np.random.default_rng(0)
    sums = rng.uniform(0, 50, (3, 512)).astype(np.float32)
    write_imatrix_gguf(tmp_path / "im.gguf", {"blk.0.ffn_up_exps.weight": (sums, np.array(
        [7.0, 0.0, 1234.0])), "blk.0.attn_q.weight": (sums[:1], np.array([3.0]))})
    im = read_imatrix(tmp_path / "im.gguf")
    got = im.entries["blk.0.ffn_up_exps.weight"].numpy().reshape(3, 512)
    assert np.array_equal(got[0], sums[0] / np.float32(7))
    assert np.array_equal(got[1], np.ones(512, np.float32))
    assert np.array_equal(got[2], sums[2] / np.float32(1234))
    assert im.chunks == 100 and im.datasets == ["wiki.train.raw"] and not im.legacy
    assert im.for_tensor("blk.0.ffn_up_exps.weight", (3, 64, 512)).shape == (3, 1, 512)
    with pytest.raises(FormatError, match="was it computed for this model"):
        im.for_tensor("blk.0.attn_q.weight", (64, 256))

    write_imatrix_dat(tmp_path / "im.dat", {"blk.0.attn_q.weight": (9, sums[0])})
    dat = read_imatrix(tmp_path / "im.dat")
    assert np.array_equal(dat.entries["blk.0.attn_q.weight"].numpy(), sums[0] / np.float32(9))
    assert dat.legacy and dat.chunks == 100 and dat.datasets == ["wiki"]


@pytest.mark.parametrize("damage, says", [
    ("truncated", "past the end|ends inside"), ("garbage", "not an importance matrix"),
    ("nan", "non-finite"), ("no metadata", "llama-quantize reads"),
])
def test_a_bad_imatrix_file_is_one_line(tmp_path, damage, says):
    from loratool.io.imatrix import read_imatrix

    path = tmp_path / "im"
    values = np.ones(256, np.float32)
    if damage == "truncated":
        write_imatrix_dat(path, {"blk.0.attn_q.weight": (1, values)})
        path.write_bytes(path.read_bytes()[:200])
    elif damage == "garbage":
        path.write_bytes(b"\xff\xff\xff\x7f" + bytes(64))
    elif damage == "nan":
        write_imatrix_dat(path, {"blk.0.attn_q.weight": (1, np.full(256, np.nan))})
    else:
        write_imatrix_gguf(path, {"blk.0.attn_q.weight": (values[None], np.ones(1))}, False)
    with pytest.raises(FormatError, match=says):
        read_imatrix(path)


def test_iq4_level_index_is_ggmls_binary_search():
    """IQ4's nearest level as ggml's best_index_int8 finds it (a scalar binary search, written
    out here as C has it): on every level, every midpoint between two (a tie goes up), just
    either side of them, beyond both ends, ±inf and NaN."""
    from loratool.numerics.iquants import LEVELS, best_index

    val = [int(v) for v in LEVELS]

    def ggml(x: float) -> int:
        if x <= val[0]:
            return 0
        if x >= val[-1]:
            return len(val) - 1
        ml, mu = 0, len(val) - 1
        while mu - ml > 1:
            mav = (ml + mu) // 2
            if x < val[mav]:
                mu = mav
            else:
                ml = mav
        a, b = np.float32(x) - np.float32(val[mu - 1]), np.float32(val[mu]) - np.float32(x)
        return mu - 1 if a < b else mu

    mids = [(a + b) / 2 for a, b in zip(val, val[1:])]
    xs = np.array(val + mids + [-200.0, 200.0, np.inf, -np.inf], dtype=np.float32)
    xs = np.concatenate([xs, np.nextafter(xs, np.inf), np.nextafter(xs, -np.inf),
                         np.random.default_rng(3).uniform(-140, 140, 500).astype(np.float32)])
    got = best_index(torch.from_numpy(xs)).tolist()
    assert got == [ggml(float(x)) for x in xs]
    assert best_index(torch.tensor([float("nan")])).tolist() == [15]
