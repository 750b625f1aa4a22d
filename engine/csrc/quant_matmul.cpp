// int8 activations x int4 / int8 weights, integer dot products, float32 accumulation (CPU).
//
// Activations are quantized per row in groups of 32 (llama.cpp's Q8 scheme):
//     d = amax / 127, id = d ? 1 / d : 0, qx = clamp(nearbyint(x * id), -127, 127), sx = sum(qx)
// int4 weights (engine.linear's native layout, GGUF Q4's nibble order): per column n and group g,
// 16 bytes whose low nibbles are codes 0..15 and high nibbles codes 16..31; scale s and zero z in
// bf16, interleaved (G, N, 2); w = (code - 8) * s + z. Per output, over groups in order:
//     S = sum(code * qx)                                 (exact, int32)
//     t = fma(z, float(sx), s * float(S - 8 * sx))       (two float32 roundings)
//     acc = fma(t, d, acc)
// int8 per-channel weights q (N, K), bf16 scale per column: acc = fma(float(S), d, acc), y = acc * scale.
//
// Every path (scalar, AVX2, AVX512-VNNI) does exactly these float32 operations in this order, so
// all paths agree bit for bit; they differ only in how S is summed (integers: exact). Paths are
// chosen at run time (__builtin_cpu_supports): the file is compiled for baseline x86-64, the
// vector paths are target-attributed functions, so one build runs on any x86-64 CPU.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

