#include "f32.h"

#include "mem.h"
#include "vmath.h"

#include <immintrin.h>
#include <pthread.h>
#include <stdlib.h>

static int pack(f32_packed* w, const float* B, int64_t K, int64_t N) {
  w->K = K; w->N = N; w->panels = (N + F32_PANEL - 1) / F32_PANEL;
  w->p = aligned64((size_t)(w->panels * K * F32_PANEL) * sizeof(float));
  if (!w->p) return -1;
  for (int64_t q = 0; q < w->panels; q++) {
    int64_t n = q * F32_PANEL;
    __mmask16 m0 = tail_mask(N - n), m1 = tail_mask(N - n - 16);
    float* d = w->p + q * K * F32_PANEL;
    for (int64_t k = 0; k < K; k++) {
      const float* r = B + k * N + n;
      _mm512_store_ps(d + k * F32_PANEL, _mm512_maskz_loadu_ps(m0, r));
      _mm512_store_ps(d + k * F32_PANEL + 16, _mm512_maskz_loadu_ps(m1, r + 16));
    }
  }
  return 0;
}

/* the packed weights of the process, by source: a short list (one entry per float32 weight) */
typedef struct Shared {
  const float* source;
  int64_t refs;
  f32_packed w;
  struct Shared* next;
} Shared;
static Shared* shared = NULL;
static pthread_mutex_t shared_lock = PTHREAD_MUTEX_INITIALIZER;

const f32_packed* f32_pack_shared(const float* B, int64_t K, int64_t N, int* fresh) {
  pthread_mutex_lock(&shared_lock);
  Shared* s = shared;
  while (s && !(s->source == B && s->w.K == K && s->w.N == N)) s = s->next;
  *fresh = 0;
  if (s) {
    s->refs++;
  } else if ((s = calloc(1, sizeof *s)) != NULL) {
    if (pack(&s->w, B, K, N) != 0) {
      free(s);
      s = NULL;
    } else {
      s->source = B;
      s->refs = 1;
      s->next = shared;
      shared = s;
      *fresh = 1;
    }
  }
  pthread_mutex_unlock(&shared_lock);
  return s ? &s->w : NULL;
}

void f32_unpack(const f32_packed* w) {
  if (!w) return;
  pthread_mutex_lock(&shared_lock);
  for (Shared** at = &shared; *at; at = &(*at)->next) {
    if (&(*at)->w != w) continue;
    Shared* s = *at;
    if (--s->refs == 0) {
      *at = s->next;
      free(s->w.p);
      free(s);
    }
    break;
  }
  pthread_mutex_unlock(&shared_lock);
}

/* `rows` rows of A times `S` consecutive panels from P [S][K][32] -> Y [rows][ldy] (columns n,
   n + 32 S of N): inlined with constant rows and S, the rows x S x 2 accumulators stay in
   registers. A few rows (a decode step) take several panels at once: each is a stream of its
   own, and several streams draw more bandwidth from memory than one (32 against 26 GB/s on
   this machine's two cores). */
static inline __attribute__((always_inline)) void tile(const int rows, const int S, const float* A,
                                                       int64_t lda, const float* P, int64_t K,
                                                       float* Y, int64_t ldy, int64_t n, int64_t N,
                                                       const float* next, const float* next_a) {
  __m512 c[F32_TILE][4][2];
  int64_t row = 0, line = 0;  /* next_a's line to fetch: one a step, the rows in turn */
  for (int i = 0; i < rows; i++)
    for (int j = 0; j < S; j++) c[i][j][0] = c[i][j][1] = _mm512_setzero_ps();
  for (int64_t k = 0; k < K; k++, P += F32_PANEL) {
    if (next) {  /* the next panel into L2 while this one computes (a prompt's first tile) */
      _mm_prefetch((const char*)(next + k * F32_PANEL), _MM_HINT_T1);
      _mm_prefetch((const char*)(next + k * F32_PANEL + 16), _MM_HINT_T1);
    }
    if (next_a) {  /* the next tile's rows of A (a prompt's first panel, A not yet in L2) */
      if (line * 16 < K) _mm_prefetch((const char*)(next_a + row * lda + line * 16), _MM_HINT_T0);
      if (++row == F32_TILE) { row = 0; line++; }
    }
    __m512 b[4][2];
    for (int j = 0; j < S; j++) {
      b[j][0] = _mm512_load_ps(P + j * K * F32_PANEL);
      b[j][1] = _mm512_load_ps(P + j * K * F32_PANEL + 16);
    }
    for (int i = 0; i < rows; i++) {
      __m512 a = _mm512_set1_ps(A[i * lda + k]);
      for (int j = 0; j < S; j++) {
        c[i][j][0] = _mm512_fmadd_ps(a, b[j][0], c[i][j][0]);
        c[i][j][1] = _mm512_fmadd_ps(a, b[j][1], c[i][j][1]);
      }
    }
  }
  for (int j = 0; j < S; j++) {
    int64_t col = n + j * F32_PANEL;
    __mmask16 m0 = tail_mask(N - col), m1 = tail_mask(N - col - 16);
    for (int i = 0; i < rows; i++) {
      _mm512_mask_storeu_ps(Y + i * ldy + j * F32_PANEL, m0, c[i][j][0]);
      _mm512_mask_storeu_ps(Y + i * ldy + j * F32_PANEL + 16, m1, c[i][j][1]);
    }
  }
}

