/* modelfold's int8 GEMV / GEMM for ONNX Runtime's MatMulNBits layout (bits 8, blocks of 32,
   accuracy level 4: activations quantized to int8 per block of 32, as ONNX Runtime's MLAS does).

   The weights are repacked once, when the kernel is created, so that one 512-bit load holds a
   4-byte word (4 weights) of each of 16 output rows: VPDPBUSD (unsigned weights times signed
   activations) accumulates 16 rows at once, one int32 lane per row, and a block's scale and zero
   point apply to 16 rows with one multiply-add (no horizontal sums). Needs AVX-512 F/BW and VNNI. */
#ifndef MODELFOLD_Q8_H
#define MODELFOLD_Q8_H
#include <stddef.h>
#include <stdint.h>

#define Q8_BLOCK 32

typedef struct {
  int64_t K, N, nblk, groups;  /* groups of 16 output rows */
  uint32_t* words;             /* [groups][nblk][8 words][16 rows] */
  float* scales;               /* [groups][nblk][16] */
  float* zeros;                /* [groups][nblk][16] zero points as floats */
} q8_weights;

/* The activations of M rows, quantized per block of 32 (scratch owned by the caller). */
typedef struct {
  int64_t M, nblk;
  int8_t* q;      /* [M][nblk][32] */
  float* scale;   /* [M][nblk] */
  int32_t* sum;   /* [M][nblk]: sum of the int8 values */
} q8_act;

int q8_pack(q8_weights* w, const uint8_t* B, const float* S, const uint8_t* Z, int64_t K, int64_t N);
void q8_free(q8_weights* w);
size_t q8_act_bytes(int64_t M, int64_t nblk);
void q8_act_init(q8_act* a, void* memory, int64_t M, int64_t nblk);
void q8_quantize(q8_act* a, const float* A, int64_t K, int64_t m0, int64_t m1);
/* the same of silu(gate) * up, A's rows being [gate (K), up (K)]; scratch: K floats */
void q8_quantize_swiglu(q8_act* a, const float* A, int64_t K, int64_t m0, int64_t m1, float* scratch);
/* the same of RMSNorm(A + skip) * gamma, also writing A + skip to sum; scratch: K floats */
void q8_quantize_skip_rmsnorm(q8_act* a, const float* A, const float* skip, const float* gamma,
                              float epsilon, float* sum, int64_t K, int64_t m0, int64_t m1,
                              float* scratch);
/* Y [M][N] for the output row groups [g0, g1) and all M activation rows. */
void q8_matmul_groups(const q8_weights* w, const q8_act* a, float* Y, int64_t g0, int64_t g1);
#endif