namespace {

constexpr int64_t GROUP = 32;
constexpr int64_t COLS = 8;     // columns per vector tile (one float32 lane each)
constexpr int64_t ROWS = 32;    // rows per accumulator block

enum Path : int64_t { SCALAR = 0, AVX2 = 1, VNNI = 2 };

inline float bf16_to_float(uint16_t b) {
  uint32_t u = static_cast<uint32_t>(b) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

// ---- activation quantization: the same IEEE operations on every path ----
void quantize_group_scalar(const float* xg, int8_t* qg, float* d_out, int32_t* s_out) {
  float amax = 0.f;
  for (int64_t j = 0; j < GROUP; ++j) amax = std::fmax(amax, std::fabs(xg[j]));
  const float d = amax / 127.f;
  const float id = d != 0.f ? 1.f / d : 0.f;
  int32_t sum = 0;
  for (int64_t j = 0; j < GROUP; ++j) {
    float v = std::nearbyint(xg[j] * id);          // round half to even (the default mode)
    v = std::fmin(127.f, std::fmax(-127.f, v));
    qg[j] = static_cast<int8_t>(v);
    sum += qg[j];
  }
  *d_out = d;
  *s_out = sum;
}

__attribute__((target("avx2,fma"))) void quantize_group_avx2(const float* xg, int8_t* qg, float* d_out,
                                                              int32_t* s_out) {
  const __m256 sign = _mm256_set1_ps(-0.f);
  __m256 v[4];
  __m256 mx = _mm256_setzero_ps();
  for (int i = 0; i < 4; ++i) {
    v[i] = _mm256_loadu_ps(xg + 8 * i);
    mx = _mm256_max_ps(mx, _mm256_andnot_ps(sign, v[i]));
  }
  __m128 m4 = _mm_max_ps(_mm256_castps256_ps128(mx), _mm256_extractf128_ps(mx, 1));
  m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
  m4 = _mm_max_ss(m4, _mm_movehdup_ps(m4));
  const float amax = _mm_cvtss_f32(m4);
  const float d = amax / 127.f;
  const float id = d != 0.f ? 1.f / d : 0.f;
  const __m256 idv = _mm256_set1_ps(id), lo = _mm256_set1_ps(-127.f), hi = _mm256_set1_ps(127.f);
  __m256i q[4];
  for (int i = 0; i < 4; ++i) {
    __m256 r = _mm256_round_ps(_mm256_mul_ps(v[i], idv), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    q[i] = _mm256_cvtps_epi32(_mm256_min_ps(hi, _mm256_max_ps(lo, r)));
  }
  const __m256i sum8 = _mm256_add_epi32(_mm256_add_epi32(q[0], q[1]), _mm256_add_epi32(q[2], q[3]));
  __m128i s4 = _mm_add_epi32(_mm256_castsi256_si128(sum8), _mm256_extracti128_si256(sum8, 1));
  s4 = _mm_hadd_epi32(s4, s4);
  s4 = _mm_hadd_epi32(s4, s4);
  // int32 -> int8 keeping order: packs work per 128-bit lane, so fix the lanes up after.
  const __m256i p16 = _mm256_packs_epi32(q[0], q[1]), p16b = _mm256_packs_epi32(q[2], q[3]);
  const __m256i p8 = _mm256_packs_epi16(p16, p16b);
  const __m256i ordered = _mm256_permutevar8x32_epi32(p8, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(qg), ordered);
  *d_out = d;
  *s_out = _mm_cvtsi128_si32(s4);
}

void quantize_rows_impl(const float* x, int64_t M, int64_t K, int8_t* qx, float* dx, int32_t* sx, bool vector) {
  const int64_t G = K / GROUP;
  at::parallel_for(0, M, 16, [&](int64_t m0, int64_t m1) {
    for (int64_t m = m0; m < m1; ++m)
      for (int64_t g = 0; g < G; ++g) {
        const int64_t i = m * K + g * GROUP;
        if (vector) quantize_group_avx2(x + i, qx + i, dx + m * G + g, sx + m * G + g);
        else quantize_group_scalar(x + i, qx + i, dx + m * G + g, sx + m * G + g);
      }
  });
}

// ---- scalar path: one output at a time; also every path's tail columns ----
void int4_column_scalar(const int8_t* qx, const float* dx, const int32_t* sx, const uint8_t* packed,
                        const uint16_t* sz, float* y, int64_t M, int64_t N, int64_t K, int64_t n,
                        bool accumulate) {
  const int64_t G = K / GROUP;
  for (int64_t m = 0; m < M; ++m) {
    float acc = 0.f;
    for (int64_t g = 0; g < G; ++g) {
      const uint8_t* w = packed + n * (K / 2) + g * (GROUP / 2);
      const int8_t* q = qx + m * K + g * GROUP;
      int32_t S = 0;
      for (int64_t j = 0; j < GROUP / 2; ++j) S += (w[j] & 15) * q[j] + (w[j] >> 4) * q[j + GROUP / 2];
      const int32_t s_x = sx[m * G + g];
      const float s = bf16_to_float(sz[(g * N + n) * 2]), z = bf16_to_float(sz[(g * N + n) * 2 + 1]);
      const float t = std::fma(z, static_cast<float>(s_x), s * static_cast<float>(S - 8 * s_x));
      acc = std::fma(t, dx[m * G + g], acc);
    }
    y[m * N + n] = accumulate ? y[m * N + n] + acc : acc;
  }
}

void int8_column_scalar(const int8_t* qx, const float* dx, const int8_t* wq, const uint16_t* scale,
                        float* y, int64_t M, int64_t N, int64_t K, int64_t n) {
  const int64_t G = K / GROUP;
  for (int64_t m = 0; m < M; ++m) {
    float acc = 0.f;
    for (int64_t g = 0; g < G; ++g) {
      const int8_t* w = wq + n * K + g * GROUP;
      const int8_t* q = qx + m * K + g * GROUP;
      int32_t S = 0;
      for (int64_t j = 0; j < GROUP; ++j) S += w[j] * q[j];
      acc = std::fma(static_cast<float>(S), dx[m * G + g], acc);
    }
    y[m * N + n] = acc * bf16_to_float(scale[n]);
  }
}

// ---- vector paths: 8 columns x 1 row per step, the 8 integer dots reduced into one vector ----
// The body is written once (a macro) and stamped out per instruction set, since GCC's target
// attributes do not reach into templates' instantiations reliably.
#define HSUM8(OUT, p)                                                                   \
  do {                                                                                  \
    __m256i a_ = _mm256_hadd_epi32(p[0], p[1]), b_ = _mm256_hadd_epi32(p[2], p[3]);     \
    __m256i c_ = _mm256_hadd_epi32(p[4], p[5]), d_ = _mm256_hadd_epi32(p[6], p[7]);     \
    __m256i e_ = _mm256_hadd_epi32(a_, b_), f_ = _mm256_hadd_epi32(c_, d_);             \
    OUT = _mm256_add_epi32(_mm256_permute2x128_si256(e_, f_, 0x20),                     \
                           _mm256_permute2x128_si256(e_, f_, 0x31));                    \
  } while (0)

// u8 x s8 dot of 32 bytes into 8 int32 lanes (sums of 4): AVX2 needs maddubs + madd (pairs of
// code * qx <= 2 * 15 * 127 or 2 * 127 * 127 < 2^15: no saturation); VNNI does it in one vpdpbusd.
#define DOT_AVX2(w, q) _mm256_madd_epi16(_mm256_maddubs_epi16(w, q), ones)
#define DOT_VNNI(w, q) _mm256_dpbusd_epi32(_mm256_setzero_si256(), w, q)

#define INT4_TILE(NAME, TARGET, DOT)                                                              \
  __attribute__((target(TARGET))) void NAME(                                                      \
      const int8_t* qx, const float* dx, const int32_t* sx, const uint8_t* packed,               \
      const uint16_t* sz, float* y, int64_t M, int64_t N, int64_t K, int64_t n0, bool accumulate) { \
    const int64_t G = K / GROUP;                                                                  \
    const __m256i ones = _mm256_set1_epi16(1);                                                    \
    const __m128i low4 = _mm_set1_epi8(15);                                                       \
    const __m256i hi16 = _mm256_set1_epi32(static_cast<int32_t>(0xFFFF0000u));                   \
    (void)ones;                                                                                   \
    alignas(32) float accs[ROWS][COLS];                                                           \
    __m256i wv[COLS], p[COLS];                                                                    \
    for (int64_t m0 = 0; m0 < M; m0 += ROWS) {                                                    \
      const int64_t mb = M - m0 < ROWS ? M - m0 : ROWS;                                           \
      for (int64_t r = 0; r < mb; ++r) _mm256_store_ps(accs[r], _mm256_setzero_ps());            \
      for (int64_t g = 0; g < G; ++g) {                                                           \
        for (int64_t c = 0; c < COLS; ++c) {                                                      \
          const __m128i b = _mm_loadu_si128(                                                      \
              reinterpret_cast<const __m128i*>(packed + (n0 + c) * (K / 2) + g * (GROUP / 2)));   \
          wv[c] = _mm256_set_m128i(_mm_and_si128(_mm_srli_epi16(b, 4), low4), _mm_and_si128(b, low4)); \
        }                                                                                         \
        const __m256i szv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(sz + (g * N + n0) * 2)); \
        const __m256 s = _mm256_castsi256_ps(_mm256_slli_epi32(szv, 16));                        \
        const __m256 z = _mm256_castsi256_ps(_mm256_and_si256(szv, hi16));                       \
        for (int64_t r = 0; r < mb; ++r) {                                                        \
          const int64_t m = m0 + r;                                                               \
          const __m256i q = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(qx + m * K + g * GROUP)); \
          for (int64_t c = 0; c < COLS; ++c) p[c] = DOT(wv[c], q);                                \
          __m256i S;                                                                              \
          HSUM8(S, p);                                                                            \
          const int32_t s_x = sx[m * G + g];                                                      \
          const __m256i I = _mm256_sub_epi32(S, _mm256_set1_epi32(8 * s_x));                      \
          const __m256 t = _mm256_fmadd_ps(z, _mm256_set1_ps(static_cast<float>(s_x)),           \
                                           _mm256_mul_ps(s, _mm256_cvtepi32_ps(I)));              \
          _mm256_store_ps(accs[r], _mm256_fmadd_ps(t, _mm256_set1_ps(dx[m * G + g]),              \
                                                   _mm256_load_ps(accs[r])));                     \
        }                                                                                         \
      }                                                                                           \
      for (int64_t r = 0; r < mb; ++r) {                                                          \
        float* out = y + (m0 + r) * N + n0;                                                       \
        __m256 v = _mm256_load_ps(accs[r]);                                                       \
        if (accumulate) v = _mm256_add_ps(_mm256_loadu_ps(out), v);                               \
        _mm256_storeu_ps(out, v);                                                                 \
      }                                                                                           \
    }                                                                                             \
  }

#define INT8_TILE(NAME, TARGET, DOT)                                                              \
  __attribute__((target(TARGET))) void NAME(                                                      \
      const int8_t* qx, const float* dx, const int8_t* wq, const uint16_t* scale, float* y,      \
      int64_t M, int64_t N, int64_t K, int64_t n0) {                                              \
    const int64_t G = K / GROUP;                                                                  \
    const __m256i ones = _mm256_set1_epi16(1);                                                    \
    (void)ones;                                                                                   \
    alignas(32) float accs[ROWS][COLS];                                                           \
    __m256i wa[COLS], p[COLS];                                                                    \
    const __m256 sc = _mm256_castsi256_ps(_mm256_slli_epi32(                                      \
        _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(scale + n0))), 16)); \
    for (int64_t m0 = 0; m0 < M; m0 += ROWS) {                                                    \
      const int64_t mb = M - m0 < ROWS ? M - m0 : ROWS;                                           \
      for (int64_t r = 0; r < mb; ++r) _mm256_store_ps(accs[r], _mm256_setzero_ps());            \
      for (int64_t g = 0; g < G; ++g) {                                                           \
        __m256i wr[COLS];                                                                         \
        for (int64_t c = 0; c < COLS; ++c) {                                                      \
          wr[c] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wq + (n0 + c) * K + g * GROUP)); \
          wa[c] = _mm256_abs_epi8(wr[c]);   /* |w| <= 127 as u8; the sign moves onto qx */        \
        }                                                                                         \
        for (int64_t r = 0; r < mb; ++r) {                                                        \
          const int64_t m = m0 + r;                                                               \
          const __m256i q = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(qx + m * K + g * GROUP)); \
          for (int64_t c = 0; c < COLS; ++c) p[c] = DOT(wa[c], _mm256_sign_epi8(q, wr[c]));     \
          __m256i S;                                                                              \
          HSUM8(S, p);                                                                            \
          _mm256_store_ps(accs[r], _mm256_fmadd_ps(_mm256_cvtepi32_ps(S), _mm256_set1_ps(dx[m * G + g]), \
                                                   _mm256_load_ps(accs[r])));                     \
        }                                                                                         \
      }                                                                                           \
      for (int64_t r = 0; r < mb; ++r)                                                            \
        _mm256_storeu_ps(y + (m0 + r) * N + n0, _mm256_mul_ps(_mm256_load_ps(accs[r]), sc));     \
    }                                                                                             \
  }

