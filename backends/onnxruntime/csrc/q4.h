/* modelfold's int4 GEMV / GEMM for ONNX Runtime's MatMulNBits layout (bits 4, blocks of 128,
   accuracy level 4: activations quantized to int8 per block of 128, as ONNX Runtime's MLAS does).

   Weights are repacked once, when the kernel is created, so that one 512-bit load holds a 4-byte
   word (8 int4 weights) of each of 16 output rows: VPDPBUSD then accumulates 16 rows at once, one
   int32 lane per row, and the block scales apply to 16 rows with one multiply-add (no horizontal
   sums). Needs AVX-512 F/BW and VNNI. */
#ifndef MODELFOLD_Q4_H
#define MODELFOLD_Q4_H
#include <stddef.h>
#include <stdint.h>

typedef struct {
  int64_t K, N, nblk, groups;  /* groups of 16 output rows */
  int64_t last_words;          /* words of the last block that hold K (even, <= 16) */
  int64_t group_words;         /* ((nblk - 1) * 16 + last_words) * 16 */
  uint32_t* words;             /* [groups][blocks: 16 words, the last last_words][16 rows] */
  float* scales;               /* [groups][nblk][16] */
  float* zeros;                /* [groups][nblk][16] zero points as floats */
} q4_weights;

/* The activations of M rows, quantized per block of 128 (scratch owned by the caller). */
typedef struct {
  int64_t M, nblk;
  int8_t* even;   /* [M][nblk][64]: elements 0, 2, 4, ... of each block (the low nibbles' partners) */
  int8_t* odd;    /* [M][nblk][64]: elements 1, 3, 5, ... */
  float* scale;   /* [M][nblk] */
  int32_t* sum;   /* [M][nblk]: sum of the int8 values */
} q4_act;

int q4_pack(q4_weights* w, const uint8_t* B, const float* S, const uint8_t* Z, int64_t K, int64_t N);
void q4_free(q4_weights* w);
size_t q4_act_bytes(int64_t M, int64_t nblk);
void q4_act_init(q4_act* a, void* memory, int64_t M, int64_t nblk);
void q4_quantize(q4_act* a, const float* A, int64_t K, int64_t m0, int64_t m1);
/* the same of silu(gate) * up, A's rows being [gate (K), up (K)] (a SwiGLU MLP's down projection);
   scratch: K floats */
void q4_quantize_swiglu(q4_act* a, const float* A, int64_t K, int64_t m0, int64_t m1, float* scratch);
/* the same of RMSNorm(A + skip) * gamma, also writing A + skip to sum (a residual add and the
   norm after it); scratch: K floats */
void q4_quantize_skip_rmsnorm(q4_act* a, const float* A, const float* skip, const float* gamma,
                              float epsilon, float* sum, int64_t K, int64_t m0, int64_t m1,
                              float* scratch);
/* Y [M][N] for the output row groups [g0, g1) and all M activation rows. */
void q4_matmul_groups(const q4_weights* w, const q4_act* a, float* Y, int64_t g0, int64_t g1);
#endif
