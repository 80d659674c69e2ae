#include "attn.h"

#include <immintrin.h>
#include <math.h>
#include <string.h>

#include "vmath.h"

#define ROWS 4         /* query rows that read the cache together */
#define MAX_CHUNK 2048 /* keys one item scores at a time */
#define DECODE_CHUNK 256

/* -- the cache layout ---------------------------------------------------------------------- */
/* element (p, d) of a [cap][D] key block: tiles of 16 positions transposed, then the tail */
static inline int64_t key_index(int64_t p, int64_t d, int64_t cap, int64_t D) {
  int64_t tiled = cap & ~(int64_t)15;
  return p < tiled ? (p >> 4) * 16 * D + d * 16 + (p & 15) : p * D + d;
}

static inline float load1(const void* base, int64_t i, int f16) {
  return f16 ? _cvtsh_ss(((const uint16_t*)base)[i]) : ((const float*)base)[i];
}

static inline void store1(void* base, int64_t i, float x, int f16) {
  if (f16)
    ((uint16_t*)base)[i] = _cvtss_sh(x, _MM_FROUND_TO_NEAREST_INT);
  else
    ((float*)base)[i] = x;
}

static inline __m512 load16(const void* base, int64_t i, int f16) {
  return f16 ? _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)((const uint16_t*)base + i)))
             : _mm512_loadu_ps((const float*)base + i);
}

