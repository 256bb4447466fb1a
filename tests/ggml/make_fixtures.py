"""Makes tests/ggml/kquants.npz: fixed float32 inputs, the bytes ggml's own quantizer writes
for them in each K-quant type and in IQ4_NL and IQ4_XS, without and with an importance matrix
(one weight per column, as llama-quantize passes an imatrix entry), and the values ggml's
dequantizer reads back from those bytes — the reference tests/test_kquants.py compares with.

The bytes come from ggml-quants.c of llama.cpp as vendored in llama-cpp-python 0.3.36 (PyPI
sdist, vendor/llama.cpp/ggml/src/ggml-quants.c), compiled as ggml builds it (ggml-base: no
-march, so no fused multiply-adds) and called through quantize_q*_K and quantize_iq4_nl/_xs, the
functions llama-quantize calls (kquants_ref.c). To remake them:

    pip download --no-deps --no-binary :all: llama-cpp-python==0.3.36
    tar xzf llama_cpp_python-0.3.36.tar.gz && G=llama_cpp_python-0.3.36/vendor/llama.cpp/ggml
    gcc -O3 -std=gnu11 -DNDEBUG -I$G/include -I$G/src -I$G/src/ggml-cpu \
        -c $G/src/ggml-quants.c -o q.o
    gcc -O3 -std=gnu11 -I$G/include tests/ggml/kquants_ref.c q.o -lm -o kquants_ref
    python tests/ggml/make_fixtures.py ./kquants_ref
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np

TYPES = {"Q2_K": 10, "Q3_K": 11, "Q4_K": 12, "Q5_K": 13, "Q6_K": 14, "IQ4_NL": 20, "IQ4_XS": 23}
COLS = 512  # two super-blocks per row


def inputs() -> np.ndarray:
    """Rows that reach every branch of ggml's search: typical weights, heavy tails and
    outliers, one-signed rows (no minimum to subtract), constant, zero and all-but-zero
    sub-blocks, values below ggml's all-zero threshold, exact ties, bfloat16-rounded values."""
    rng = np.random.default_rng(20261205)
    rows = [rng.normal(0, s, COLS) for s in (0.02, 1.0, 300.0)]
    rows += [rng.standard_t(2, COLS) * 0.05, rng.standard_t(1, COLS)]
    spiky = rng.normal(0, 0.02, COLS)
    spiky[rng.integers(0, COLS, 6)] = [3.0, -4.0, 2.5, -0.9, 7.0, -7.0]
    rows += [spiky, np.abs(rng.normal(0, 1, COLS)) + 0.5, -np.abs(rng.normal(0, 1, COLS)) - 1]
    part = rng.normal(0, 1, COLS)
    part[:32] = 0.0
    part[64:96] = 0.25
    part[256:272] = -1.5
    part[300:316] = 1e-20
    rows += [part, np.full(COLS, 0.125), np.zeros(COLS), rng.normal(0, 1, COLS) * 1e-17]
    rows += [rng.integers(-8, 8, COLS).astype(np.float64),
             rng.integers(-2, 3, COLS) * 0.5, rng.uniform(-1, 1, COLS) ** 9]
    bf16 = rng.normal(0, 0.03, (4, COLS)).astype(np.float32).view(np.uint32) & 0xFFFF0000
    rows += list(bf16.view(np.float32).astype(np.float64))
    sparse = np.where(rng.uniform(size=COLS) < 0.1, rng.normal(0, 1, COLS), 0.0)
    rows += [sparse, rng.normal(5.0, 0.01, COLS), rng.normal(0, 1, COLS) * np.linspace(0, 9, COLS)]
    return np.stack(rows).astype(np.float32)


def importance() -> np.ndarray:
    """One importance per column, as an imatrix entry holds (mean squared activations): spread
    over six orders of magnitude, with a few columns never active (0) and one whole sub-block."""
    rng = np.random.default_rng(7)
    im = np.exp(rng.normal(0, 2.5, COLS))
    im[rng.integers(0, COLS, 12)] = 0.0
    im[288:304] = 0.0
    return im.astype(np.float32)


def main(ref: str) -> None:
    x, im = inputs(), importance()
    out = {"input": x, "imatrix": im}
    path = Path(__file__).with_name("imatrix.f32")
    path.write_bytes(im.tobytes())
    for name, code in TYPES.items():
        done = subprocess.run([ref, str(code), str(x.shape[0]), str(COLS)], input=x.tobytes(),
                              capture_output=True, check=True)
        out[name] = np.frombuffer(done.stdout, dtype=np.uint8)
        weighted = subprocess.run([ref, str(code), str(x.shape[0]), str(COLS), str(path)],
                                  input=x.tobytes(), capture_output=True, check=True)
        out[f"{name}.imatrix"] = np.frombuffer(weighted.stdout, dtype=np.uint8)
        back = subprocess.run([ref, str(-code), str(x.shape[0]), str(COLS)], input=done.stdout,
                              capture_output=True, check=True)
        out[f"{name}.dequantized"] = np.frombuffer(back.stdout, dtype=np.float32)
    path.unlink()
    np.savez_compressed(Path(__file__).with_name("kquants.npz"), **out)


if __name__ == "__main__":
    main(sys.argv[1])
