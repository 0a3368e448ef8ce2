// openseek's CPU kernels for quantised weights, on float32 activations with float32 accumulation; loaded by
// cpu_kernels.py. int4_mm / int4_mm_indexed: y = x W^T for weight-only int4 matrices in PyTorch's CPU int4 layout
// (torch._convert_weight_to_int4pack_for_cpu, what quant.py stores). int8_head_mm: MLA's absorbed per-head products
// on a quantised wkv_b's int values.
//
// The int4 layout: rows in blocks of 64, each block stored column-major, byte (k, j) holding row j in its low nibble
// and row j + 32 in its high one; a last partial block of 16, 32 or 48 rows pairs adjacent rows instead. Scales
// (G, O', 2) bf16: (scale, zero) per group of `group` columns and row, zero 0 (quantisation is symmetric) and not
// read. A nibble u stands for u - 8.
//
// Why kernels of our own (bench/results/int4_kernel.txt): PyTorch's int4 kernel reads one row at 9-19 GB/s and takes
// it in bf16; int4_mm reads up to 1.2x faster at one row, as fast at four, in float32, and int4_mm_indexed runs a
// step's expert pairs in one call.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cstdint>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace {

constexpr int64_t BLOCK = 64;  // rows per block of the layout

// Rows of one block for one row of x, in plain loops (the partial block, and machines without AVX-512): P bytes a
// column, byte j holding rows lo(j) and hi(j), which are j and j + P, or 2j and 2j + 1 when `adjacent`.
template <int P>
void block_rows(const uint8_t* w, const float* x, const at::BFloat16* scale, int64_t I, int64_t group, int64_t O_pad,
                int64_t row0, bool adjacent, float* y) {
  float out_lo[P] = {}, out_hi[P] = {};
  for (int64_t k0 = 0; k0 < I; k0 += group) {
    float acc_lo[P] = {}, acc_hi[P] = {};
    for (int64_t k = k0; k < k0 + group; ++k) {
      const uint8_t* b = w + k * P;
      for (int j = 0; j < P; ++j) {
        acc_lo[j] += static_cast<float>((b[j] & 15) - 8) * x[k];
        acc_hi[j] += static_cast<float>((b[j] >> 4) - 8) * x[k];
      }
    }
    const at::BFloat16* s = scale + ((k0 / group) * O_pad + row0) * 2;
    for (int j = 0; j < P; ++j) {
      out_lo[j] += static_cast<float>(s[2 * (adjacent ? 2 * j : j)]) * acc_lo[j];
      out_hi[j] += static_cast<float>(s[2 * (adjacent ? 2 * j + 1 : j + P)]) * acc_hi[j];
    }
  }
  for (int j = 0; j < P; ++j) {
    y[adjacent ? 2 * j : j] = out_lo[j];
    y[adjacent ? 2 * j + 1 : j + P] = out_hi[j];
  }
}