INT4_TILE(int4_tile_avx2, "avx2,fma", DOT_AVX2)
INT4_TILE(int4_tile_vnni, "avx2,fma,avx512f,avx512vl,avx512vnni", DOT_VNNI)
INT8_TILE(int8_tile_avx2, "avx2,fma", DOT_AVX2)
INT8_TILE(int8_tile_vnni, "avx2,fma,avx512f,avx512vl,avx512vnni", DOT_VNNI)

int64_t best_path() {
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512vnni") && __builtin_cpu_supports("avx512vl") &&
      __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma"))
    return VNNI;
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return AVX2;
  return SCALAR;
}

int64_t checked_path(int64_t path) {
  const int64_t best = best_path();
  if (path < 0) return best;
  TORCH_CHECK(path <= best, "kernel path ", path, " is not supported by this CPU (best: ", best, ")");
  return path;
}

void check_activations(const at::Tensor& qx, const at::Tensor& dx, int64_t K) {
  TORCH_CHECK(qx.dim() == 2 && qx.scalar_type() == at::kChar && qx.is_contiguous() && qx.size(1) == K,
              "qx must be contiguous int8 (M, K)");
  TORCH_CHECK(dx.scalar_type() == at::kFloat && dx.is_contiguous() && dx.numel() == qx.size(0) * (K / GROUP),
              "dx must be contiguous float32 (M, K / 32)");
}

}  // namespace

