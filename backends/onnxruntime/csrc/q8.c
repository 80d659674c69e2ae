#include "q8.h"
#include "mem.h"
#include "vmath.h"

#include <immintrin.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

int q8_pack(q8_weights* w, const uint8_t* B, const float* S, const uint8_t* Z, int64_t K, int64_t N) {
  int64_t nblk = (K + Q8_BLOCK - 1) / Q8_BLOCK, groups = (N + 15) / 16;
  w->K = K; w->N = N; w->nblk = nblk; w->groups = groups;
  w->words = aligned64((size_t)groups * nblk * 128 * sizeof(uint32_t));
  w->scales = aligned64((size_t)groups * nblk * 16 * sizeof(float));
  w->zeros = aligned64((size_t)groups * nblk * 16 * sizeof(float));
  if (!w->words || !w->scales || !w->zeros) { q8_free(w); return -1; }
  for (int64_t g = 0; g < groups; g++)
    for (int64_t b = 0; b < nblk; b++) {
      uint32_t* dst = w->words + (g * nblk + b) * 128;
      float* ds = w->scales + (g * nblk + b) * 16;
      float* dz = w->zeros + (g * nblk + b) * 16;
      for (int r = 0; r < 16; r++) {
        int64_t n = g * 16 + r;
        if (n < N) {
          const uint8_t* src = B + (n * nblk + b) * Q8_BLOCK;
          for (int j = 0; j < 8; j++) memcpy(dst + j * 16 + r, src + 4 * j, 4);
          ds[r] = S[n * nblk + b];
          dz[r] = Z ? (float)Z[n * nblk + b] : 128.0f;
        } else {  /* padding rows: zero weights, zero scale */
          for (int j = 0; j < 8; j++) dst[j * 16 + r] = 0;
          ds[r] = 0.0f; dz[r] = 0.0f;
        }
      }
    }
  return 0;
}

void q8_free(q8_weights* w) {
  free(w->words); free(w->scales); free(w->zeros);
  w->words = NULL; w->scales = NULL; w->zeros = NULL;
}

size_t q8_act_bytes(int64_t M, int64_t nblk) {
  return (size_t)M * nblk * (Q8_BLOCK + sizeof(float) + sizeof(int32_t)) + 64;
}

void q8_act_init(q8_act* a, void* memory, int64_t M, int64_t nblk) {
  char* p = memory;
  a->M = M; a->nblk = nblk;
  a->q = (int8_t*)p; p += (size_t)M * nblk * Q8_BLOCK;
  a->scale = (float*)p; p += (size_t)M * nblk * sizeof(float);
  a->sum = (int32_t*)p;
}

/* MLAS's rule (accuracy level 4), per block of 32: scale = max|x| / 127,
   q = round-half-even(x * 127 / max|x|); elements past K are zero */
static void quantize_row(q8_act* a, const float* x, int64_t K, int64_t m) {
  int64_t nblk = a->nblk;
  for (int64_t b = 0; b < nblk; b++) {
    int64_t k0 = b * Q8_BLOCK, len = K - k0 < Q8_BLOCK ? K - k0 : Q8_BLOCK;
    __mmask16 m0 = tail_mask(len), m1 = tail_mask(len - 16);
    __m512 v0 = _mm512_maskz_loadu_ps(m0, x + k0), v1 = _mm512_maskz_loadu_ps(m1, x + k0 + 16);
    float mx = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(v0), _mm512_abs_ps(v1)));
    __m512 inv = _mm512_set1_ps(mx > 0.0f ? 127.0f / mx : 0.0f);
    __m512i q0 = _mm512_cvtps_epi32(_mm512_mul_ps(v0, inv));  /* round half to even */
    __m512i q1 = _mm512_cvtps_epi32(_mm512_mul_ps(v1, inv));
    int8_t* q = a->q + (m * nblk + b) * Q8_BLOCK;
    _mm_storeu_si128((__m128i*)q, _mm512_cvtepi32_epi8(q0));
    _mm_storeu_si128((__m128i*)(q + 16), _mm512_cvtepi32_epi8(q1));
    a->scale[m * nblk + b] = mx / 127.0f;
    a->sum[m * nblk + b] = _mm512_reduce_add_epi32(_mm512_add_epi32(q0, q1));
  }
}

void q8_quantize(q8_act* a, const float* A, int64_t K, int64_t m0, int64_t m1) {
  for (int64_t m = m0; m < m1; m++) quantize_row(a, A + m * K, K, m);
}

void q8_quantize_swiglu(q8_act* a, const float* A, int64_t K, int64_t m0, int64_t m1, float* x) {
  for (int64_t m = m0; m < m1; m++) {
    const float* gate = A + m * 2 * K;
    silu_mul_row(gate, gate + K, x, K);
    quantize_row(a, x, K, m);
  }
}

void q8_quantize_skip_rmsnorm(q8_act* a, const float* A, const float* skip, const float* gamma,
                              float epsilon, float* sum, int64_t K, int64_t m0, int64_t m1,
                              float* x) {
  for (int64_t m = m0; m < m1; m++) {
    skip_rmsnorm_row(A + m * K, skip + m * K, gamma, epsilon, sum ? sum + m * K : x, x, K);
    quantize_row(a, x, K, m);
  }
}

/* 16 output rows (group g) of activation row m: per block, 8 VPDPBUSD (two chains), then
   scale_w * scale_a * (dot - zero * sum_a) */
static inline __m512 q8_rows16(const q8_weights* w, const q8_act* a, int64_t g, int64_t m) {
  int64_t nblk = w->nblk;
  __m512 F = _mm512_setzero_ps();
  const uint32_t* p = w->words + g * nblk * 128;
  for (int64_t b = 0; b < nblk; b++, p += 128) {
    const int32_t* xq = (const int32_t*)(a->q + (m * nblk + b) * Q8_BLOCK);
    __m512i d0 = _mm512_setzero_si512(), d1 = d0;
#pragma GCC unroll 4
    for (int j = 0; j < 8; j += 2) {
      d0 = _mm512_dpbusd_epi32(d0, _mm512_load_si512(p + j * 16), _mm512_set1_epi32(xq[j]));
      d1 = _mm512_dpbusd_epi32(d1, _mm512_load_si512(p + j * 16 + 16), _mm512_set1_epi32(xq[j + 1]));
    }
    const float* ps = w->scales + (g * nblk + b) * 16;
    const float* pz = w->zeros + (g * nblk + b) * 16;
    __m512 t = _mm512_fnmadd_ps(_mm512_load_ps(pz), _mm512_set1_ps((float)a->sum[m * nblk + b]),
                                _mm512_cvtepi32_ps(_mm512_add_epi32(d0, d1)));
    F = _mm512_fmadd_ps(t, _mm512_mul_ps(_mm512_load_ps(ps), _mm512_set1_ps(a->scale[m * nblk + b])), F);
  }
  return F;
}

void q8_matmul_groups(const q8_weights* w, const q8_act* a, float* Y, int64_t g0, int64_t g1) {
  int64_t N = w->N;
  for (int64_t g = g0; g < g1; g++)
    for (int64_t m = 0; m < a->M; m++) {
      _mm512_mask_storeu_ps(Y + m * N + g * 16, tail_mask(N - g * 16), q8_rows16(w, a, g, m));
    }
}
