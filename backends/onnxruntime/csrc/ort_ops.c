/* ONNX Runtime custom-op library: ai.modelfold::MatMulInt4, MatMulNBits (bits 4, block 128,
   accuracy level 4) computed by q4.c's kernel, and MatMulInt8 (q8.c); CachedAttention(F16)
   (attn.c), SwiGLU and MatMulF32 (f32.c), each described where it is defined below.

   Inputs: A [..., K] float; B [N, ceil(K/128), 64] uint8 and scales [N * ceil(K/128)] float (both
   initializers: they are repacked once, when the kernel is created); optional zero_points
   [N * ceil(ceil(K/128)/2)] uint8 (4-bit, an initializer; 8 when absent); optional bias [N] float;
   skip [..., K] and gamma [K] (activation 2). Attributes K, N, activation (0: none; 1: SwiGLU, A is
   [..., 2 K] = [gate, up] and the input is silu(gate) * up; 2: the input is
   RMSNorm(A + skip) * gamma, as ONNX Runtime's SkipSimplifiedLayerNormalization, epsilon), epsilon.
   Outputs: Y [..., N] float; optional sum [..., K] = A + skip (activation 2).

   The C API is reached through our own declarations of its ABI: OrtApi is a table of function
   pointers that only grows, so a function's slot never moves (slots checked against ONNX
   Runtime 1.30 and 1.32); the op asks for API version 17 (ONNX Runtime >= 1.17). */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <math.h>
#include <string.h>

#include "attn.h"
#include "f32.h"
#include "mem.h"
#include "q4.h"
#include "q8.h"
#include "vmath.h"

typedef struct OrtStatus OrtStatus;
typedef struct OrtValue OrtValue;
typedef struct OrtKernelInfo OrtKernelInfo;
typedef struct OrtKernelContext OrtKernelContext;
typedef struct OrtSessionOptions OrtSessionOptions;
typedef struct OrtCustomOpDomain OrtCustomOpDomain;
typedef struct OrtTensorTypeAndShapeInfo OrtTensorTypeAndShapeInfo;
typedef void* const* OrtApiTable;  /* the OrtApi struct seen as its slots */

typedef struct {
  OrtApiTable (*GetApi)(uint32_t version);
  const char* (*GetVersionString)(void);
} OrtApiBase;

enum { ELEM_UNDEFINED = 0, ELEM_FLOAT = 1, ELEM_UINT8 = 2, ELEM_INT32 = 6, ELEM_FLOAT16 = 10 };
enum { IO_REQUIRED = 0, IO_OPTIONAL = 1 };
enum { ORT_FAIL = 1, ORT_INVALID_ARGUMENT = 2 };
enum { OP_ATTR_INT = 1 };  /* OrtOpAttrType */
#define API_VERSION 17

/* slots of the OrtApi functions used here */
enum {
  SLOT_CreateStatus = 0,
  SLOT_CreateCustomOpDomain = 26,
  SLOT_CustomOpDomain_Add = 27,
  SLOT_AddCustomOpDomain = 28,
  SLOT_GetTensorMutableData = 51,
  SLOT_ReleaseStatus = 93,
  SLOT_GetDimensionsCount = 61,
  SLOT_GetDimensions = 62,
  SLOT_GetTensorTypeAndShape = 65,
  SLOT_KernelInfoGetAttribute_float = 85,
  SLOT_KernelInfoGetAttribute_int64 = 86,
  SLOT_KernelContext_GetOutputCount = 89,
  SLOT_KernelContext_GetInput = 90,
  SLOT_KernelContext_GetOutput = 91,
  SLOT_ReleaseTensorTypeAndShapeInfo = 99,
  SLOT_CreateOpAttr = 211,
  SLOT_ReleaseOpAttr = 212,
  SLOT_CreateOp = 213,
  SLOT_InvokeOp = 214,
  SLOT_ReleaseOp = 215,
  SLOT_KernelInfo_GetInputCount = 230,
  SLOT_KernelInfoGetConstantInput_tensor = 249,
  SLOT_KernelContext_ParallelFor = 274,
};

static OrtApiTable api;
#define CALL(type, slot) ((type)api[SLOT_##slot])

typedef OrtStatus* (*CreateStatus_t)(int code, const char* msg);
typedef OrtStatus* (*CreateCustomOpDomain_t)(const char* domain, OrtCustomOpDomain** out);
typedef OrtStatus* (*CustomOpDomain_Add_t)(OrtCustomOpDomain* domain, const void* op);
typedef OrtStatus* (*AddCustomOpDomain_t)(OrtSessionOptions* options, OrtCustomOpDomain* domain);
typedef OrtStatus* (*GetTensorMutableData_t)(OrtValue* value, void** out);
typedef OrtStatus* (*GetDimensionsCount_t)(const OrtTensorTypeAndShapeInfo* info, size_t* out);
typedef OrtStatus* (*GetDimensions_t)(const OrtTensorTypeAndShapeInfo* info, int64_t* dims, size_t n);
typedef OrtStatus* (*GetTensorTypeAndShape_t)(const OrtValue* value, OrtTensorTypeAndShapeInfo** out);
typedef OrtStatus* (*KernelInfoGetAttribute_float_t)(const OrtKernelInfo* info, const char* name, float* out);
typedef OrtStatus* (*KernelContext_GetOutputCount_t)(const OrtKernelContext* ctx, size_t* out);
typedef OrtStatus* (*KernelInfoGetAttribute_int64_t)(const OrtKernelInfo* info, const char* name, int64_t* out);
typedef OrtStatus* (*KernelContext_GetInput_t)(const OrtKernelContext* ctx, size_t index, const OrtValue** out);
typedef OrtStatus* (*KernelContext_GetOutput_t)(OrtKernelContext* ctx, size_t index, const int64_t* dims,
                                                size_t n, OrtValue** out);
typedef void (*ReleaseStatus_t)(OrtStatus* status);
typedef void (*ReleaseTensorTypeAndShapeInfo_t)(OrtTensorTypeAndShapeInfo* info);
typedef OrtStatus* (*KernelInfo_GetInputCount_t)(const OrtKernelInfo* info, size_t* out);
typedef OrtStatus* (*KernelInfoGetConstantInput_tensor_t)(const OrtKernelInfo* info, size_t index,
                                                          int* is_constant, const OrtValue** out);
typedef OrtStatus* (*CreateOpAttr_t)(const char* name, const void* data, int len, int type, void** attr);
typedef void (*ReleaseOpAttr_t)(void* attr);
typedef OrtStatus* (*CreateOp_t)(const OrtKernelInfo* info, const char* op_name, const char* domain, int version,
                                 const char** type_constraint_names, const int* type_constraint_values,
                                 int type_constraint_count, const void* const* attr_values, int attr_count,
                                 int input_count, int output_count, void** op);
typedef OrtStatus* (*InvokeOp_t)(const OrtKernelContext* ctx, const void* op, const OrtValue* const* inputs,
                                 int input_count, OrtValue* const* outputs, int output_count);
typedef void (*ReleaseOp_t)(void* op);
typedef OrtStatus* (*KernelContext_ParallelFor_t)(const OrtKernelContext* ctx, void (*fn)(void*, size_t),
                                                  size_t total, size_t num_batch, void* data);

