#include "q4.h"
#include "mem.h"
#include "vmath.h"

#include <immintrin.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>


int q4_pack(q4_weights* w, const uint8_t* B, const float* S, const uint8_t* Z, int64_t K, int64_t N) {
  int64_t nblk = (K + 127) / 128, groups = (N + 15) / 16, zstride = (nblk + 1) / 2;
  /* the last block keeps only the words that hold weights of K (an even count: the dot product
     takes two at a time); the rest of MatMulNBits' block is padding (K = 576: 4.5 blocks) */
  int64_t rest = K - (nblk - 1) * 128, last = ((rest + 7) / 8 + 1) & ~(int64_t)1;
  if (last > 16) last = 16;
  w->K = K; w->N = N; w->nblk = nblk; w->groups = groups; w->last_words = last;
  w->group_words = ((nblk - 1) * 16 + last) * 16;
  w->words = aligned64((size_t)groups * w->group_words * sizeof(uint32_t));
  w->scales = aligned64((size_t)groups * nblk * 16 * sizeof(float));
  w->zeros = aligned64((size_t)groups * nblk * 16 * sizeof(float));
  if (!w->words || !w->scales || !w->zeros) { q4_free(w); return -1; }
  for (int64_t g = 0; g < groups; g++)
    for (int64_t b = 0; b < nblk; b++) {
      uint32_t* dst = w->words + g * w->group_words + b * 256;
      int words = b == nblk - 1 ? (int)last : 16;
      float* ds = w->scales + (g * nblk + b) * 16;
      float* dz = w->zeros + (g * nblk + b) * 16;
      for (int r = 0; r < 16; r++) {
        int64_t n = g * 16 + r;
        if (n < N) {
          const uint8_t* src = B + (n * nblk + b) * 64;
          for (int j = 0; j < words; j++) memcpy(dst + j * 16 + r, src + 4 * j, 4);
          ds[r] = S[n * nblk + b];
          dz[r] = Z ? (float)((Z[n * zstride + b / 2] >> ((b & 1) * 4)) & 0x0F) : 8.0f;
        } else {  /* padding rows: zero weights, zero scale */
          for (int j = 0; j < words; j++) dst[j * 16 + r] = 0;
          ds[r] = 0.0f; dz[r] = 0.0f;
        }
      }
    }
  return 0;
}

void q4_free(q4_weights* w) {
  free(w->words); free(w->scales); free(w->zeros);
  w->words = NULL; w->scales = NULL; w->zeros = NULL;
}

size_t q4_act_bytes(int64_t M, int64_t nblk) {
  return (size_t)M * nblk * (64 + 64 + sizeof(float) + sizeof(int32_t)) + 64;
}

void q4_act_init(q4_act* a, void* memory, int64_t M, int64_t nblk) {
  char* p = memory;
  a->M = M; a->nblk = nblk;
  a->even = (int8_t*)p; p += (size_t)M * nblk * 64;
  a->odd = (int8_t*)p; p += (size_t)M * nblk * 64;
  a->scale = (float*)p; p += (size_t)M * nblk * sizeof(float);
  a->sum = (int32_t*)p;
}

/* MLAS's rule (accuracy level 4): scale = max|x| / 127 per block, q = round-half-even(x / scale);
   the int8 values are stored split into even and odd elements (the low and high nibbles' partners) */
static void quantize_row(q4_act* a, const float* x, int64_t K, int64_t m) {
  const __m512i even_idx = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
  const __m512i odd_idx = _mm512_setr_epi32(1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31);
  int64_t nblk = a->nblk;
  for (int64_t b = 0; b < nblk; b++) {
    int64_t k0 = b * 128, len = K - k0 < 128 ? K - k0 : 128;
    __m512 v[8];
    __m512 amax = _mm512_setzero_ps();
    for (int i = 0; i < 8; i++) {
      int64_t rest = len - 16 * i;
      __mmask16 mask = tail_mask(rest);
      v[i] = _mm512_maskz_loadu_ps(mask, x + k0 + 16 * i);
      amax = _mm512_max_ps(amax, _mm512_abs_ps(v[i]));
    }
    float mx = _mm512_reduce_max_ps(amax);
    __m512 inv = _mm512_set1_ps(mx > 0.0f ? 127.0f / mx : 0.0f);
    int8_t* e = a->even + (m * nblk + b) * 64;
    int8_t* o = a->odd + (m * nblk + b) * 64;
    __m512i sum = _mm512_setzero_si512();
    for (int i = 0; i < 8; i += 2) {  /* 32 elements -> 16 even, 16 odd */
      __m512i q0 = _mm512_cvtps_epi32(_mm512_mul_ps(v[i], inv));  /* round half to even */
      __m512i q1 = _mm512_cvtps_epi32(_mm512_mul_ps(v[i + 1], inv));
      sum = _mm512_add_epi32(sum, _mm512_add_epi32(q0, q1));
      _mm_storeu_si128((__m128i*)(e + 8 * i), _mm512_cvtepi32_epi8(_mm512_permutex2var_epi32(q0, even_idx, q1)));
      _mm_storeu_si128((__m128i*)(o + 8 * i), _mm512_cvtepi32_epi8(_mm512_permutex2var_epi32(q0, odd_idx, q1)));
    }
    a->scale[m * nblk + b] = mx / 127.0f;
    a->sum[m * nblk + b] = _mm512_reduce_add_epi32(sum);
  }
}