std::vector<at::Tensor> quantize_rows(const at::Tensor& x, int64_t path) {
  TORCH_CHECK(x.dim() == 2 && x.size(1) % GROUP == 0, "x must be (M, K) with K a multiple of 32");
  const at::Tensor xf = x.to(at::kFloat).contiguous();
  const int64_t M = xf.size(0), K = xf.size(1);
  at::Tensor qx = at::empty({M, K}, xf.options().dtype(at::kChar));
  at::Tensor dx = at::empty({M, K / GROUP}, xf.options());
  at::Tensor sx = at::empty({M, K / GROUP}, xf.options().dtype(at::kInt));
  quantize_rows_impl(xf.data_ptr<float>(), M, K, qx.data_ptr<int8_t>(), dx.data_ptr<float>(),
                     sx.data_ptr<int32_t>(), checked_path(path) >= AVX2);
  return {qx, dx, sx};
}

// y (M, N) float32 (+)= int8 activations x one int4 part. out: a float32 (M, N) tensor to write
// (or add into when accumulate); path -1 = the best this CPU supports.
at::Tensor int4_mm(const at::Tensor& qx, const at::Tensor& dx, const at::Tensor& sx, const at::Tensor& packed,
                   const at::Tensor& scales_zeros, at::Tensor out, bool accumulate, int64_t path) {
  const int64_t M = qx.size(0), K = qx.size(1), N = packed.size(0);
  check_activations(qx, dx, K);
  TORCH_CHECK(sx.scalar_type() == at::kInt && sx.is_contiguous() && sx.sizes() == dx.sizes(), "sx: int32 like dx");
  TORCH_CHECK(packed.scalar_type() == at::kByte && packed.is_contiguous() && packed.dim() == 2 &&
                  packed.size(1) * 2 == K, "packed must be contiguous uint8 (N, K / 2)");
  TORCH_CHECK(scales_zeros.scalar_type() == at::kBFloat16 && scales_zeros.is_contiguous() &&
                  scales_zeros.sizes() == at::IntArrayRef({K / GROUP, N, 2}), "scales_zeros: bf16 (K / 32, N, 2)");
  TORCH_CHECK(out.scalar_type() == at::kFloat && out.is_contiguous() && out.sizes() == at::IntArrayRef({M, N}),
              "out must be contiguous float32 (M, N)");
  const int64_t p = checked_path(path);
  const int8_t* q = qx.data_ptr<int8_t>();
  const float* d = dx.data_ptr<float>();
  const int32_t* s = sx.data_ptr<int32_t>();
  const uint8_t* w = packed.data_ptr<uint8_t>();
  const uint16_t* sz = reinterpret_cast<const uint16_t*>(scales_zeros.data_ptr<at::BFloat16>());
  float* y = out.data_ptr<float>();
  const int64_t tiles = (N + COLS - 1) / COLS;
  at::parallel_for(0, tiles, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t n0 = t * COLS;
      if (p == SCALAR || n0 + COLS > N) {
        for (int64_t n = n0; n < std::min(N, n0 + COLS); ++n) int4_column_scalar(q, d, s, w, sz, y, M, N, K, n, accumulate);
      } else if (p == AVX2) {
        int4_tile_avx2(q, d, s, w, sz, y, M, N, K, n0, accumulate);
      } else {
        int4_tile_vnni(q, d, s, w, sz, y, M, N, K, n0, accumulate);
      }
    }
  });
  return out;
}