/* the OrtCustomOp struct: a version, then callbacks in a fixed order */
typedef struct {
  uint32_t version;
  void* (*CreateKernel)(const void* op, OrtApiTable api, const OrtKernelInfo* info);
  const char* (*GetName)(const void* op);
  const char* (*GetExecutionProviderType)(const void* op);
  int (*GetInputType)(const void* op, size_t index);
  size_t (*GetInputTypeCount)(const void* op);
  int (*GetOutputType)(const void* op, size_t index);
  size_t (*GetOutputTypeCount)(const void* op);
  void (*KernelCompute)(void* kernel, OrtKernelContext* ctx);
  void (*KernelDestroy)(void* kernel);
  int (*GetInputCharacteristic)(const void* op, size_t index);
  int (*GetOutputCharacteristic)(const void* op, size_t index);
  int (*GetInputMemoryType)(const void* op, size_t index);
  int (*GetVariadicInputMinArity)(const void* op);
  int (*GetVariadicInputHomogeneity)(const void* op);
  int (*GetVariadicOutputMinArity)(const void* op);
  int (*GetVariadicOutputHomogeneity)(const void* op);
  OrtStatus* (*CreateKernelV2)(const void* op, OrtApiTable api, const OrtKernelInfo* info, void** kernel);
  OrtStatus* (*KernelComputeV2)(void* kernel, OrtKernelContext* ctx);
  void* InferOutputShapeFn;
  int (*GetStartVersion)(const void* op);
  int (*GetEndVersion)(const void* op);
  void* GetMayInplace;
  void* ReleaseMayInplace;
  void* GetAliasMap;
  void* ReleaseAliasMap;
} CustomOp;

static OrtStatus* fail(int code, const char* message) {
  return CALL(CreateStatus_t, CreateStatus)(code, message);
}

#define CHECK(expr) do { OrtStatus* status_ = (expr); if (status_) return status_; } while (0)

/* shape of a tensor value: up to 8 dims */
static OrtStatus* shape_of(const OrtValue* value, int64_t* dims, size_t* rank) {
  OrtTensorTypeAndShapeInfo* info = NULL;
  CHECK(CALL(GetTensorTypeAndShape_t, GetTensorTypeAndShape)(value, &info));
  OrtStatus* status = CALL(GetDimensionsCount_t, GetDimensionsCount)(info, rank);
  if (!status && *rank > 8) status = fail(ORT_INVALID_ARGUMENT, "MatMulInt4: more than 8 dimensions");
  if (!status) status = CALL(GetDimensions_t, GetDimensions)(info, dims, *rank);
  CALL(ReleaseTensorTypeAndShapeInfo_t, ReleaseTensorTypeAndShapeInfo)(info);
  return status;
}

static int64_t elements(const int64_t* dims, size_t rank) {
  int64_t n = 1;
  for (size_t i = 0; i < rank; i++) n *= dims[i];
  return n;
}

static OrtStatus* data_of(const OrtValue* value, void** out) {
  return CALL(GetTensorMutableData_t, GetTensorMutableData)((OrtValue*)value, out);
}

enum { ACT_NONE = 0, ACT_SWIGLU = 1, ACT_SKIP_RMSNORM = 2 };

/* The input of a projection with a fused activation (MatMulInt4 / MatMulInt8 / MatMulF32, named
   `op` in the errors): A [..., K] ([..., 2 K] for SwiGLU) gives the shape (dims, rank) and the rows
   M; for skip + RMSNorm, inputs skip_input and skip_input + 1 are skip (A's shape) and gamma [K],
   and output 1, where bound, the sum. */
static OrtStatus* fused_input(OrtKernelContext* ctx, const char* op, int64_t activation, int64_t K,
                              size_t skip_input, const OrtValue* A, int64_t* dims, size_t* rank,
                              int64_t* M, const float** skip, const float** gamma, float** sum) {
  char message[160];
  CHECK(shape_of(A, dims, rank));
  int64_t width = activation == ACT_SWIGLU ? 2 * K : K;  /* SwiGLU: [gate, up] */
  if (*rank < 1 || dims[*rank - 1] != width) {
    snprintf(message, sizeof message, activation == ACT_SWIGLU ? "%s: A's last dimension != 2 K (SwiGLU)"
                                                               : "%s: A's last dimension != K", op);
    return fail(ORT_INVALID_ARGUMENT, message);
  }
  *M = elements(dims, *rank) / width;
  *skip = *gamma = *sum = NULL;
  if (activation != ACT_SKIP_RMSNORM) return NULL;
  const OrtValue *S = NULL, *G = NULL;
  CHECK(CALL(KernelContext_GetInput_t, KernelContext_GetInput)(ctx, skip_input, &S));
  CHECK(CALL(KernelContext_GetInput_t, KernelContext_GetInput)(ctx, skip_input + 1, &G));
  int64_t sdims[8], gdims[8];
  size_t srank = 0, grank = 0;
  if (!S || !G) {
    snprintf(message, sizeof message, "%s: activation 2 needs skip and gamma", op);
    return fail(ORT_INVALID_ARGUMENT, message);
  }
  CHECK(shape_of(S, sdims, &srank));
  CHECK(shape_of(G, gdims, &grank));
  if (elements(sdims, srank) != *M * K || elements(gdims, grank) != K) {
    snprintf(message, sizeof message, "%s: skip must have A's shape and gamma K elements", op);
    return fail(ORT_INVALID_ARGUMENT, message);
  }
  CHECK(data_of(S, (void**)skip));
  CHECK(data_of(G, (void**)gamma));
  size_t outputs = 0;
  CHECK(CALL(KernelContext_GetOutputCount_t, KernelContext_GetOutputCount)(ctx, &outputs));
  if (outputs > 1) {
    OrtValue* Sum = NULL;
    CHECK(CALL(KernelContext_GetOutput_t, KernelContext_GetOutput)(ctx, 1, dims, *rank, &Sum));
    if (Sum) CHECK(data_of(Sum, (void**)sum));
  }
  return NULL;
}

/* -- the op ------------------------------------------------------------------------------- */
static const char* op_name(const void* op) { (void)op; return "MatMulInt4"; }
static const char* op8_name(const void* op) { (void)op; return "MatMulInt8"; }
static const char* op_provider(const void* op) { (void)op; return "CPUExecutionProvider"; }
static int op_input_type(const void* op, size_t i) {
  (void)op;
  return (i == 1 || i == 3) ? ELEM_UINT8 : ELEM_FLOAT;
}
static size_t op_input_count(const void* op) { (void)op; return 7; }
static int op_output_type(const void* op, size_t i) { (void)op; (void)i; return ELEM_FLOAT; }
static size_t op_output_count(const void* op) { (void)op; return 2; }
static int op_input_characteristic(const void* op, size_t i) { (void)op; return i >= 3 ? IO_OPTIONAL : IO_REQUIRED; }
static int op_output_characteristic(const void* op, size_t i) { (void)op; return i >= 1 ? IO_OPTIONAL : IO_REQUIRED; }
static int op_memory_type(const void* op, size_t i) { (void)op; (void)i; return 0; }
static int op_one(const void* op) { (void)op; return 1; }
static size_t op_one_count(const void* op) { (void)op; return 1; }
static int op_start_version(const void* op) { (void)op; return 1; }