typedef void (*tile_fn)(const float*, int64_t, const float*, int64_t, float*, int64_t, int64_t,
                        int64_t, const float*, const float*);
#define TILE(r, s)                                                                               \
  static void tile##r##x##s(const float* A, int64_t lda, const float* P, int64_t K, float* Y,   \
                            int64_t ldy, int64_t n, int64_t N, const float* next,               \
                            const float* next_a) {                                              \
    if (next || next_a) tile(r, s, A, lda, P, K, Y, ldy, n, N, next, next_a);                   \
    else tile(r, s, A, lda, P, K, Y, ldy, n, N, NULL, NULL);                                    \
  }
TILE(1, 1) TILE(2, 1) TILE(3, 1) TILE(4, 1) TILE(5, 1) TILE(6, 1) TILE(7, 1) TILE(8, 1) TILE(9, 1)
TILE(10, 1) TILE(11, 1) TILE(12, 1) TILE(1, 4) TILE(2, 4) TILE(3, 4) TILE(4, 2) TILE(5, 2) TILE(6, 2)
/* by rows: one panel at a time, and the widest group of panels that fits the registers */
static const tile_fn narrow[F32_TILE + 1] = {NULL, tile1x1, tile2x1, tile3x1, tile4x1, tile5x1,
                                             tile6x1, tile7x1, tile8x1, tile9x1, tile10x1,
                                             tile11x1, tile12x1};
static const tile_fn wide[F32_TILE + 1] = {NULL, tile1x4, tile2x4, tile3x4, tile4x2, tile5x2,
                                           tile6x2, tile7x1, tile8x1, tile9x1, tile10x1, tile11x1,
                                           tile12x1};
static const int width[F32_TILE + 1] = {1, 4, 4, 4, 2, 2, 2, 1, 1, 1, 1, 1, 1};

void f32_gemm(const f32_packed* w, const float* A, int64_t lda, int64_t m0, int64_t m1, int64_t q0,
              int64_t q1, float* Y, int64_t ldy) {
  const int64_t K = w->K, step = K * F32_PANEL;
  if (m1 - m0 < F32_TILE) {  /* one tile of rows: panels in groups */
    int rows = (int)(m1 - m0), S = width[rows];
    int64_t q = q0;
    for (; q + S <= q1; q += S)
      wide[rows](A + m0 * lda, lda, w->p + q * step, K, Y + m0 * ldy + q * F32_PANEL, ldy,
                 q * F32_PANEL, w->N, NULL, NULL);
    for (; q < q1; q++)
      narrow[rows](A + m0 * lda, lda, w->p + q * step, K, Y + m0 * ldy + q * F32_PANEL, ldy,
                   q * F32_PANEL, w->N, NULL, NULL);
    return;
  }
  for (int64_t q = q0; q < q1; q++) {  /* a panel (in L2) against every tile of rows */
    const float *P = w->p + q * step, *next = q + 1 < q1 ? P + step : NULL;
    for (int64_t m = m0; m < m1; m += F32_TILE) {
      int rows = m1 - m < F32_TILE ? (int)(m1 - m) : F32_TILE;
      const float* next_a = q == q0 && m + 2 * F32_TILE <= m1 ? A + (m + F32_TILE) * lda : NULL;
      narrow[rows](A + m * lda, lda, P, K, Y + m * ldy + q * F32_PANEL, ldy, q * F32_PANEL, w->N,
                   m == m0 ? next : NULL, next_a);
    }
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
