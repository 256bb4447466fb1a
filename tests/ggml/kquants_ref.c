// Reference K-quant and IQ4_NL/IQ4_XS bytes from ggml's own quantizer (ggml-quants.c, llama.cpp as vendored by
// llama-cpp-python 0.3.36), for loratool's tests. Reads float32 rows from stdin, writes the
// quantized bytes of each type to stdout (TYPE negative: reads those bytes, writes the float32
// values ggml's dequantize_row_* gives). Usage: kquants_ref TYPE NROW NCOL [imatrix.f32] < in > out
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <stdint.h>
#include "ggml.h"
size_t quantize_q2_K(const float*, void*, int64_t, int64_t, const float*);
size_t quantize_q3_K(const float*, void*, int64_t, int64_t, const float*);
size_t quantize_q4_K(const float*, void*, int64_t, int64_t, const float*);
size_t quantize_q5_K(const float*, void*, int64_t, int64_t, const float*);
size_t quantize_q6_K(const float*, void*, int64_t, int64_t, const float*);
size_t quantize_iq4_nl(const float*, void*, int64_t, int64_t, const float*);
size_t quantize_iq4_xs(const float*, void*, int64_t, int64_t, const float*);
void dequantize_row_q2_K(const void*, float*, int64_t);
void dequantize_row_q3_K(const void*, float*, int64_t);
void dequantize_row_q4_K(const void*, float*, int64_t);
void dequantize_row_q5_K(const void*, float*, int64_t);
void dequantize_row_q6_K(const void*, float*, int64_t);
void dequantize_row_iq4_nl(const void*, float*, int64_t);
void dequantize_row_iq4_xs(const void*, float*, int64_t);
static size_t bsize(int t) { switch (t) { case GGML_TYPE_Q2_K: return 84; case GGML_TYPE_Q3_K: return 110;
  case GGML_TYPE_Q4_K: return 144; case GGML_TYPE_Q5_K: return 176; case GGML_TYPE_Q6_K: return 210;
  case GGML_TYPE_IQ4_NL: return 8 * 18; case GGML_TYPE_IQ4_XS: return 136; } abort(); }  // bytes per 256 values
size_t ggml_row_size(enum ggml_type t, int64_t ne) { return bsize(t) * (ne / 256); }
size_t ggml_type_size(enum ggml_type t) { return t == GGML_TYPE_IQ4_NL ? 18 : bsize(t); }
const char * ggml_type_name(enum ggml_type t) { (void)t; return "?"; }
void ggml_abort(const char * f, int l, const char * fmt, ...) { fprintf(stderr, "abort %s:%d %s\n", f, l, fmt); abort(); }
int main(int argc, char ** argv) {
  int t = atoi(argv[1]); long nrow = atol(argv[2]), ncol = atol(argv[3]);
  if (t < 0) {
    size_t nq = bsize(-t) * nrow * (ncol / 256); void * q = malloc(nq); float * y = malloc(4 * nrow * ncol);
    if (fread(q, 1, nq, stdin) != nq) return 2;
    switch (-t) { case GGML_TYPE_Q2_K: dequantize_row_q2_K(q, y, nrow * ncol); break;
      case GGML_TYPE_Q3_K: dequantize_row_q3_K(q, y, nrow * ncol); break;
      case GGML_TYPE_Q4_K: dequantize_row_q4_K(q, y, nrow * ncol); break;
      case GGML_TYPE_Q5_K: dequantize_row_q5_K(q, y, nrow * ncol); break;
      case GGML_TYPE_Q6_K: dequantize_row_q6_K(q, y, nrow * ncol); break;
      case GGML_TYPE_IQ4_NL: dequantize_row_iq4_nl(q, y, nrow * ncol); break;
      case GGML_TYPE_IQ4_XS: dequantize_row_iq4_xs(q, y, nrow * ncol); break; default: return 5; }
    fwrite(y, 4, nrow * ncol, stdout); return 0;
  }
  float * x = malloc(sizeof(float) * nrow * ncol); float * qw = NULL;
  if (fread(x, sizeof(float), nrow * ncol, stdin) != (size_t)(nrow * ncol)) return 2;
  if (argc > 4) { FILE * f = fopen(argv[4], "rb"); qw = malloc(sizeof(float) * ncol);
    if (fread(qw, sizeof(float), ncol, f) != (size_t)ncol) return 3; fclose(f); }
  size_t n = bsize(t) * nrow * (ncol / 256); void * out = malloc(n); size_t got = 0;
  switch (t) { case GGML_TYPE_Q2_K: got = quantize_q2_K(x, out, nrow, ncol, qw); break;
    case GGML_TYPE_Q3_K: got = quantize_q3_K(x, out, nrow, ncol, qw); break;
    case GGML_TYPE_Q4_K: got = quantize_q4_K(x, out, nrow, ncol, qw); break;
    case GGML_TYPE_Q5_K: got = quantize_q5_K(x, out, nrow, ncol, qw); break;
    case GGML_TYPE_Q6_K: got = quantize_q6_K(x, out, nrow, ncol, qw); break;
    case GGML_TYPE_IQ4_NL: got = quantize_iq4_nl(x, out, nrow, ncol, qw); break;
    case GGML_TYPE_IQ4_XS: got = quantize_iq4_xs(x, out, nrow, ncol, qw); break; }
  if (got != n) return 4;
  fwrite(out, 1, n, stdout); return 0;
}