/* an OrtCustomOp of this library: CPU, version 1, no variadic inputs or outputs */
#define CUSTOM_OP(name, in_type, in_count, out_type, out_count, destroy, in_char, out_char, create, compute) \
  {API_VERSION, NULL, name, op_provider, in_type, in_count, out_type, out_count, NULL, destroy,      \
   in_char, out_char, op_memory_type, op_one, op_one, op_one, op_one, create, compute, NULL,         \
   op_start_version, op_start_version, NULL, NULL, NULL, NULL}

/* bits 4 (MatMulInt4: blocks of 128, q4.c) or 8 (MatMulInt8: blocks of 32, q8.c) */
typedef struct { int bits; q4_weights w; q8_weights w8; int64_t activation; float epsilon; } Kernel;
typedef struct { int64_t K, N, nblk, groups; } Dims;

static Dims dims_of(const Kernel* k) {
  Dims d = k->bits == 8 ? (Dims){k->w8.K, k->w8.N, k->w8.nblk, k->w8.groups}
                        : (Dims){k->w.K, k->w.N, k->w.nblk, k->w.groups};
  return d;
}

static OrtStatus* constant_input(const OrtKernelInfo* info, size_t index, const char* what,
                                 const OrtValue** value) {
  int is_constant = 0;
  CHECK(CALL(KernelInfoGetConstantInput_tensor_t, KernelInfoGetConstantInput_tensor)(info, index, &is_constant,
                                                                                     value));
  if (!is_constant || !*value) {
    static char message[160];
    snprintf(message, sizeof message, "MatMulInt4: %s must be an initializer (a constant)", what);
    return fail(ORT_INVALID_ARGUMENT, message);
  }
  return NULL;
}

static OrtStatus* create_bits(const OrtKernelInfo* info, void** out, int bits) {
  const int64_t block = bits == 8 ? Q8_BLOCK : 128;
  int64_t K = 0, N = 0;
  CHECK(CALL(KernelInfoGetAttribute_int64_t, KernelInfoGetAttribute_int64)(info, "K", &K));
  CHECK(CALL(KernelInfoGetAttribute_int64_t, KernelInfoGetAttribute_int64)(info, "N", &N));
  if (K <= 0 || N <= 0) return fail(ORT_INVALID_ARGUMENT, "MatMulInt4/8: K and N must be positive");
  int64_t activation = 0;  /* optional attribute */
  OrtStatus* missing = CALL(KernelInfoGetAttribute_int64_t, KernelInfoGetAttribute_int64)(info, "activation", &activation);
  if (missing) { CALL(ReleaseStatus_t, ReleaseStatus)(missing); activation = 0; }
  if (activation < ACT_NONE || activation > ACT_SKIP_RMSNORM)
    return fail(ORT_INVALID_ARGUMENT, "MatMulInt4: activation must be 0 (none), 1 (SwiGLU) or 2 (skip + RMSNorm)");
  float epsilon = 1e-5f;
  missing = CALL(KernelInfoGetAttribute_float_t, KernelInfoGetAttribute_float)(info, "epsilon", &epsilon);
  if (missing) { CALL(ReleaseStatus_t, ReleaseStatus)(missing); epsilon = 1e-5f; }
  size_t inputs = 0;
  CHECK(CALL(KernelInfo_GetInputCount_t, KernelInfo_GetInputCount)(info, &inputs));
  const OrtValue *B = NULL, *S = NULL, *Z = NULL;
  CHECK(constant_input(info, 1, "B", &B));
  CHECK(constant_input(info, 2, "scales", &S));
  if (inputs > 3) {  /* an absent optional input is not constant: leave Z NULL */
    int is_constant = 0;
    CHECK(CALL(KernelInfoGetConstantInput_tensor_t, KernelInfoGetConstantInput_tensor)(info, 3, &is_constant, &Z));
    if (!is_constant) Z = NULL;
  }
  int64_t nblk = (K + block - 1) / block, dims[8];
  size_t rank = 0;
  CHECK(shape_of(B, dims, &rank));
  if (elements(dims, rank) != N * nblk * (block * bits / 8))
    return fail(ORT_INVALID_ARGUMENT, bits == 8 ? "MatMulInt8: B must hold N x ceil(K/32) x 32 bytes"
                                                : "MatMulInt4: B must hold N x ceil(K/128) x 64 bytes");
  CHECK(shape_of(S, dims, &rank));
  if (elements(dims, rank) != N * nblk)
    return fail(ORT_INVALID_ARGUMENT, "MatMulInt4/8: scales must hold N x (blocks of K) floats");
  if (Z) {
    CHECK(shape_of(Z, dims, &rank));
    if (elements(dims, rank) != N * (bits == 8 ? nblk : (nblk + 1) / 2))
      return fail(ORT_INVALID_ARGUMENT, bits == 8 ? "MatMulInt8: zero_points must hold N x ceil(K/32) bytes"
                                                  : "MatMulInt4: zero_points must hold N x ceil(ceil(K/128)/2) bytes");
  }
  void *b = NULL, *s = NULL, *z = NULL;
  CHECK(CALL(GetTensorMutableData_t, GetTensorMutableData)((OrtValue*)B, &b));
  CHECK(CALL(GetTensorMutableData_t, GetTensorMutableData)((OrtValue*)S, &s));
  if (Z) CHECK(CALL(GetTensorMutableData_t, GetTensorMutableData)((OrtValue*)Z, &z));
  Kernel* kernel = calloc(1, sizeof(Kernel));
  if (kernel) kernel->bits = bits;
  if (!kernel || (bits == 8 ? q8_pack(&kernel->w8, b, s, z, K, N) : q4_pack(&kernel->w, b, s, z, K, N)) != 0) {
    free(kernel);
    return fail(ORT_FAIL, "MatMulInt4/8: out of memory repacking the weights");
  }
  kernel->activation = activation;
  kernel->epsilon = epsilon;
  /* the kernel reads its repacked copy from now on: ONNX Runtime's memory-mapped original
     leaves the resident set (nothing is dropped where it is not a clean file page) */
  release_file_pages(b, (size_t)(N * nblk * (block * bits / 8)));
  release_file_pages(s, (size_t)(N * nblk) * sizeof(float));
  *out = kernel;
  return NULL;
}

static OrtStatus* create_kernel(const void* op, OrtApiTable api_, const OrtKernelInfo* info, void** out) {
  (void)op; (void)api_;
  return create_bits(info, out, 4);
}
static OrtStatus* create_kernel8(const void* op, OrtApiTable api_, const OrtKernelInfo* info, void** out) {
  (void)op; (void)api_;
  return create_bits(info, out, 8);
}

static void destroy_kernel(void* p) {
  Kernel* kernel = p;
  if (kernel) { q4_free(&kernel->w); q8_free(&kernel->w8); }
  free(kernel);
}