#if defined(__AVX512F__)
// A full block for MT rows of x: a column's 32 bytes become its 64 weights through a 16-entry table (vpermps reads
// an index's low 4 bits, so the low nibble needs no mask), then 4 FMAs per row of x. Each row of x sees the same
// operations in the same order whatever MT is: a row's result does not depend on the batch around it.
template <int MT>
void block64_avx512(const uint8_t* w, const float* x, int64_t I, const at::BFloat16* scale, int64_t group,
                    int64_t O_pad, int64_t row0, float* y) {
  const __m512 table = _mm512_setr_ps(-8, -7, -6, -5, -4, -3, -2, -1, 0, 1, 2, 3, 4, 5, 6, 7);
  __m512 out[MT][4];
  for (int m = 0; m < MT; ++m)
    for (int r = 0; r < 4; ++r) out[m][r] = _mm512_setzero_ps();
  for (int64_t k0 = 0; k0 < I; k0 += group) {
    __m512 acc[MT][4];
    for (int m = 0; m < MT; ++m)
      for (int r = 0; r < 4; ++r) acc[m][r] = _mm512_setzero_ps();
    for (int64_t k = k0; k < k0 + group; ++k) {
      const __m256i b = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + k * 32));
      const __m512i b0 = _mm512_cvtepu8_epi32(_mm256_castsi256_si128(b));  // bytes 0-15: rows 0-15 and 32-47
      const __m512i b1 = _mm512_cvtepu8_epi32(_mm256_extracti128_si256(b, 1));  // rows 16-31 and 48-63
      const __m512 w_r[4] = {_mm512_permutexvar_ps(b0, table), _mm512_permutexvar_ps(b1, table),
                             _mm512_permutexvar_ps(_mm512_srli_epi32(b0, 4), table),
                             _mm512_permutexvar_ps(_mm512_srli_epi32(b1, 4), table)};
      for (int m = 0; m < MT; ++m) {
        const __m512 x_k = _mm512_set1_ps(x[m * I + k]);
        for (int r = 0; r < 4; ++r) acc[m][r] = _mm512_fmadd_ps(w_r[r], x_k, acc[m][r]);
      }
    }
    // a (scale, zero) bf16 pair read as one 32-bit word: shifted left 16, it is the scale as a float32
    const int32_t* s = reinterpret_cast<const int32_t*>(scale + ((k0 / group) * O_pad + row0) * 2);
    for (int r = 0; r < 4; ++r) {
      const __m512 s_r = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_loadu_si512(s + 16 * r), 16));
      for (int m = 0; m < MT; ++m) out[m][r] = _mm512_fmadd_ps(acc[m][r], s_r, out[m][r]);
    }
  }
  for (int m = 0; m < MT; ++m)
    for (int r = 0; r < 4; ++r) _mm512_storeu_ps(y + m * O_pad + 16 * r, out[m][r]);
}
#endif

// One block of rows for all M rows of x.
void block(const uint8_t* w, const float* x, int64_t M, int64_t I, const at::BFloat16* scale, int64_t group,
           int64_t O_pad, int64_t row0, float* y) {
  const int64_t rows = std::min(BLOCK, O_pad - row0);
  int64_t m = 0;
#if defined(__AVX512F__)
  if (rows == BLOCK) {
    for (; m + 4 <= M; m += 4) block64_avx512<4>(w, x + m * I, I, scale, group, O_pad, row0, y + m * O_pad);
    for (; m < M; ++m) block64_avx512<1>(w, x + m * I, I, scale, group, O_pad, row0, y + m * O_pad);
  }
#endif
  for (; m < M; ++m) {
    const float* x_m = x + m * I;
    float* y_m = y + m * O_pad;
    if (rows == 64) block_rows<32>(w, x_m, scale, I, group, O_pad, row0, false, y_m);
    else if (rows == 48) block_rows<24>(w, x_m, scale, I, group, O_pad, row0, true, y_m);
    else if (rows == 32) block_rows<16>(w, x_m, scale, I, group, O_pad, row0, true, y_m);
    else block_rows<8>(w, x_m, scale, I, group, O_pad, row0, true, y_m);
  }
}

// Checks x (M, I) against a stack of E weights qweight (E, O', I/2) uint8 with scales (E, G, O', 2) bf16 and
// returns x as contiguous float32.
at::Tensor checked_input(const char* op, const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scale,
                         int64_t group) {
  TORCH_CHECK(x.dim() == 2 && qweight.dim() == 3 && scale.dim() == 4 && scale.size(3) == 2,
              op, ": expected x (M, I), qweight ([E,] O', I/2), scale ([E,] G, O', 2)");
  TORCH_CHECK(qweight.scalar_type() == at::kByte && scale.scalar_type() == at::kBFloat16, op,
              ": expected uint8 qweight and bfloat16 scale, got ", qweight.scalar_type(), " and ", scale.scalar_type());
  const int64_t I = x.size(1), O_pad = qweight.size(1);
  TORCH_CHECK(O_pad % 16 == 0 && group > 0 && I % group == 0 && qweight.size(2) * 2 == I && scale.size(1) * group == I &&
                  scale.size(2) == O_pad && scale.size(0) == qweight.size(0),
              op, ": shapes do not match: x ", x.sizes(), ", qweight ", qweight.sizes(), ", scale ", scale.sizes(),
              ", group ", group);
  return x.to(at::kFloat).contiguous();
}