static inline void store16(void* base, int64_t i, __m512 x, int f16) {
  if (f16)
    _mm256_storeu_si256((__m256i*)((uint16_t*)base + i),
                        _mm512_cvtps_ph(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
  else
    _mm512_storeu_ps((float*)base + i, x);
}

static inline size_t elem(const attn_args* a) { return a->f16 ? 2 : 4; }

static inline int64_t block_of(const attn_args* a, int64_t b, int64_t h, int64_t cap) {
  return (b * a->KVH + h) * cap * a->D;  /* first element of (row b, KV head h) */
}

/* -- planning ------------------------------------------------------------------------------ */
size_t attn_plan(attn_args* a) {
  int64_t G = a->H / a->KVH, longest = 0;
  for (int64_t b = 0; b < a->B; b++)
    if (a->past[b] + a->S > longest) longest = a->past[b] + a->S;
  if (a->S == 1) {
    a->sets = a->B * a->KVH * ((G + ROWS - 1) / ROWS);
    a->chunk = DECODE_CHUNK;
  } else {
    a->sets = a->B * a->KVH * G * ((a->S + ROWS - 1) / ROWS);
    a->chunk = (longest + 15) & ~(int64_t)15;
    if (a->chunk > MAX_CHUNK) a->chunk = MAX_CHUNK;
    if (a->chunk < 16) a->chunk = 16;
  }
  a->chunks = (longest + a->chunk - 1) / a->chunk;
  if (a->chunks < 1) a->chunks = 1;
  size_t q = (size_t)a->B * a->S * a->H * a->D * sizeof(float);
  size_t partial = a->chunks > 1 ? (size_t)a->sets * a->chunks * ROWS * (a->D + 2) * sizeof(float) : 0;
  return q + partial + 128;
}

void attn_set_scratch(attn_args* a, void* memory) {
  char* p = (char*)(((uintptr_t)memory + 63) & ~(uintptr_t)63);
  a->qbuf = (float*)p;
  a->partial = a->chunks > 1 ? a->qbuf + a->B * a->S * a->H * a->D : NULL;
}

/* the rows of set i: (query head, new token) pairs of one batch row and one KV head */
static int set_rows(const attn_args* a, int64_t i, int64_t* b, int64_t* kvh, int64_t* head,
                    int64_t* tok) {
  int64_t G = a->H / a->KVH;
  int n = 0;
  if (a->S == 1) {
    int64_t per = (G + ROWS - 1) / ROWS, j = i % per;
    *kvh = (i / per) % a->KVH;
    *b = i / per / a->KVH;
    for (int64_t g = j * ROWS; g < G && n < ROWS; g++, n++) { head[n] = *kvh * G + g; tok[n] = 0; }
  } else {
    int64_t per = (a->S + ROWS - 1) / ROWS, j = i % per, g = (i / per) % G;
    *kvh = (i / per / G) % a->KVH;
    *b = i / per / G / a->KVH;
    for (int64_t s = j * ROWS; s < a->S && n < ROWS; s++, n++) { head[n] = *kvh * G + g; tok[n] = s; }
  }
  return n;
}

/* -- the new tokens ------------------------------------------------------------------------ */
static void rotate(const attn_args* a, const float* x, int64_t pos, float* y, float scale) {
  int64_t half = a->R / 2;
  const float* c = a->cos + pos * half;
  const float* s = a->sin + pos * half;
  for (int64_t i = 0; i < half; i++) {
    float x1 = x[i], x2 = x[i + half];
    y[i] = (x1 * c[i] - x2 * s[i]) * scale;
    y[i + half] = (x2 * c[i] + x1 * s[i]) * scale;
  }
  for (int64_t i = a->R; i < a->D; i++) y[i] = x[i] * scale;
}

void attn_copy_past(const attn_args* a) {
  if (a->past_k == a->kc) return;
  size_t e = elem(a);
  for (int64_t b = 0; b < a->B; b++)
    for (int64_t h = 0; h < a->KVH; h++) {
      int64_t src = block_of(a, b, h, a->past_cap), dst = block_of(a, b, h, a->cap);
      if (a->past_cap == a->cap) {  /* the same layout: the whole block */
        memcpy((char*)a->kc + dst * e, (const char*)a->past_k + src * e, (size_t)(a->cap * a->D) * e);
        memcpy((char*)a->vc + dst * e, (const char*)a->past_v + src * e, (size_t)(a->cap * a->D) * e);
        continue;
      }
      for (int64_t p = 0; p < a->past[b]; p++)
        for (int64_t d = 0; d < a->D; d++) {
          store1(a->kc, dst + key_index(p, d, a->cap, a->D),
                 load1(a->past_k, src + key_index(p, d, a->past_cap, a->D), a->f16), a->f16);
          store1(a->vc, dst + p * a->D + d, load1(a->past_v, src + p * a->D + d, a->f16), a->f16);
        }
    }
}

void attn_prepare(const attn_args* a, int64_t t0, int64_t t1) {
  float y[1024];
  for (int64_t t = t0; t < t1; t++) {
    int64_t b = t / a->S, s = t % a->S, pos = a->past[b] + s;
    for (int64_t h = 0; h < a->H; h++) {
      const float* x = a->q + t * a->q_stride + h * a->D;
      float* dst = a->qbuf + (t * a->H + h) * a->D;
      if (a->R)
        rotate(a, x, pos, dst, a->scale);
      else
        for (int64_t d = 0; d < a->D; d++) dst[d] = x[d] * a->scale;
    }
    for (int64_t h = 0; h < a->KVH; h++) {
      const float* x = a->k + t * a->k_stride + h * a->D;
      int64_t base = block_of(a, b, h, a->cap);
      if (a->R)
        rotate(a, x, pos, y, 1.0f);
      else
        memcpy(y, x, (size_t)a->D * sizeof(float));
      for (int64_t d = 0; d < a->D; d++) store1(a->kc, base + key_index(pos, d, a->cap, a->D), y[d], a->f16);
      const float* v = a->v + t * a->v_stride + h * a->D;
      for (int64_t d = 0; d < a->D; d += 16) store16(a->vc, base + pos * a->D + d, _mm512_loadu_ps(v + d), a->f16);
    }
  }
}

/* -- attention ----------------------------------------------------------------------------- */
/* scores of keys [j0, j0 + 16) for ROWS query rows (q[r] of D floats) into s[r][0..16) */
static inline void score_tile(const void* kblock, int64_t j0, int64_t cap, int64_t D, int f16,
                              const float* const* q, float* const* s) {
  __m512 acc[ROWS];
  for (int r = 0; r < ROWS; r++) acc[r] = _mm512_setzero_ps();
  if (j0 + 16 <= (cap & ~(int64_t)15)) {
    int64_t t = (j0 >> 4) * 16 * D;
    for (int64_t d = 0; d < D; d++) {
      __m512 k = load16(kblock, t + d * 16, f16);
      for (int r = 0; r < ROWS; r++) acc[r] = _mm512_fmadd_ps(_mm512_set1_ps(q[r][d]), k, acc[r]);
    }
    for (int r = 0; r < ROWS; r++) _mm512_storeu_ps(s[r], acc[r]);
    return;
  }
  for (int64_t j = 0; j < 16; j++) {  /* the tail: keys stored by position */
    int64_t p = j0 + j;
    if (p >= cap) {
      for (int r = 0; r < ROWS; r++) s[r][j] = 0.0f;
      continue;
    }
    for (int r = 0; r < ROWS; r++) {
      __m512 sum = _mm512_setzero_ps();
      for (int64_t d = 0; d < D; d += 16)
        sum = _mm512_fmadd_ps(_mm512_loadu_ps(q[r] + d), load16(kblock, p * D + d, f16), sum);
      s[r][j] = _mm512_reduce_add_ps(sum);
    }
  }
}

static inline __mmask16 range_mask(int64_t j, int64_t lo, int64_t hi) {
  /* lanes j .. j + 15 within [lo, hi) */
  uint32_t m = 0xFFFF;
  if (lo > j) m = lo - j >= 16 ? 0 : m & (0xFFFFu << (lo - j));
  if (hi < j + 16) m = hi <= j ? 0 : m & (0xFFFFu >> (j + 16 - hi));
  return (__mmask16)m;
}

static inline __m512 softcap_ps(__m512 x, float cap) {  /* cap * tanh(x / cap) */
  __m512 e = exp_ps(_mm512_mul_ps(x, _mm512_set1_ps(2.0f / cap)));
  __m512 t = _mm512_sub_ps(_mm512_set1_ps(1.0f),
                           _mm512_div_ps(_mm512_set1_ps(2.0f), _mm512_add_ps(e, _mm512_set1_ps(1.0f))));
  return _mm512_mul_ps(t, _mm512_set1_ps(cap));
}

void attn_item(const attn_args* a, int64_t item) {
  int64_t set = item / a->chunks, c = item % a->chunks;
  int64_t b, kvh, head[ROWS], tok[ROWS];
  int n = set_rows(a, set, &b, &kvh, head, tok);
  int64_t D = a->D, c0 = c * a->chunk, c1 = c0 + a->chunk;
  int64_t lo[ROWS], hi[ROWS], A = INT64_MAX, Z = 0;
  const float* q[ROWS];
  for (int r = 0; r < ROWS; r++) {
    int rr = r < n ? r : 0;  /* missing rows repeat the first (their results are dropped) */
    int64_t pos = a->past[b] + tok[rr];
    q[r] = a->qbuf + ((b * a->S + tok[rr]) * a->H + head[rr]) * D;
    lo[r] = a->window > 0 && pos - a->window + 1 > 0 ? pos - a->window + 1 : 0;
    hi[r] = pos + 1;
    if (lo[r] < c0) lo[r] = c0;
    if (hi[r] > c1) hi[r] = c1;
    if (r < n && lo[r] < hi[r]) {
      if (lo[r] < A) A = lo[r];
      if (hi[r] > Z) Z = hi[r];
    }
  }
  float m[ROWS], l[ROWS];
  float* part = a->partial ? a->partial + (set * a->chunks + c) * ROWS * (D + 2) : NULL;
  if (A >= Z) {  /* no key of this chunk is visible to these rows */
    for (int r = 0; r < n && part; r++) { part[r * (D + 2)] = -INFINITY; part[r * (D + 2) + 1] = 0.0f; }
    return;
  }
  int64_t base = A & ~(int64_t)15;
  static __thread float scores[ROWS][MAX_CHUNK + 16];
  float* s[ROWS];
  const void* kblock = (const char*)a->kc + block_of(a, b, kvh, a->cap) * elem(a);
  const void* vblock = (const char*)a->vc + block_of(a, b, kvh, a->cap) * elem(a);
  for (int64_t j = base; j < Z; j += 16) {
    for (int r = 0; r < ROWS; r++) s[r] = scores[r] + (j - base);
    score_tile(kblock, j, a->cap, D, a->f16, q, s);
  }
  /* softmax of each row over its keys; probabilities of other keys are 0 */
  for (int r = 0; r < n; r++) {
    float* row = scores[r];
    __m512 mv = _mm512_set1_ps(-INFINITY);
    for (int64_t j = base; j < Z; j += 16) {
      __mmask16 k = range_mask(j, lo[r], hi[r]);
      __m512 x = _mm512_loadu_ps(row + (j - base));
      if (a->softcap > 0.0f) {
        x = softcap_ps(x, a->softcap);
        _mm512_storeu_ps(row + (j - base), x);
      }
      mv = _mm512_mask_max_ps(mv, k, mv, x);
    }
    m[r] = _mm512_reduce_max_ps(mv);
    __m512 lv = _mm512_setzero_ps(), mr = _mm512_set1_ps(m[r]);
    for (int64_t j = base; j < Z; j += 16) {
      __mmask16 k = range_mask(j, lo[r], hi[r]);
      __m512 p = _mm512_maskz_mov_ps(k, exp_ps(_mm512_sub_ps(_mm512_loadu_ps(row + (j - base)), mr)));
      _mm512_storeu_ps(row + (j - base), p);
      lv = _mm512_add_ps(lv, p);
    }
    l[r] = _mm512_reduce_add_ps(lv);
  }
  /* probabilities x values, 64 dimensions at a time */
  for (int64_t d0 = 0; d0 < D; d0 += 64) {
    int nv = (int)((D - d0) / 16 < 4 ? (D - d0) / 16 : 4);
    __m512 acc[ROWS][4];
    for (int r = 0; r < ROWS; r++)
      for (int v = 0; v < 4; v++) acc[r][v] = _mm512_setzero_ps();
    for (int64_t j = A; j < Z; j++) {
      __m512 x[4];
      for (int v = 0; v < 4; v++) x[v] = v < nv ? load16(vblock, j * D + d0 + 16 * v, a->f16) : _mm512_setzero_ps();
      for (int r = 0; r < ROWS; r++) {
        __m512 p = _mm512_set1_ps(scores[r][j - base]);
        for (int v = 0; v < 4; v++) acc[r][v] = _mm512_fmadd_ps(p, x[v], acc[r][v]);
      }
    }
    for (int r = 0; r < n; r++) {
      if (part) {
        float* dst = part + r * (D + 2) + 2 + d0;
        for (int v = 0; v < nv; v++) _mm512_storeu_ps(dst + 16 * v, acc[r][v]);
      } else {
        float* dst = a->out + ((b * a->S + tok[r]) * a->H + head[r]) * D + d0;
        __m512 inv = _mm512_set1_ps(1.0f / l[r]);
        for (int v = 0; v < nv; v++) _mm512_storeu_ps(dst + 16 * v, _mm512_mul_ps(acc[r][v], inv));
      }
    }
  }
  for (int r = 0; r < n && part; r++) {
    part[r * (D + 2)] = m[r];
    part[r * (D + 2) + 1] = l[r];
  }
}

void attn_combine(const attn_args* a, int64_t s0, int64_t s1) {
  int64_t D = a->D;
  for (int64_t set = s0; set < s1; set++) {
    int64_t b, kvh, head[ROWS], tok[ROWS];
    int n = set_rows(a, set, &b, &kvh, head, tok);
    for (int r = 0; r < n; r++) {
      float M = -INFINITY, L = 0.0f;
      for (int64_t c = 0; c < a->chunks; c++) {
        const float* part = a->partial + ((set * a->chunks + c) * ROWS + r) * (D + 2);
        if (part[1] > 0.0f && part[0] > M) M = part[0];
      }
      float* dst = a->out + ((b * a->S + tok[r]) * a->H + head[r]) * D;
      for (int64_t d = 0; d < D; d++) dst[d] = 0.0f;
      for (int64_t c = 0; c < a->chunks; c++) {
        const float* part = a->partial + ((set * a->chunks + c) * ROWS + r) * (D + 2);
        if (!(part[1] > 0.0f)) continue;
        float w = expf(part[0] - M);
        L += w * part[1];
        for (int64_t d = 0; d < D; d++) dst[d] += w * part[2 + d];
      }
      for (int64_t d = 0; d < D; d++) dst[d] /= L;
    }
  }
}