typedef struct {
  const Kernel* k;
  Dims d;
  q4_act act;
  q8_act act8;
  int64_t M;
  const float* A;
  float* Y;
  int64_t rows_per_task;
  int64_t groups_per_task;
  int64_t activation;
  float epsilon;
  const float *skip, *gamma;
  float* sum;
  int failed;  /* a task could not allocate its scratch */
} Work;

static void quantize_task(void* data, size_t i) {
  Work* work = data;
  int64_t K = work->d.K, m0 = (int64_t)i * work->rows_per_task, m1 = m0 + work->rows_per_task;
  int q8 = work->k->bits == 8;
  if (m1 > work->M) m1 = work->M;
  if (work->activation == ACT_NONE) {
    if (q8) q8_quantize(&work->act8, work->A, K, m0, m1);
    else q4_quantize(&work->act, work->A, K, m0, m1);
    return;
  }
  float small[4096];
  float* scratch = K <= 4096 ? small : malloc((size_t)K * sizeof(float));
  if (!scratch) { work->failed = 1; return; }
  if (work->activation == ACT_SWIGLU && q8)
    q8_quantize_swiglu(&work->act8, work->A, K, m0, m1, scratch);
  else if (work->activation == ACT_SWIGLU)
    q4_quantize_swiglu(&work->act, work->A, K, m0, m1, scratch);
  else if (q8)
    q8_quantize_skip_rmsnorm(&work->act8, work->A, work->skip, work->gamma, work->epsilon, work->sum, K,
                             m0, m1, scratch);
  else
    q4_quantize_skip_rmsnorm(&work->act, work->A, work->skip, work->gamma, work->epsilon, work->sum, K,
                             m0, m1, scratch);
  if (scratch != small) free(scratch);
}

static void matmul_task(void* data, size_t i) {
  Work* work = data;  /* task i: groups [i * per, (i + 1) * per) */
  int64_t g0 = (int64_t)i * work->groups_per_task, g1 = g0 + work->groups_per_task;
  if (g1 > work->d.groups) g1 = work->d.groups;
  if (work->k->bits == 8) q8_matmul_groups(&work->k->w8, &work->act8, work->Y, g0, g1);
  else q4_matmul_groups(&work->k->w, &work->act, work->Y, g0, g1);
}

static OrtStatus* compute(void* p, OrtKernelContext* ctx) {
  Kernel* kernel = p;
  const Dims dd = dims_of(kernel), *w = &dd;
  const OrtValue *A = NULL, *bias = NULL;
  CHECK(CALL(KernelContext_GetInput_t, KernelContext_GetInput)(ctx, 0, &A));
  CHECK(CALL(KernelContext_GetInput_t, KernelContext_GetInput)(ctx, 4, &bias));
  int64_t dims[8], M = 0;
  size_t rank = 0;
  const float *skip = NULL, *gamma = NULL;
  float* sum = NULL;
  CHECK(fused_input(ctx, kernel->bits == 8 ? "MatMulInt8" : "MatMulInt4", kernel->activation, w->K, 5, A,
                    dims, &rank, &M, &skip, &gamma, &sum));
  void *a = NULL, *y = NULL;
  dims[rank - 1] = w->N;
  OrtValue* Y = NULL;
  CHECK(CALL(KernelContext_GetOutput_t, KernelContext_GetOutput)(ctx, 0, dims, rank, &Y));
  CHECK(CALL(GetTensorMutableData_t, GetTensorMutableData)((OrtValue*)A, &a));
  CHECK(CALL(GetTensorMutableData_t, GetTensorMutableData)(Y, &y));
  if (M == 0) return NULL;
  Work work = {kernel, dd, {0}, {0}, M, a, y, 16, 2, kernel->activation, kernel->epsilon, skip, gamma, sum, 0};
  size_t bytes = kernel->bits == 8 ? q8_act_bytes(M, w->nblk) : q4_act_bytes(M, w->nblk);
  char stack[16384];
  void* memory = bytes <= sizeof stack ? (void*)stack : malloc(bytes);
  if (!memory) return fail(ORT_FAIL, "MatMulInt4: out of memory for the activations");
  if (kernel->bits == 8) q8_act_init(&work.act8, memory, M, w->nblk);
  else q4_act_init(&work.act, memory, M, w->nblk);
  OrtStatus* status = NULL;
  if (M <= work.rows_per_task) {
    quantize_task(&work, 0);
  } else {
    status = CALL(KernelContext_ParallelFor_t, KernelContext_ParallelFor)(
        ctx, quantize_task, (size_t)((M + work.rows_per_task - 1) / work.rows_per_task), 0, &work);
  }
  if (!status && work.failed) status = fail(ORT_FAIL, "MatMulInt4: out of memory for the activation scratch");
  if (!status)
    status = CALL(KernelContext_ParallelFor_t, KernelContext_ParallelFor)(ctx, matmul_task, (size_t)((w->groups + 1) / 2), 0,
                                                                         &work);
  if (!status && bias) {
    void* b = NULL;
    status = CALL(GetTensorMutableData_t, GetTensorMutableData)((OrtValue*)bias, &b);
    for (int64_t m = 0; !status && m < M; m++)
      for (int64_t n = 0; n < w->N; n++) ((float*)y)[m * w->N + n] += ((const float*)b)[n];
  }
  if (memory != stack) free(memory);
  return status;
}

static const CustomOp matmul_int4 = CUSTOM_OP(
    op_name, op_input_type, op_input_count, op_output_type, op_output_count,
    destroy_kernel, op_input_characteristic, op_output_characteristic, create_kernel, compute);

static const CustomOp matmul_int8 = CUSTOM_OP(
    op8_name, op_input_type, op_input_count, op_output_type, op_output_count,
    destroy_kernel, op_input_characteristic, op_output_characteristic, create_kernel8, compute);

/* -- ai.modelfold::CachedAttention / CachedAttentionF16 ----------------------------------------
   com.microsoft::GroupQueryAttention's inputs 0-8 and outputs (attn.h): query [B, S, H*D] (or
   packed [B, S, (H + 2 KVH) * D] when key and value are absent), key, value, past_key, past_value
   [B, KVH, P, D] (float32, or float16 for CachedAttentionF16, in attn.h's layout), seqlens_k [B]
   and total_sequence_length (int32), cos_cache, sin_cache [max_pos, R / 2]. Attributes num_heads,
   kv_num_heads, scale (0: 1 / sqrt(D)), softcap, local_window_size. Present [B, KVH, max(total,
   P), D]: bound to the past's buffer, only the new positions are written. The first prompt is a
   call whose S equals total_sequence_length (positions from 0); otherwise row b's new tokens sit at
   seqlens_k[b] + 1 - S. */
typedef struct { int64_t H, KVH, window; float scale, softcap; int f16; } AttnKernel;

