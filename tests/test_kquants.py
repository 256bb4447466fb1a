"""K-quants (Q2_K … Q6_K) against ggml itself: tests/ggml/kquants.npz holds fixed inputs, the
bytes ggml's quantize_q*_K writes for them and the values its dequantize_row_q*_K reads back
(made by tests/ggml/make_fixtures.py from llama.cpp's ggml-quants.c, as vendored by
llama-cpp-python 0.3.36; how to remake them is written there)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from loratool.errors import FormatError
from loratool.headers.gguf import byte_size
from loratool.headers.safetensors import TensorInfo
from loratool.numerics.kquants import BLOCK_BYTES, QK_K, nearest_int
from loratool.numerics.quant import dequantize, quantize

FIXTURES = np.load(Path(__file__).parent / "ggml" / "kquants.npz")
TYPES = list(BLOCK_BYTES)


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
    assert got.shape[1] == x.shape[1] // QK_K * BLOCK_BYTES[type_name]
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
    header's; a row of partial super-blocks is refused with the block size named."""
    x = torch.from_numpy(FIXTURES["input"][:6]).reshape(2, 3, 512)
    data = quantize(x, type_name)
    assert data == quantize(x.reshape(6, 512), type_name)
    assert len(data) == byte_size((2, 3, 512), type_name)
    with pytest.raises(FormatError, match="blocks of 256"):
        quantize(torch.zeros(2, 320), type_name)


def test_nearest_int_is_round_half_to_even():
    """ggml's rounding (add 1.5·2²³, read the bits): halves go to the even neighbour."""
    v = torch.tensor([0.5, 1.5, 2.5, -0.5, -1.5, 0.49999997, 4194303.0, -7.5])
    assert nearest_int(v).tolist() == [0.0, 2.0, 2.0, -0.0, -2.0, 0.0, 4194303.0, -8.0]