void q4_quantize(q4_act* a, const float* A, int64_t K, int64_t m0, int64_t m1) {
  for (int64_t m = m0; m < m1; m++) quantize_row(a, A + m * K, K, m);
}

void q4_quantize_swiglu(q4_act* a, const float* A, int64_t K, int64_t m0, int64_t m1, float* x) {
  for (int64_t m = m0; m < m1; m++) {
    const float* gate = A + m * 2 * K;
    silu_mul_row(gate, gate + K, x, K);
    quantize_row(a, x, K, m);
  }
}

/* One block's integer dot products of 16 output rows, `words` 4-byte words (8 weights each) per
   row: low nibbles against the even elements; high nibbles, masked in place and so 16x, against
   the odd ones. Four accumulators keep four VPDPBUSD chains in flight. */
static inline __m512i q4_block16(const uint32_t* p, const int32_t* xe, const int32_t* xo, int words) {
  const __m512i low = _mm512_set1_epi8(0x0F), high = _mm512_set1_epi8((char)0xF0);
  __m512i L0 = _mm512_setzero_si512(), L1 = L0, H0 = L0, H1 = L0;
#pragma GCC unroll 8
  for (int j = 0; j < words; j += 2) {
    __m512i v0 = _mm512_load_si512(p + j * 16), v1 = _mm512_load_si512(p + j * 16 + 16);
    L0 = _mm512_dpbusd_epi32(L0, _mm512_and_si512(v0, low), _mm512_set1_epi32(xe[j]));
    H0 = _mm512_dpbusd_epi32(H0, _mm512_and_si512(v0, high), _mm512_set1_epi32(xo[j]));
    L1 = _mm512_dpbusd_epi32(L1, _mm512_and_si512(v1, low), _mm512_set1_epi32(xe[j + 1]));
    H1 = _mm512_dpbusd_epi32(H1, _mm512_and_si512(v1, high), _mm512_set1_epi32(xo[j + 1]));
  }
  return _mm512_add_epi32(_mm512_add_epi32(L0, L1), _mm512_srai_epi32(_mm512_add_epi32(H0, H1), 4));
}

/* 16 output rows (group g) of activation row m: per block, the integer dot products, then
   scale_w * scale_a * (dot - zero * sum_a); the last block only over its words that hold K. */
static inline __m512 q4_rows16(const q4_weights* w, const q4_act* a, int64_t g, int64_t m) {
  int64_t nblk = w->nblk;
  __m512 F = _mm512_setzero_ps();
  const uint32_t* p = w->words + g * w->group_words;
  for (int64_t b = 0; b < nblk; b++, p += 256) {
    const int32_t* xe = (const int32_t*)(a->even + (m * nblk + b) * 64);
    const int32_t* xo = (const int32_t*)(a->odd + (m * nblk + b) * 64);
    __m512i dot = b < nblk - 1 ? q4_block16(p, xe, xo, 16) : q4_block16(p, xe, xo, (int)w->last_words);
    const float* ps = w->scales + (g * nblk + b) * 16;
    const float* pz = w->zeros + (g * nblk + b) * 16;
    __m512 t = _mm512_fnmadd_ps(_mm512_load_ps(pz), _mm512_set1_ps((float)a->sum[m * nblk + b]),
                                _mm512_cvtepi32_ps(dot));
    F = _mm512_fmadd_ps(t, _mm512_mul_ps(_mm512_load_ps(ps), _mm512_set1_ps(a->scale[m * nblk + b])), F);
  }
  return F;
}

static inline void q4_store(float* y, int64_t n, int64_t N, __m512 v) {
  _mm512_mask_storeu_ps(y + n, tail_mask(N - n), v);
}

void q4_matmul_groups(const q4_weights* w, const q4_act* a, float* Y, int64_t g0, int64_t g1) {
  int64_t N = w->N;
  for (int64_t g = g0; g < g1; g++)
    for (int64_t m = 0; m < a->M; m++)  /* the group's weights stay in L1 across the rows */
      q4_store(Y + m * N, g * 16, N, q4_rows16(w, a, g, m));
}

void q4_quantize_skip_rmsnorm(q4_act* a, const float* A, const float* skip, const float* gamma,
                              float epsilon, float* sum, int64_t K, int64_t m0, int64_t m1,
                              float* x) {
  for (int64_t m = m0; m < m1; m++) {
    skip_rmsnorm_row(A + m * K, skip + m * K, gamma, epsilon, sum ? sum + m * K : x, x, K);
    quantize_row(a, x, K, m);
  }
}