static const char* attn_name(const void* op) { (void)op; return "CachedAttention"; }
static const char* attn16_name(const void* op) { (void)op; return "CachedAttentionF16"; }
static int attn_input_type(const void* op, size_t i) {
  (void)op;
  return i == 5 || i == 6 ? ELEM_INT32 : i == 3 || i == 4 ? ELEM_FLOAT : ELEM_FLOAT;
}
static int attn16_input_type(const void* op, size_t i) {
  (void)op;
  return i == 5 || i == 6 ? ELEM_INT32 : i == 3 || i == 4 ? ELEM_FLOAT16 : ELEM_FLOAT;
}
static size_t attn_input_count(const void* op) { (void)op; return 9; }
static int attn_output_type(const void* op, size_t i) { (void)op; (void)i; return ELEM_FLOAT; }
static int attn16_output_type(const void* op, size_t i) { (void)op; return i == 0 ? ELEM_FLOAT : ELEM_FLOAT16; }
static size_t attn_output_count(const void* op) { (void)op; return 3; }
static int attn_input_characteristic(const void* op, size_t i) {
  (void)op;
  return i == 1 || i == 2 || i == 7 || i == 8 ? IO_OPTIONAL : IO_REQUIRED;
}
static int attn_output_characteristic(const void* op, size_t i) { (void)op; (void)i; return IO_REQUIRED; }

static OrtStatus* int_attribute(const OrtKernelInfo* info, const char* name, int64_t fallback, int64_t* out) {
  OrtStatus* missing = CALL(KernelInfoGetAttribute_int64_t, KernelInfoGetAttribute_int64)(info, name, out);
  if (missing) { CALL(ReleaseStatus_t, ReleaseStatus)(missing); *out = fallback; }
  return NULL;
}

static OrtStatus* float_attribute(const OrtKernelInfo* info, const char* name, float fallback, float* out) {
  OrtStatus* missing = CALL(KernelInfoGetAttribute_float_t, KernelInfoGetAttribute_float)(info, name, out);
  if (missing) { CALL(ReleaseStatus_t, ReleaseStatus)(missing); *out = fallback; }
  return NULL;
}

static OrtStatus* create_attn(const void* op, const OrtKernelInfo* info, void** out, int f16) {
  (void)op;
  AttnKernel k = {0, 0, -1, 0.0f, 0.0f, f16};
  CHECK(CALL(KernelInfoGetAttribute_int64_t, KernelInfoGetAttribute_int64)(info, "num_heads", &k.H));
  CHECK(CALL(KernelInfoGetAttribute_int64_t, KernelInfoGetAttribute_int64)(info, "kv_num_heads", &k.KVH));
  if (k.H <= 0 || k.KVH <= 0 || k.H % k.KVH)
    return fail(ORT_INVALID_ARGUMENT, "CachedAttention: num_heads must be a positive multiple of kv_num_heads");
  CHECK(int_attribute(info, "local_window_size", -1, &k.window));
  CHECK(float_attribute(info, "scale", 0.0f, &k.scale));
  CHECK(float_attribute(info, "softcap", 0.0f, &k.softcap));
  AttnKernel* kernel = malloc(sizeof *kernel);
  if (!kernel) return fail(ORT_FAIL, "CachedAttention: out of memory");
  *kernel = k;
  *out = kernel;
  return NULL;
}
static OrtStatus* create_attn32(const void* op, OrtApiTable api_, const OrtKernelInfo* info, void** out) {
  (void)api_;
  return create_attn(op, info, out, 0);
}
static OrtStatus* create_attn16(const void* op, OrtApiTable api_, const OrtKernelInfo* info, void** out) {
  (void)api_;
  return create_attn(op, info, out, 1);
}
static void destroy_attn(void* p) { free(p); }

typedef struct { const attn_args* a; int64_t per; int64_t total; } AttnWork;

static void attn_prepare_task(void* data, size_t i) {
  AttnWork* w = data;
  int64_t t0 = (int64_t)i * w->per, t1 = t0 + w->per;
  attn_prepare(w->a, t0, t1 < w->total ? t1 : w->total);
}
static void attn_item_task(void* data, size_t i) { attn_item(((AttnWork*)data)->a, (int64_t)i); }
static void attn_combine_task(void* data, size_t i) {
  AttnWork* w = data;
  int64_t s0 = (int64_t)i * w->per, s1 = s0 + w->per;
  attn_combine(w->a, s0, s1 < w->total ? s1 : w->total);
}

static OrtStatus* parallel(OrtKernelContext* ctx, void (*fn)(void*, size_t), int64_t tasks, void* data) {
  if (tasks == 1) { fn(data, 0); return NULL; }
  return CALL(KernelContext_ParallelFor_t, KernelContext_ParallelFor)(ctx, fn, (size_t)tasks, 0, data);
}