// x (M, I) float32 or bf16, qweight (O', I/2) uint8, scale (G, O', 2) bf16 -> x W^T (M, O') float32.
at::Tensor int4_mm(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scale, int64_t group) {
  const at::Tensor x_f = checked_input("int4_mm", x, qweight.unsqueeze(0), scale.unsqueeze(0), group);
  const at::Tensor w = qweight.contiguous(), s = scale.contiguous();
  const int64_t M = x_f.size(0), I = x_f.size(1), O_pad = w.size(0);
  at::Tensor y = at::empty({M, O_pad}, x_f.options());
  const uint8_t* w_p = w.data_ptr<uint8_t>();
  const float* x_p = x_f.data_ptr<float>();
  const at::BFloat16* s_p = s.data_ptr<at::BFloat16>();
  float* y_p = y.data_ptr<float>();
  const int64_t blocks = (O_pad + BLOCK - 1) / BLOCK;
  at::parallel_for(0, blocks, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b)
      block(w_p + b * BLOCK * (I / 2), x_p, M, I, s_p, group, O_pad, b * BLOCK, y_p + b * BLOCK);
  });
  return y;
}

// Row m of x times matrix ids[m] of a stack: x (M, I), qweight (E, O', I/2), scale (E, G, O', 2), ids (M,) int64
// -> (M, O') float32. Routed experts' (token, expert) pairs in one call, all their blocks in one parallel loop.
at::Tensor int4_mm_indexed(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scale,
                           const at::Tensor& ids, int64_t group) {
  const at::Tensor x_f = checked_input("int4_mm_indexed", x, qweight, scale, group);
  const int64_t M = x_f.size(0), I = x_f.size(1), E = qweight.size(0), O_pad = qweight.size(1);
  TORCH_CHECK(ids.dim() == 1 && ids.size(0) == M && ids.scalar_type() == at::kLong,
              "int4_mm_indexed: expected ids (M,) int64 with M = ", M, ", got ", ids.sizes(), " ", ids.scalar_type());
  const at::Tensor w = qweight.contiguous(), s = scale.contiguous(), ids_c = ids.contiguous();
  const int64_t* id_p = ids_c.data_ptr<int64_t>();
  for (int64_t m = 0; m < M; ++m)
    TORCH_CHECK(0 <= id_p[m] && id_p[m] < E, "int4_mm_indexed: ids[", m, "] = ", id_p[m], " is not in [0, ", E, ")");
  at::Tensor y = at::empty({M, O_pad}, x_f.options());
  const uint8_t* w_p = w.data_ptr<uint8_t>();
  const float* x_p = x_f.data_ptr<float>();
  const at::BFloat16* s_p = s.data_ptr<at::BFloat16>();
  float* y_p = y.data_ptr<float>();
  const int64_t blocks = (O_pad + BLOCK - 1) / BLOCK, w_stride = O_pad * (I / 2), s_stride = (I / group) * O_pad * 2;
  at::parallel_for(0, M * blocks, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t m = t / blocks, b = t % blocks, e = id_p[m];
      block(w_p + e * w_stride + b * BLOCK * (I / 2), x_p + m * I, 1, I, s_p + e * s_stride, group, O_pad, b * BLOCK,
            y_p + m * O_pad + b * BLOCK);
    }
  });
  return y;
}

