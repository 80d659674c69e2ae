/* modelfold's grouped-query attention over a KV cache for ONNX Runtime: com.microsoft's
   GroupQueryAttention (packed or separate q/k/v, rotary embedding inside, causal, a left window,
   soft-capping, past and present sharing one buffer) with the cache in the kernel's own layout,
   float32 or float16.

   The cache layout: one [capacity][D] block per (batch row, KV head), as GroupQueryAttention's, but
   the keys of the first floor(capacity / 16) * 16 positions are stored in tiles of 16 positions
   transposed ([tile][D][16]): the scores of 16 keys are then D multiply-adds of one vector each, with
   no horizontal sums. The last capacity % 16 positions are stored by position. Values are stored by
   position. The query heads of one KV head read its cache together (one pass over it); a decode
   step splits the cache into chunks across threads and combines their softmax partials. */
#ifndef MODELFOLD_ATTN_H
#define MODELFOLD_ATTN_H
#include <stddef.h>
#include <stdint.h>

typedef struct {
  int64_t B, S, H, KVH, D;   /* batch, new tokens, query heads, KV heads, head size */
  int64_t R, max_pos;        /* rotary width (0: none) and rows of the cos / sin tables */
  int64_t cap, past_cap;     /* positions of the present and the past buffers */
  int64_t window;            /* the last window keys, itself included (<= 0: all) */
  float scale, softcap;      /* softcap 0: none */
  int f16;                   /* cache in float16 */
  const float *q, *k, *v;    /* token t's q at q + t * q_stride (k, v likewise) */
  int64_t q_stride, k_stride, v_stride;
  const float *cos, *sin;    /* [max_pos][R / 2] */
  const void *past_k, *past_v;  /* [B][KVH][past_cap][D]; may be the present buffers */
  void *kc, *vc;             /* present [B][KVH][cap][D] */
  float* out;                /* [B][S][H * D] */
  const int64_t* past;       /* [B]: cache positions already written per row */
  /* scratch the caller allocates (attn_scratch_bytes) */
  float* qbuf;               /* [B][S][H][D]: rotated, scaled queries */
  float* partial;            /* [sets][chunks][4][D + 2] */
  int64_t chunk, chunks, sets;
} attn_args;

/* fills chunk / chunks / sets for these shapes and returns the scratch bytes needed */
size_t attn_plan(attn_args* a);
void attn_set_scratch(attn_args* a, void* memory);
/* copy each row's past positions from the past buffers when they are not the present ones */
void attn_copy_past(const attn_args* a);
/* rotary + scale of the queries, rotary + store of the new keys and values: tokens [t0, t1) */
void attn_prepare(const attn_args* a, int64_t t0, int64_t t1);
/* attention of item i = (row set, chunk): items [0, sets * chunks) */
void attn_item(const attn_args* a, int64_t i);
/* combines the chunks' partials into the output (chunks > 1): row sets [s0, s1) */
void attn_combine(const attn_args* a, int64_t s0, int64_t s1);
#endif