// y (M, N) float32 = int8 activations x per-channel int8 weights (N, K) with bf16 scales (N,).
at::Tensor int8_mm(const at::Tensor& qx, const at::Tensor& dx, const at::Tensor& wq, const at::Tensor& scale,
                   int64_t path) {
  const int64_t M = qx.size(0), K = qx.size(1), N = wq.size(0);
  check_activations(qx, dx, K);
  TORCH_CHECK(wq.scalar_type() == at::kChar && wq.is_contiguous() && wq.dim() == 2 && wq.size(1) == K,
              "weight must be contiguous int8 (N, K)");
  TORCH_CHECK(scale.scalar_type() == at::kBFloat16 && scale.is_contiguous() && scale.numel() == N, "scale: bf16 (N,)");
  const int64_t p = checked_path(path);
  at::Tensor out = at::empty({M, N}, qx.options().dtype(at::kFloat));
  const int8_t* q = qx.data_ptr<int8_t>();
  const float* d = dx.data_ptr<float>();
  const int8_t* w = wq.data_ptr<int8_t>();
  const uint16_t* sc = reinterpret_cast<const uint16_t*>(scale.data_ptr<at::BFloat16>());
  float* y = out.data_ptr<float>();
  const int64_t tiles = (N + COLS - 1) / COLS;
  at::parallel_for(0, tiles, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t n0 = t * COLS;
      if (p == SCALAR || n0 + COLS > N) {
        for (int64_t n = n0; n < std::min(N, n0 + COLS); ++n) int8_column_scalar(q, d, w, sc, y, M, N, K, n);
      } else if (p == AVX2) {
        int8_tile_avx2(q, d, w, sc, y, M, N, K, n0);
      } else {
        int8_tile_vnni(q, d, w, sc, y, M, N, K, n0);
      }
    }
  });
  return out;
}

