/* modelfold's float32 matrix products.

   Y = A B with B [K][N] a constant (ONNX's MatMul layout: every float32 projection and an untied
   LM head): B is packed once, when the kernel is created, into panels of 32 columns, [N/32][K][32]
   (the last panel padded with zeros). One layout serves both shapes of the work:
   - a decode step's GEMV (a few rows) streams each panel once, front to back;
   - a prompt's GEMM runs a 12 x 32 register tile: per k, two 16-float loads of the panel and one
     broadcast of each of 12 rows of A, read where they lie (A is not packed), 24 FMAs.
   Tasks take panels (columns) and blocks of rows; nothing is split by K, so each output is one
   running sum in k order.

   Y = A B^T with B [N][K] (a tied embedding table, which the embedding Gather reads too) is read
   in place: GEMV for up to F32_MAX_ROWS rows, split by N (each task streams its own rows). */
#ifndef MODELFOLD_F32_H
#define MODELFOLD_F32_H
#include <stdint.h>

#define F32_MAX_ROWS 8
#define F32_PANEL 32  /* columns of a panel */
#define F32_TILE 12   /* rows of A per register tile */

typedef struct {
  int64_t K, N, panels;
  float* p;  /* [panels][K][32], 64-byte aligned */
} f32_packed;

/* B [K][N] packed, shared by every kernel of the process that packs the same B (the same
   address and shape: a weight that tied layers read from several nodes is packed once); NULL
   when out of memory. *fresh is 1 when this call packed it (its caller may then release B's
   pages), 0 when another kernel had. Each call is matched by one f32_unpack. */
const f32_packed* f32_pack_shared(const float* B, int64_t K, int64_t N, int* fresh);
void f32_unpack(const f32_packed* w);
/* Y[m0:m1, columns of panels q0:q1] = A[m0:m1] B, with A's rows lda floats apart and Y's ldy */
void f32_gemm(const f32_packed* w, const float* A, int64_t lda, int64_t m0, int64_t m1, int64_t q0,
              int64_t q1, float* Y, int64_t ldy);
/* Y[:, n0:n1] = A B[n0:n1, :]^T for the M (<= F32_MAX_ROWS) rows of A [M][K], B [N][K] */
void f32_gemv_rows(const float* A, int64_t M, int64_t K, const float* B, int64_t N,
                   int64_t n0, int64_t n1, float* Y);
#endif