static OrtStatus* compute_attn(void* p, OrtKernelContext* ctx) {
  const AttnKernel* kernel = p;
  const OrtValue* in[9] = {0};
  for (size_t i = 0; i < 9; i++) CHECK(CALL(KernelContext_GetInput_t, KernelContext_GetInput)(ctx, i, &in[i]));
  int64_t qd[8], kd[8], pd[8], sd[8], cd[8];
  size_t qr = 0, kr = 0, pr = 0, sr = 0, cr = 0;
  CHECK(shape_of(in[0], qd, &qr));
  CHECK(shape_of(in[3], pd, &pr));
  CHECK(shape_of(in[5], sd, &sr));
  attn_args a;
  memset(&a, 0, sizeof a);
  a.H = kernel->H; a.KVH = kernel->KVH; a.f16 = kernel->f16; a.window = kernel->window;
  a.softcap = kernel->softcap;
  if (qr != 3 || pr != 4) return fail(ORT_INVALID_ARGUMENT, "CachedAttention: query must be [B, S, W] and past_key [B, KVH, P, D]");
  a.B = qd[0]; a.S = qd[1]; a.D = pd[3]; a.past_cap = pd[2];
  if (pd[0] != a.B || pd[1] != a.KVH || a.D % 16 || a.D > 1024)
    return fail(ORT_INVALID_ARGUMENT, "CachedAttention: past_key must be [B, kv_num_heads, P, D] with D a multiple of 16 (at most 1024)");
  int packed = in[1] == NULL;
  if (packed ? qd[2] != (a.H + 2 * a.KVH) * a.D : qd[2] != a.H * a.D)
    return fail(ORT_INVALID_ARGUMENT, "CachedAttention: query's width does not match the heads and the past's head size");
  if (!packed) {
    CHECK(shape_of(in[1], kd, &kr));
    if (!in[2] || kr != 3 || kd[0] != a.B || kd[1] != a.S || kd[2] != a.KVH * a.D)
      return fail(ORT_INVALID_ARGUMENT, "CachedAttention: key and value must be [B, S, kv_num_heads * D]");
  }
  if (elements(sd, sr) != a.B) return fail(ORT_INVALID_ARGUMENT, "CachedAttention: seqlens_k must hold B values");
  void *q = NULL, *k = NULL, *v = NULL, *seq = NULL, *tot = NULL, *cs = NULL, *sn = NULL;
  CHECK(data_of(in[0], &q));
  CHECK(data_of(in[5], &seq));
  CHECK(data_of(in[6], &tot));
  CHECK(data_of(in[3], (void**)&a.past_k));
  CHECK(data_of(in[4], (void**)&a.past_v));
  if (packed) {
    k = (float*)q + a.H * a.D; v = (float*)k + a.KVH * a.D;
    a.q_stride = a.k_stride = a.v_stride = qd[2];
  } else {
    CHECK(data_of(in[1], &k));
    CHECK(data_of(in[2], &v));
    a.q_stride = qd[2]; a.k_stride = a.v_stride = a.KVH * a.D;
  }
  a.q = q; a.k = k; a.v = v;
  int64_t total = *(const int32_t*)tot;
  a.cap = total > a.past_cap ? total : a.past_cap;
  if (in[7] && in[8]) {
    CHECK(shape_of(in[7], cd, &cr));
    if (cr != 2 || 2 * cd[1] > a.D)
      return fail(ORT_INVALID_ARGUMENT, "CachedAttention: cos_cache must be [max_pos, R / 2] with R <= head size");
    a.max_pos = cd[0]; a.R = 2 * cd[1];
    CHECK(data_of(in[7], &cs));
    CHECK(data_of(in[8], &sn));
    a.cos = cs; a.sin = sn;
  }
  a.scale = kernel->scale != 0.0f ? kernel->scale : 1.0f / sqrtf((float)a.D);
  int64_t small_past[64];
  int64_t* past = a.B <= 64 ? small_past : malloc((size_t)a.B * sizeof(int64_t));
  if (!past) return fail(ORT_FAIL, "CachedAttention: out of memory");
  int first = a.S == total;
  OrtStatus* status = NULL;
  for (int64_t b = 0; b < a.B && !status; b++) {
    past[b] = first ? 0 : (int64_t)((const int32_t*)seq)[b] + 1 - a.S;
    if (past[b] < 0 || past[b] + a.S > a.cap || (!first && past[b] > a.past_cap))
      status = fail(ORT_INVALID_ARGUMENT, "CachedAttention: seqlens_k / total_sequence_length do not fit the cache");
    else if (a.R && past[b] + a.S > a.max_pos)
      status = fail(ORT_INVALID_ARGUMENT, "CachedAttention: a position beyond the rotary tables");
  }
  a.past = past;
  int64_t od[3] = {a.B, a.S, a.H * a.D}, cache[4] = {a.B, a.KVH, a.cap, a.D};
  OrtValue *O = NULL, *PK = NULL, *PV = NULL;
  if (!status) status = CALL(KernelContext_GetOutput_t, KernelContext_GetOutput)(ctx, 0, od, 3, &O);
  if (!status) status = CALL(KernelContext_GetOutput_t, KernelContext_GetOutput)(ctx, 1, cache, 4, &PK);
  if (!status) status = CALL(KernelContext_GetOutput_t, KernelContext_GetOutput)(ctx, 2, cache, 4, &PV);
  void* out = NULL;
  if (!status) status = data_of(O, &out);
  if (!status) status = data_of(PK, &a.kc);
  if (!status) status = data_of(PV, &a.vc);
  a.out = out;
  if (!status && (a.past_k == a.kc) != (a.past_v == a.vc))
    status = fail(ORT_INVALID_ARGUMENT, "CachedAttention: past and present share one of key / value only");
  void* scratch = NULL;
  char stack[8192];
  if (!status) {
    size_t bytes = attn_plan(&a);
    scratch = bytes <= sizeof stack ? (void*)stack : malloc(bytes);
    if (!scratch) status = fail(ORT_FAIL, "CachedAttention: out of memory for the scratch");
  }
  if (!status) {
    attn_set_scratch(&a, scratch);
    attn_copy_past(&a);
    AttnWork w = {&a, 8, a.B * a.S};
    status = parallel(ctx, attn_prepare_task, (w.total + w.per - 1) / w.per, &w);
    /* a short cache is a few microseconds of work: threads would cost more than they save */
    int64_t work = 0;
    for (int64_t b = 0; b < a.B; b++) work += (a.past[b] + a.S) * a.S;
    work *= a.H * a.D;
    if (!status && work <= ((int64_t)1 << 16)) {
      for (int64_t i = 0; i < a.sets * a.chunks; i++) attn_item(&a, i);
    } else if (!status) {
      status = parallel(ctx, attn_item_task, a.sets * a.chunks, &w);
    }
    if (!status && a.chunks > 1) {
      AttnWork c = {&a, 8, a.sets};
      status = parallel(ctx, attn_combine_task, (c.total + c.per - 1) / c.per, &c);
    }
  }
  if (scratch != stack) free(scratch);
  if (past != small_past) free(past);
  return status;
}

static const CustomOp cached_attention = CUSTOM_OP(
    attn_name, attn_input_type, attn_input_count, attn_output_type, attn_output_count,
    destroy_attn, attn_input_characteristic, attn_output_characteristic, create_attn32, compute_attn);

static const CustomOp cached_attention_f16 = CUSTOM_OP(
    attn16_name, attn16_input_type, attn_input_count, attn16_output_type, attn_output_count,
    destroy_attn, attn_input_characteristic, attn_output_characteristic, create_attn16, compute_attn);

/* -- ai.modelfold::SwiGLU ---------------------------------------------------------------------
   X [..., 2 K] = [gate, up] -> Y [..., K] = silu(gate) * up: a SwiGLU MLP's Split, QuickGelu
   (alpha 1) and Mul in one pass, where the down projection that reads it is not ours (float32,
   int8). */
static const char* swiglu_name(const void* op) { (void)op; return "SwiGLU"; }
static int swiglu_type(const void* op, size_t i) { (void)op; (void)i; return ELEM_FLOAT; }
static int swiglu_characteristic(const void* op, size_t i) { (void)op; (void)i; return IO_REQUIRED; }
static OrtStatus* create_swiglu(const void* op, OrtApiTable api_, const OrtKernelInfo* info, void** out) {
  (void)op; (void)api_; (void)info;
  *out = malloc(1);  /* stateless: ONNX Runtime wants a kernel pointer */
  return *out ? NULL : fail(ORT_FAIL, "SwiGLU: out of memory");
}
static void destroy_swiglu(void* p) { free(p); }

typedef struct { const float* x; float* y; int64_t K, rows, per; } SwigluWork;

static void swiglu_task(void* data, size_t i) {
  const SwigluWork* w = data;
  int64_t m0 = (int64_t)i * w->per, m1 = m0 + w->per < w->rows ? m0 + w->per : w->rows;
  for (int64_t m = m0; m < m1; m++)
    silu_mul_row(w->x + m * 2 * w->K, w->x + m * 2 * w->K + w->K, w->y + m * w->K, w->K);
}

static OrtStatus* compute_swiglu(void* p, OrtKernelContext* ctx) {
  (void)p;
  const OrtValue* X = NULL;
  CHECK(CALL(KernelContext_GetInput_t, KernelContext_GetInput)(ctx, 0, &X));
  int64_t dims[8];
  size_t rank = 0;
  CHECK(shape_of(X, dims, &rank));
  if (rank < 1 || dims[rank - 1] % 2)
    return fail(ORT_INVALID_ARGUMENT, "SwiGLU: the input's last dimension must be even ([gate, up])");
  SwigluWork w = {NULL, NULL, dims[rank - 1] / 2, 0, 0};
  w.rows = w.K ? elements(dims, rank) / (2 * w.K) : 0;
  dims[rank - 1] = w.K;
  OrtValue* Y = NULL;
  CHECK(CALL(KernelContext_GetOutput_t, KernelContext_GetOutput)(ctx, 0, dims, rank, &Y));
  CHECK(data_of(X, (void**)&w.x));
  CHECK(data_of(Y, (void**)&w.y));
  if (w.rows == 0 || w.K == 0) return NULL;
  w.per = (16384 + w.K - 1) / w.K;  /* about 16k elements a task: one decode row runs inline */
  return parallel(ctx, swiglu_task, (w.rows + w.per - 1) / w.per, &w);
}

