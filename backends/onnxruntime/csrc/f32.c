#include "f32.h"

#include "vmath.h"

#include <immintrin.h>
#include <string.h>

void f32_gemv_partial(const float* A, int64_t M, int64_t K, const float* W, int64_t N,
                      int64_t k0, int64_t k1, float* P) {
  memset(P, 0, (size_t)(M * N) * sizeof(float));
  int64_t k = k0;
  for (; k + 4 <= k1; k += 4) {  /* four rows of W per pass over the partial sums */
    const float *r0 = W + k * N, *r1 = r0 + N, *r2 = r1 + N, *r3 = r2 + N;
    for (int64_t n = 0; n < N; n += 16) {  /* the 16 columns' weights stay in registers */
      __mmask16 t = tail_mask(N - n);
      __m512 w0 = _mm512_maskz_loadu_ps(t, r0 + n), w1 = _mm512_maskz_loadu_ps(t, r1 + n);
      __m512 w2 = _mm512_maskz_loadu_ps(t, r2 + n), w3 = _mm512_maskz_loadu_ps(t, r3 + n);
      for (int64_t m = 0; m < M; m++) {
        const float* a = A + m * K + k;
        float* p = P + m * N + n;
        __m512 acc = _mm512_maskz_loadu_ps(t, p);
        acc = _mm512_fmadd_ps(_mm512_set1_ps(a[0]), w0, acc);
        acc = _mm512_fmadd_ps(_mm512_set1_ps(a[1]), w1, acc);
        acc = _mm512_fmadd_ps(_mm512_set1_ps(a[2]), w2, acc);
        acc = _mm512_fmadd_ps(_mm512_set1_ps(a[3]), w3, acc);
        _mm512_mask_storeu_ps(p, t, acc);
      }
    }
  }
  for (; k < k1; k++) {  /* the rows left over */
    const float* r = W + k * N;
    for (int64_t n = 0; n < N; n += 16) {
      __mmask16 t = tail_mask(N - n);
      __m512 w = _mm512_maskz_loadu_ps(t, r + n);
      for (int64_t m = 0; m < M; m++) {
        float* p = P + m * N + n;
        _mm512_mask_storeu_ps(p, t, _mm512_fmadd_ps(_mm512_set1_ps(A[m * K + k]), w,
                                                    _mm512_maskz_loadu_ps(t, p)));
      }
    }
  }
}

void f32_sum_parts(const float* P, int64_t parts, int64_t M, int64_t N, int64_t n0, int64_t n1,
                   float* Y) {
  int64_t stride = M * N;
  for (int64_t m = 0; m < M; m++)
    for (int64_t n = n0; n < n1; n += 16) {
      __mmask16 t = tail_mask(n1 - n);
      const float* p = P + m * N + n;
      __m512 s = _mm512_maskz_loadu_ps(t, p);
      for (int64_t i = 1; i < parts; i++) s = _mm512_add_ps(s, _mm512_maskz_loadu_ps(t, p + i * stride));
      _mm512_mask_storeu_ps(Y + m * N + n, t, s);
    }
}

static inline float dot_row(const float* a, const float* b, int64_t K) {
  __m512 s0 = _mm512_setzero_ps(), s1 = s0;
  int64_t k = 0;
  for (; k + 32 <= K; k += 32) {
    s0 = _mm512_fmadd_ps(_mm512_loadu_ps(a + k), _mm512_loadu_ps(b + k), s0);
    s1 = _mm512_fmadd_ps(_mm512_loadu_ps(a + k + 16), _mm512_loadu_ps(b + k + 16), s1);
  }
  for (; k < K; k += 16) {
    __mmask16 t = tail_mask(K - k);
    s0 = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(t, a + k), _mm512_maskz_loadu_ps(t, b + k), s0);
  }
  return _mm512_reduce_add_ps(_mm512_add_ps(s0, s1));
}

void f32_gemv_rows(const float* A, int64_t M, int64_t K, const float* B, int64_t N,
                   int64_t n0, int64_t n1, float* Y) {
  int64_t n = n0;
  for (; n + 4 <= n1; n += 4) {  /* four rows of B streamed side by side */
    const float *b0 = B + n * K, *b1 = b0 + K, *b2 = b1 + K, *b3 = b2 + K;
    for (int64_t m = 0; m < M; m++) {
      const float* a = A + m * K;
      __m512 s0 = _mm512_setzero_ps(), s1 = s0, s2 = s0, s3 = s0;
      for (int64_t k = 0; k < K; k += 16) {
        __mmask16 t = tail_mask(K - k);
        __m512 x = _mm512_maskz_loadu_ps(t, a + k);
        s0 = _mm512_fmadd_ps(x, _mm512_maskz_loadu_ps(t, b0 + k), s0);
        s1 = _mm512_fmadd_ps(x, _mm512_maskz_loadu_ps(t, b1 + k), s1);
        s2 = _mm512_fmadd_ps(x, _mm512_maskz_loadu_ps(t, b2 + k), s2);
        s3 = _mm512_fmadd_ps(x, _mm512_maskz_loadu_ps(t, b3 + k), s3);
      }
      float* y = Y + m * N + n;
      y[0] = _mm512_reduce_add_ps(s0); y[1] = _mm512_reduce_add_ps(s1);
      y[2] = _mm512_reduce_add_ps(s2); y[3] = _mm512_reduce_add_ps(s3);
    }
  }
  for (; n < n1; n++)
    for (int64_t m = 0; m < M; m++) Y[m * N + n] = dot_row(A + m * K, B + n * K, K);
}