// ---- dequantization to bf16, for steps of many rows (one bf16 GEMM beats the integer dots there) ----
// A group of 32 weights of one part in float32: (code - 8) * s + z, a multiply then an add (no fma).
void dequant_group_scalar(const uint8_t* w, float sc, float z, float* dst) {
  for (int64_t j = 0; j < GROUP / 2; ++j) {
    dst[j] = static_cast<float>(static_cast<int32_t>(w[j] & 15) - 8) * sc + z;
    dst[j + GROUP / 2] = static_cast<float>(static_cast<int32_t>(w[j] >> 4) - 8) * sc + z;
  }
}

// float32 -> bf16, round to nearest even (the weights are finite): torch's .to(bfloat16).
void round_group_scalar(const float* v, uint16_t* out) {
  for (int64_t j = 0; j < GROUP; ++j) {
    uint32_t u;
    std::memcpy(&u, &v[j], 4);
    out[j] = static_cast<uint16_t>((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
  }
}

__attribute__((target("avx512f"))) void dequant_group_avx512(const uint8_t* w, float sc, float z, float* dst) {
  const __m512i x = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w)));
  const __m512i eight = _mm512_set1_epi32(8);
  const __m512i lo = _mm512_sub_epi32(_mm512_and_si512(x, _mm512_set1_epi32(15)), eight);
  const __m512i hi = _mm512_sub_epi32(_mm512_srli_epi32(x, 4), eight);
  const __m512 s = _mm512_set1_ps(sc), zz = _mm512_set1_ps(z);
  _mm512_storeu_ps(dst, _mm512_add_ps(_mm512_mul_ps(_mm512_cvtepi32_ps(lo), s), zz));
  _mm512_storeu_ps(dst + 16, _mm512_add_ps(_mm512_mul_ps(_mm512_cvtepi32_ps(hi), s), zz));
}

__attribute__((target("avx512f"))) void add_group_avx512(float* v, const float* part) {
  for (int64_t k = 0; k < GROUP; k += 16)
    _mm512_storeu_ps(v + k, _mm512_add_ps(_mm512_loadu_ps(v + k), _mm512_loadu_ps(part + k)));
}

__attribute__((target("avx512f"))) void round_group_avx512(const float* v, uint16_t* out) {
  for (int64_t k = 0; k < GROUP; k += 16) {
    const __m512i u = _mm512_castps_si512(_mm512_loadu_ps(v + k));
    const __m512i odd = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
    const __m512i r = _mm512_srli_epi32(_mm512_add_epi32(u, _mm512_add_epi32(_mm512_set1_epi32(0x7FFF), odd)), 16);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + k), _mm512_cvtepi32_epi16(r));
  }
}