// One (h, n) output of int8_head_mm for row m: sum over the Gk segments of K of s[g] * (x_seg . q_seg).
inline float int8_row(const float* x, const int8_t* q, const float* s, int64_t K, int64_t Gk) {
  const int64_t seg = K / Gk;
  float y = 0.f;
  for (int64_t g = 0; g < Gk; ++g) {
    const float* x_g = x + g * seg;
    const int8_t* q_g = q + g * seg;
    int64_t k = 0;
    float dot = 0.f;
#if defined(__AVX512F__)
    __m512 acc = _mm512_setzero_ps();
    for (; k + 16 <= seg; k += 16) {
      const __m128i q16 = _mm_loadu_si128(reinterpret_cast<const __m128i*>(q_g + k));
      acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(q16)), _mm512_loadu_ps(x_g + k), acc);
    }
    dot = _mm512_reduce_add_ps(acc);
#endif
    for (; k < seg; ++k) dot += x_g[k] * static_cast<float>(q_g[k]);
    y += s[g] * dot;
  }
  return y;
}

// MLA's absorbed per-head products on a quantised wkv_b's int values (mla.MLA._absorb_int8):
// y[h, m, n] = sum over g < Gk of s[h, n, g] * (x[h, m, n / (N / Gx), seg g] . q[h, n, seg g]),
// x (H, M, Gx, K) float32 (the caller folds scales that vary along K into it), q (H, N, K) int8, s (H, N, Gk)
// float32 -> (H, M, N) float32.
at::Tensor int8_head_mm(const at::Tensor& x, const at::Tensor& q, const at::Tensor& s) {
  TORCH_CHECK(x.dim() == 4 && q.dim() == 3 && s.dim() == 3, "int8_head_mm: expected x (H, M, Gx, K), q (H, N, K), s (H, N, Gk)");
  TORCH_CHECK(x.scalar_type() == at::kFloat && q.scalar_type() == at::kChar && s.scalar_type() == at::kFloat,
              "int8_head_mm: expected float32 x, int8 q, float32 s, got ", x.scalar_type(), ", ", q.scalar_type(), ", ",
              s.scalar_type());
  const int64_t H = q.size(0), N = q.size(1), K = q.size(2), M = x.size(1), Gx = x.size(2), Gk = s.size(2);
  TORCH_CHECK(x.size(0) == H && x.size(3) == K && N % Gx == 0 && s.size(0) == H && s.size(1) == N && K % Gk == 0,
              "int8_head_mm: shapes do not match: x ", x.sizes(), ", q ", q.sizes(), ", s ", s.sizes());
  const at::Tensor x_c = x.contiguous(), q_c = q.contiguous(), s_c = s.contiguous();
  at::Tensor y = at::empty({H, M, N}, x_c.options());
  const float* x_p = x_c.data_ptr<float>();
  const int8_t* q_p = q_c.data_ptr<int8_t>();
  const float* s_p = s_c.data_ptr<float>();
  float* y_p = y.data_ptr<float>();
  const int64_t rows_per_x = N / Gx;
  at::parallel_for(0, H * N, 16, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t h = r / N, n = r % N;
      for (int64_t m = 0; m < M; ++m) {
        const float* x_r = x_p + ((h * M + m) * Gx + n / rows_per_x) * K;
        y_p[(h * M + m) * N + n] = int8_row(x_r, q_p + r * K, s_p + r * Gk, K, Gk);
      }
    }
  });
  return y;
}

}  // namespace

TORCH_LIBRARY(openseek_cpu, m) {
  m.def("int4_mm(Tensor x, Tensor qweight, Tensor scale, int group) -> Tensor");
  m.def("int4_mm_indexed(Tensor x, Tensor qweight, Tensor scale, Tensor ids, int group) -> Tensor");
  m.def("int8_head_mm(Tensor x, Tensor q, Tensor s) -> Tensor");
}

TORCH_LIBRARY_IMPL(openseek_cpu, CPU, m) {
  m.impl("int4_mm", &int4_mm);
  m.impl("int4_mm_indexed", &int4_mm_indexed);
  m.impl("int8_head_mm", &int8_head_mm);
}
