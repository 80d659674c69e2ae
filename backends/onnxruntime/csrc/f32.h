/* modelfold's float32 GEMV for an LM head's few rows (the last position of each sequence while
   generating): Y = A B with B [K][N] (MatMul) or Y = A B^T with B [N][K] (a tied table, read in
   place by the embedding Gather too), read where it lies: no packed copy.

   B [K][N] is split between tasks by K: each task streams one contiguous stretch of B (four rows
   at a time into partial sums that stay in L1), and the partial sums are added at the end; split
   by N, every thread would read a strided slice of each row. B [N][K] is split by N: each task
   streams its own rows (four dot products at a time). */
#ifndef MODELFOLD_F32_H
#define MODELFOLD_F32_H
#include <stdint.h>

#define F32_MAX_ROWS 8
/* P [M][N] = A[:, k0:k1] B[k0:k1, :] for the M (<= F32_MAX_ROWS) rows of A [M][K] */
void f32_gemv_partial(const float* A, int64_t M, int64_t K, const float* B, int64_t N,
                      int64_t k0, int64_t k1, float* P);
/* Y [M][N] = the sum of the parts P[t] [M][N], t < parts, for the columns [n0, n1) */
void f32_sum_parts(const float* P, int64_t parts, int64_t M, int64_t N, int64_t n0, int64_t n1,
                   float* Y);
/* Y[:, n0:n1] = A B[n0:n1, :]^T for the M (<= F32_MAX_ROWS) rows of A [M][K], B [N][K] */
void f32_gemv_rows(const float* A, int64_t M, int64_t K, const float* B, int64_t N,
                   int64_t n0, int64_t n1, float* Y);
#endif