// w (N, K) bf16 = the sum over the parts of (code - 8) * s + z: each part's weight in float32, the
// parts added, rounded to bf16 once: bit for bit engine.linear.unpack_native_int4's sum, .to(bf16)
// (the AVX-512 path does the same float32 operations, 16 lanes at a time).
at::Tensor dequantize_bf16(const std::vector<at::Tensor>& packed, const std::vector<at::Tensor>& scales_zeros,
                           at::Tensor out, int64_t path) {
  TORCH_CHECK(!packed.empty() && packed.size() == scales_zeros.size(), "one scales_zeros per part");
  const int64_t N = packed[0].size(0), K = packed[0].size(1) * 2, G = K / GROUP;
  const int64_t parts = static_cast<int64_t>(packed.size());
  std::vector<const uint8_t*> codes(parts);
  std::vector<const uint16_t*> szs(parts);
  for (int64_t i = 0; i < parts; ++i) {
    TORCH_CHECK(packed[i].scalar_type() == at::kByte && packed[i].is_contiguous() &&
                    packed[i].sizes() == at::IntArrayRef({N, K / 2}), "packed must be contiguous uint8 (N, K / 2)");
    TORCH_CHECK(scales_zeros[i].scalar_type() == at::kBFloat16 && scales_zeros[i].is_contiguous() &&
                    scales_zeros[i].sizes() == at::IntArrayRef({G, N, 2}), "scales_zeros: bf16 (K / 32, N, 2)");
    codes[i] = packed[i].data_ptr<uint8_t>();
    szs[i] = reinterpret_cast<const uint16_t*>(scales_zeros[i].data_ptr<at::BFloat16>());
  }
  TORCH_CHECK(out.scalar_type() == at::kBFloat16 && out.is_contiguous() && out.sizes() == at::IntArrayRef({N, K}),
              "out must be contiguous bf16 (N, K)");
  uint16_t* o = reinterpret_cast<uint16_t*>(out.data_ptr<at::BFloat16>());
  const bool wide = checked_path(path) == VNNI;       // the AVX-512 path (VNNI implies AVX512F)
  at::parallel_for(0, N, 16, [&](int64_t n0, int64_t n1) {
    alignas(64) float v[GROUP];
    alignas(64) float part[GROUP];
    for (int64_t n = n0; n < n1; ++n) {
      for (int64_t g = 0; g < G; ++g) {
        for (int64_t i = 0; i < parts; ++i) {
          const uint8_t* w = codes[i] + n * (K / 2) + g * (GROUP / 2);
          const uint16_t* sz = szs[i] + (g * N + n) * 2;
          const float sc = bf16_to_float(sz[0]), z = bf16_to_float(sz[1]);
          float* dst = i ? part : v;
          if (wide) dequant_group_avx512(w, sc, z, dst); else dequant_group_scalar(w, sc, z, dst);
          if (i) {
            if (wide) add_group_avx512(v, part); else for (int64_t j = 0; j < GROUP; ++j) v[j] += part[j];
          }
        }
        if (wide) round_group_avx512(v, o + n * K + g * GROUP); else round_group_scalar(v, o + n * K + g * GROUP);
      }
    }
  });
  return out;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("dequantize_bf16", &dequantize_bf16, "int4 parts (packed, scales_zeros), out, path -> out = their summed weight, bf16 (N, K)");
  m.def("best_path", &best_path, "0 scalar, 1 AVX2, 2 AVX512-VNNI: the fastest path this CPU runs");
  m.def("quantize_rows", &quantize_rows, "x (M, K), path -> qx int8 (M, K), dx float32 (M, K/32), sx int32 (M, K/32)");
  m.def("int4_mm", &int4_mm, "out (M, N) (+)= int8 activations x one int4 part");
  m.def("int8_mm", &int8_mm, "int8 activations x per-channel int8 weights -> float32 (M, N)");
}