static const CustomOp swiglu = CUSTOM_OP(
    swiglu_name, swiglu_type, op_one_count, swiglu_type, op_one_count,
    destroy_swiglu, swiglu_characteristic, swiglu_characteristic, create_swiglu, compute_swiglu);

/* -- ai.modelfold::MatMulF32 -------------------------------------------------------------------
   A [..., K] float32 times an initializer B -> Y [..., N]:
   - trans_b 0, B [K, N] (ONNX's MatMul: every float32 projection, an untied LM head): B is packed
     once, when the kernel is created (f32.h), and ONNX Runtime's memory-mapped original leaves the
     resident set; every row count runs f32.c's kernel. activation 1 (SwiGLU: A is [..., 2 K] =
     [gate, up], the product's input is silu(gate) * up) and 2 (the input is RMSNorm(A + skip) *
     gamma, as SkipSimplifiedLayerNormalization, epsilon; optional output 1 is the sum A + skip)
     fuse the MLP's activation and the residual norm into the product, as in MatMulInt4;
   - trans_b 1, B [N, K] (com.microsoft::FusedMatMul with transB over a tied embedding table, which
     the embedding Gather reads too): read where it lies; up to F32_MAX_ROWS rows (an LM head while
     generating) run f32.c's GEMV, more rows (an evaluation batch) run ONNX Runtime's own kernel,
     created with this one and invoked with the same inputs and output (it packs B on each call:
     once per thousands of rows there). No activation.
   Inputs A, B, skip, gamma (the last two for activation 2). Attributes K, N, trans_b, activation,
   epsilon. */
typedef struct { int64_t K, N, trans_b, activation; float epsilon; void* fallback; const f32_packed* w; } F32Kernel;

static const char* f32_name(const void* op) { (void)op; return "MatMulF32"; }
static int f32_type(const void* op, size_t i) { (void)op; (void)i; return ELEM_FLOAT; }
static size_t f32_input_count(const void* op) { (void)op; return 4; }
static size_t f32_output_count(const void* op) { (void)op; return 2; }
static int f32_input_characteristic(const void* op, size_t i) { (void)op; return i >= 2 ? IO_OPTIONAL : IO_REQUIRED; }
static int f32_output_characteristic(const void* op, size_t i) { (void)op; return i >= 1 ? IO_OPTIONAL : IO_REQUIRED; }

static OrtStatus* create_f32(const void* op, OrtApiTable api_, const OrtKernelInfo* info, void** out) {
  (void)op; (void)api_;
  F32Kernel k = {0, 0, 0, 0, 1e-5f, NULL, NULL};
  CHECK(CALL(KernelInfoGetAttribute_int64_t, KernelInfoGetAttribute_int64)(info, "K", &k.K));
  CHECK(CALL(KernelInfoGetAttribute_int64_t, KernelInfoGetAttribute_int64)(info, "N", &k.N));
  CHECK(int_attribute(info, "trans_b", 0, &k.trans_b));
  CHECK(int_attribute(info, "activation", ACT_NONE, &k.activation));
  CHECK(float_attribute(info, "epsilon", 1e-5f, &k.epsilon));
  if (k.K <= 0 || k.N <= 0) return fail(ORT_INVALID_ARGUMENT, "MatMulF32: K and N must be positive");
  if (k.trans_b != 0 && k.trans_b != 1) return fail(ORT_INVALID_ARGUMENT, "MatMulF32: trans_b must be 0 or 1");
  if (k.activation < ACT_NONE || k.activation > ACT_SKIP_RMSNORM)
    return fail(ORT_INVALID_ARGUMENT, "MatMulF32: activation must be 0 (none), 1 (SwiGLU) or 2 (skip + RMSNorm)");
  if (k.trans_b && k.activation != ACT_NONE)
    return fail(ORT_INVALID_ARGUMENT, "MatMulF32: an activation needs trans_b 0");
  int is_constant = 0;
  const OrtValue* B = NULL;
  CHECK(CALL(KernelInfoGetConstantInput_tensor_t, KernelInfoGetConstantInput_tensor)(info, 1, &is_constant, &B));
  if (!is_constant || !B) return fail(ORT_INVALID_ARGUMENT, "MatMulF32: B must be an initializer (a constant)");
  int64_t dims[8];
  size_t rank = 0;
  CHECK(shape_of(B, dims, &rank));
  if (rank != 2 || dims[0] != (k.trans_b ? k.N : k.K) || dims[1] != (k.trans_b ? k.K : k.N))
    return fail(ORT_INVALID_ARGUMENT, "MatMulF32: B must be [K, N] (trans_b 0) or [N, K] (trans_b 1)");
  if (!k.trans_b) {
    void* b = NULL;
    CHECK(data_of(B, &b));
    int fresh = 0;
    k.w = f32_pack_shared(b, k.K, k.N, &fresh);
    if (!k.w) return fail(ORT_FAIL, "MatMulF32: out of memory packing B");
    /* the kernels read the packed copy from now on (see release_file_pages) */
    if (fresh) release_file_pages(b, (size_t)(k.K * k.N) * sizeof(float));
  } else {
    const char* names[1] = {"T"};
    int types[1] = {ELEM_FLOAT};
    int64_t one = 1;
    void* attr = NULL;
    CHECK(CALL(CreateOpAttr_t, CreateOpAttr)("transB", &one, 1, OP_ATTR_INT, &attr));
    const void* attrs[1] = {attr};
    OrtStatus* status = CALL(CreateOp_t, CreateOp)(info, "FusedMatMul", "com.microsoft", 1, names, types, 1,
                                                   attrs, 1, 2, 1, &k.fallback);
    CALL(ReleaseOpAttr_t, ReleaseOpAttr)(attr);
    CHECK(status);
  }
  F32Kernel* kernel = malloc(sizeof *kernel);
  if (!kernel) {
    if (k.fallback) CALL(ReleaseOp_t, ReleaseOp)(k.fallback);
    f32_unpack(k.w);
    return fail(ORT_FAIL, "MatMulF32: out of memory");
  }
  *kernel = k;
  *out = kernel;
  return NULL;
}

static void destroy_f32(void* p) {
  F32Kernel* kernel = p;
  if (kernel && kernel->fallback) CALL(ReleaseOp_t, ReleaseOp)(kernel->fallback);
  if (kernel) f32_unpack(kernel->w);
  free(kernel);
}

typedef struct {
  const F32Kernel* k;
  const float *A, *B, *skip, *gamma;
  float *X, *Y, *sum;
  int64_t M, rows, pieces, cols;  /* rows: blocks of rows; pieces: runs of panels */
} F32Work;

