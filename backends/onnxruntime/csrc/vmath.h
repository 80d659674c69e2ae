/* Vector math shared by the kernels (AVX-512). */
#ifndef MODELFOLD_VMATH_H
#define MODELFOLD_VMATH_H
#include <immintrin.h>
#include <math.h>

/* the lanes of a 16-float vector that hold the `left` elements remaining (all for 16 or more,
   none for 0 or fewer) */
static inline __mmask16 tail_mask(long long left) {
  return left >= 16 ? (__mmask16)0xFFFF : left <= 0 ? (__mmask16)0 : (__mmask16)((1u << left) - 1);
}

/* e^x for x <= 0 .. moderate: 2^n * p(r), r = x - n ln 2, |r| <= ln2 / 2, degree-6 polynomial
   (relative error about 1e-7) */
static inline __m512 exp_ps(__m512 x) {
  x = _mm512_max_ps(_mm512_min_ps(x, _mm512_set1_ps(88.0f)), _mm512_set1_ps(-88.0f));
  __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                  _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.9875691500e-4f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
  p = _mm512_fmadd_ps(p, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
  return _mm512_scalef_ps(p, n);
}

/* out[k] = silu(gate[k]) * up[k] = gate / (1 + e^-gate) * up, k < K */
static inline void silu_mul_row(const float* gate, const float* up, float* out, long long K) {
  for (long long k = 0; k < K; k += 16) {
    __mmask16 mask = tail_mask(K - k);
    __m512 g = _mm512_maskz_loadu_ps(mask, gate + k), u = _mm512_maskz_loadu_ps(mask, up + k);
    __m512 d = _mm512_add_ps(_mm512_set1_ps(1.0f), exp_ps(_mm512_sub_ps(_mm512_setzero_ps(), g)));
    _mm512_mask_storeu_ps(out + k, mask, _mm512_mul_ps(_mm512_div_ps(g, d), u));
  }
}

/* s[k] = in[k] + skip[k]; x[k] = s[k] / sqrt(mean(s^2) + epsilon) * gamma[k], k < K (a residual add
   and the RMSNorm after it, as ONNX Runtime's SkipSimplifiedLayerNormalization; s may be x) */
static inline void skip_rmsnorm_row(const float* in, const float* skip, const float* gamma,
                                    float epsilon, float* s, float* x, long long K) {
  __m512 squares = _mm512_setzero_ps();
  for (long long k = 0; k < K; k += 16) {
    __mmask16 mask = tail_mask(K - k);
    __m512 v = _mm512_add_ps(_mm512_maskz_loadu_ps(mask, in + k), _mm512_maskz_loadu_ps(mask, skip + k));
    _mm512_mask_storeu_ps(s + k, mask, v);
    squares = _mm512_fmadd_ps(v, v, squares);
  }
  __m512 vs = _mm512_set1_ps(1.0f / sqrtf(_mm512_reduce_add_ps(squares) / (float)K + epsilon));
  for (long long k = 0; k < K; k += 16) {
    __mmask16 mask = tail_mask(K - k);
    __m512 v = _mm512_mul_ps(_mm512_mul_ps(_mm512_maskz_loadu_ps(mask, s + k), vs),
                             _mm512_maskz_loadu_ps(mask, gamma + k));
    _mm512_mask_storeu_ps(x + k, mask, v);
  }
}
#endif