static void f32_rows_task(void* data, size_t i) {
  const F32Work* w = data;
  int64_t n0 = (int64_t)i * w->cols, n1 = n0 + w->cols < w->k->N ? n0 + w->cols : w->k->N;
  f32_gemv_rows(w->A, w->M, w->k->K, w->B, w->k->N, n0, n1, w->Y);
}

static void f32_prologue(const F32Work* w, int64_t m0, int64_t m1) {  /* rows [m0, m1) of X */
  int64_t K = w->k->K;
  for (int64_t m = m0; m < m1; m++) {
    if (w->k->activation == ACT_SWIGLU) {
      silu_mul_row(w->A + m * 2 * K, w->A + m * 2 * K + K, w->X + m * K, K);
    } else {
      float* x = w->X + m * K;
      skip_rmsnorm_row(w->A + m * K, w->skip + m * K, w->gamma, w->k->epsilon, w->sum ? w->sum + m * K : x,
                       x, K);
    }
  }
}

static void f32_gemm_task(void* data, size_t i) {
  const F32Work* w = data;
  int64_t panels = w->k->w->panels, tiles = (w->M + F32_TILE - 1) / F32_TILE;
  if (w->pieces) {  /* a run of panels, every row (the activation is done) */
    f32_gemm(w->k->w, w->X, w->k->K, 0, w->M, panels * (int64_t)i / w->pieces,
             panels * ((int64_t)i + 1) / w->pieces, w->Y, w->k->N);
  } else {  /* a block of rows (tiles of 12), every panel: its activation first, on this core */
    int64_t m0 = tiles * (int64_t)i / w->rows * F32_TILE, m1 = tiles * ((int64_t)i + 1) / w->rows * F32_TILE;
    if (m1 > w->M) m1 = w->M;
    if (w->k->activation != ACT_NONE) f32_prologue(w, m0, m1);
    f32_gemm(w->k->w, w->X, w->k->K, m0, m1, 0, panels, w->Y, w->k->N);
  }
}

static OrtStatus* compute_f32(void* p, OrtKernelContext* ctx) {
  const F32Kernel* kernel = p;
  const int64_t K = kernel->K;
  const OrtValue *A = NULL, *B = NULL;
  CHECK(CALL(KernelContext_GetInput_t, KernelContext_GetInput)(ctx, 0, &A));
  CHECK(CALL(KernelContext_GetInput_t, KernelContext_GetInput)(ctx, 1, &B));
  int64_t dims[8];
  size_t rank = 0;
  F32Work w = {kernel, NULL, NULL, NULL, NULL, NULL, NULL, NULL, 0, 0, 0, 0};
  CHECK(fused_input(ctx, "MatMulF32", kernel->activation, K, 2, A, dims, &rank, &w.M, &w.skip, &w.gamma,
                    &w.sum));
  CHECK(data_of(A, (void**)&w.A));
  dims[rank - 1] = kernel->N;
  OrtValue* Y = NULL;
  CHECK(CALL(KernelContext_GetOutput_t, KernelContext_GetOutput)(ctx, 0, dims, rank, &Y));
  if (w.M == 0) return NULL;
  if (kernel->trans_b) {
    if (w.M > F32_MAX_ROWS) {
      const OrtValue* inputs[2] = {A, B};
      OrtValue* outputs[1] = {Y};
      return CALL(InvokeOp_t, InvokeOp)(ctx, kernel->fallback, inputs, 2, outputs, 1);
    }
    CHECK(data_of(B, (void**)&w.B));
    CHECK(data_of(Y, (void**)&w.Y));
    w.cols = 1024;  /* rows of B in chunks of 1,024: the threads take them as they come */
    return parallel(ctx, f32_rows_task, (kernel->N + w.cols - 1) / w.cols, &w);
  }
  CHECK(data_of(Y, (void**)&w.Y));
  if (kernel->activation == ACT_NONE) {
    w.X = (float*)w.A;
  } else {
    /* the activated input: a buffer of the calling thread (the one in session.run), kept
       between calls and grown to the largest M x K it has seen (a 1,024-token prompt of SmolLM2's
       down projection: 6 MB), never freed: allocated on each call, its fresh pages cost more
       than computing the activation */
    static _Thread_local float* held = NULL;
    static _Thread_local size_t held_bytes = 0;
    size_t bytes = (size_t)(w.M * K) * sizeof(float);
    if (bytes > held_bytes) {
      free(held);
      held = aligned64(bytes);
      held_bytes = held ? bytes : 0;
      if (!held) return fail(ORT_FAIL, "MatMulF32: out of memory for the activation");
    }
    w.X = held;
  }
  int64_t tiles = (w.M + F32_TILE - 1) / F32_TILE, tasks;
  if (tiles < 4) {
    /* a few rows (a decode step): the activation here, then the panels in an even number of runs
       of up to 16 (each run is a few streams that the prefetchers must pick up again; the
       threads take the runs as they come) */
    if (kernel->activation != ACT_NONE) f32_prologue(&w, 0, w.M);
    w.pieces = 2 * ((kernel->w->panels + 31) / 32);
    if (w.pieces > kernel->w->panels) w.pieces = kernel->w->panels;
    tasks = w.pieces;
  } else {
    /* a prompt: an even number of blocks of rows, each at most about 512 KB of A (it stays in the
       L2 of the core that takes the block, which computes its activation too), every panel
       against each block */
    w.rows = 2 * ((tiles * F32_TILE * K * 4 + 2 * 512 * 1024 - 1) / (2 * 512 * 1024));
    if (w.rows > tiles) w.rows = tiles;
    tasks = w.rows;
  }
  return parallel(ctx, f32_gemm_task, tasks, &w);
}

static const CustomOp matmul_f32 = CUSTOM_OP(
    f32_name, f32_type, f32_input_count, f32_type, f32_output_count,
    destroy_f32, f32_input_characteristic, f32_output_characteristic, create_f32, compute_f32);

/* -- registration ------------------------------------------------------------------------- */
__attribute__((visibility("default"))) OrtStatus* RegisterCustomOps(OrtSessionOptions* options,
                                                                    const OrtApiBase* base) {
  api = base->GetApi(API_VERSION);
  if (!api) return NULL;  /* an ONNX Runtime older than 1.17 cannot report an error either */
  OrtCustomOpDomain* domain = NULL;
  CHECK(CALL(CreateCustomOpDomain_t, CreateCustomOpDomain)("ai.modelfold", &domain));
  CHECK(CALL(CustomOpDomain_Add_t, CustomOpDomain_Add)(domain, &matmul_int4));
  CHECK(CALL(CustomOpDomain_Add_t, CustomOpDomain_Add)(domain, &matmul_int8));
  CHECK(CALL(CustomOpDomain_Add_t, CustomOpDomain_Add)(domain, &cached_attention));
  CHECK(CALL(CustomOpDomain_Add_t, CustomOpDomain_Add)(domain, &cached_attention_f16));
  CHECK(CALL(CustomOpDomain_Add_t, CustomOpDomain_Add)(domain, &swiglu));
  CHECK(CALL(CustomOpDomain_Add_t, CustomOpDomain_Add)(domain, &matmul_f32));
  return CALL(AddCustomOpDomain_t, AddCustomOpDomain)(options, domain);
}
