/* Fused CPU kernels for the training step: dropout, the tanh GELU, LayerNorm,
 * and attention with dropout. They compute in float32 and read and write
 * float32 or bfloat16 (what bf16 autocast's matrix products hand them).
 *
 * Why: with 65 tokens and 12-wide heads the seed model's attention is a swarm
 * of tiny matrix products, and PyTorch runs it as separate passes over the
 * (B, heads, N, N) scores (matmul, softmax, random mask, multiply, matmul,
 * and the same again backwards), each reading and writing megabytes. Here one
 * (batch, head) pair is done start to finish while its numbers sit in the
 * processor's cache.
 *
 * Dropout masks are not stored: whether element j of row r is kept is a hash
 * of (seed, r, j), so the backward pass regenerates the forward's mask
 * (attention, which keeps its probabilities anyway, keeps the mask in their
 * sign bits).
 *
 * vitcraft.cpu_kernels compiles this file with the system C compiler on first
 * use and calls it through ctypes; each call handles a range of elements or of
 * (batch, head) pairs. Every exported function's parameter list is mirrored,
 * by name and type, in cpu_kernels.py's SIGNATURES table, from which the
 * Python side declares and calls it (tests/test_cpu_kernels.py checks that the
 * two agree). C99 with GCC/Clang vector extensions and OpenMP pragmas
 * (optional: without OpenMP, Python splits the work over threads).
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif

/* 1 if compiled with OpenMP: then each kernel splits its range over `threads`
 * threads of the OpenMP pool that torch itself uses (torch loads libgomp and
 * this library links to the same one), so the two never compete for cores.
 * Otherwise `threads` is ignored and the caller splits the work. */
int kernels_use_openmp(void) {
#ifdef _OPENMP
    return 1;
#else
    return 0;
#endif
}

/* This thread's share [*first, *last) of [start, end), in multiples of `align`. */
static void thread_range(int64_t start, int64_t end, int64_t align, int64_t *first, int64_t *last) {
#ifdef _OPENMP
    int64_t parts = omp_get_num_threads(), part = omp_get_thread_num();
#else
    int64_t parts = 1, part = 0;
#endif
    int64_t step = ((end - start + parts - 1) / parts + align - 1) / align * align;
    *first = start + part * step < end ? start + part * step : end;
    *last = *first + step < end ? *first + step : end;
}

/* Vectors of W floats (GCC/Clang vector extensions): the compiler maps them
 * onto whatever vector registers the processor has. Scalars in arithmetic
 * with them are broadcast. W is one AVX-512 register (16 floats) where there
 * is AVX-512, else 8: an AVX2 register, two NEON ones. A 16-float vector
 * there takes two or four registers, and the attention loops, which keep a
 * dozen vectors live, then no longer fit in the 16 registers of AVX2: GCC
 * spills them to the stack, and the attention kernel ran at a third of the
 * speed it has with W = 8 (benchmarks/throughput.py, docs/performance.md). */
#if defined(__AVX512F__)
#define W 16
#else
#define W 8
#endif

/* The sizes the Python side must agree on are read through functions like
 * this one, never copied there. */
int kernels_vector_width(void) { return W; }
typedef float vf __attribute__((vector_size(4 * W)));
typedef uint32_t vu __attribute__((vector_size(4 * W)));

static const vu LANE = {0, 1, 2, 3, 4, 5, 6, 7,
#if W == 16
                         8, 9, 10, 11, 12, 13, 14, 15
#endif
};

static inline vf select_vf(vu condition, vf yes, vf no) {  /* condition lanes are all ones or zero */
    return (vf)(((vu)yes & condition) | ((vu)no & ~condition));
}

/* Sum and maximum of a vector's lanes: add (or compare) its two halves, then
 * the halves of that, ...; half vectors are what the processor's "extract the
 * upper half" instructions give, so this compiles to a few of those. */
typedef float vf8 __attribute__((vector_size(4 * W / 2)));
typedef float vf4 __attribute__((vector_size(4 * W / 4)));
typedef uint32_t vu8 __attribute__((vector_size(4 * W / 2)));
typedef uint32_t vu4 __attribute__((vector_size(4 * W / 4)));

static inline float hsum(vf x) {
    vf8 a, b;
    vf4 c, d;
    memcpy(&a, &x, sizeof a);
    memcpy(&b, (char *)&x + sizeof a, sizeof b);
    a += b;
    memcpy(&c, &a, sizeof c);
    memcpy(&d, (char *)&a + sizeof c, sizeof d);
    c += d;
#if W == 16
    return (c[0] + c[1]) + (c[2] + c[3]);
#else
    return c[0] + c[1];
#endif
}

static inline float hmax(vf x) {
    vf8 a, b;
    vf4 c, d;
    memcpy(&a, &x, sizeof a);
    memcpy(&b, (char *)&x + sizeof a, sizeof b);
    vu8 a_smaller = (vu8)(a < b);
    a = (vf8)(((vu8)b & a_smaller) | ((vu8)a & ~a_smaller));
    memcpy(&c, &a, sizeof c);
    memcpy(&d, (char *)&a + sizeof c, sizeof d);
    vu4 c_smaller = (vu4)(c < d);
    c = (vf4)(((vu4)d & c_smaller) | ((vu4)c & ~c_smaller));
    float low = c[0] > c[1] ? c[0] : c[1];
#if W == 16
    float high = c[2] > c[3] ? c[2] : c[3];
    return low > high ? low : high;
#else
    return low;
#endif
}

/* A 64-byte aligned buffer of `count` vectors, zeroed; free(*raw) releases it. */
static vf *vectors(size_t count, void **raw) {
    *raw = calloc(count * sizeof(vf) + 64, 1);
    if (!*raw) return NULL;
    return (vf *)(((uintptr_t)*raw + 63) & ~(uintptr_t)63);
}

/* ---- bfloat16 ----------------------------------------------------------------- */

/* Under bf16 autocast the matrix products hand the kernels bfloat16 tensors
 * (the top 16 bits of a float32). The kernels compute in float32 and convert
 * where they read and write; `bf16` arguments say which kind a pointer holds. */
typedef uint16_t vh __attribute__((vector_size(2 * W)));

static inline float bf16_to_float(uint16_t h) {
    uint32_t bits = (uint32_t)h << 16;
    float f;
    memcpy(&f, &bits, 4);
    return f;
}

static inline uint16_t float_to_bf16(float f) {  /* round to nearest even, as PyTorch does */
    uint32_t bits;
    memcpy(&bits, &f, 4);
    if ((bits & 0x7FFFFFFFU) > 0x7F800000U) return (uint16_t)((bits >> 16) | 0x40U);  /* NaN stays NaN */
    return (uint16_t)((bits + 0x7FFFU + ((bits >> 16) & 1U)) >> 16);
}

static inline vf vh_to_vf(vh h) { return (vf)(__builtin_convertvector(h, vu) << 16); }

static inline vh vf_to_vh(vf f) {  /* float_to_bf16 on every lane */
    vu bits = (vu)f;
    vu rounded = (bits + 0x7FFFU + ((bits >> 16) & 1U)) >> 16;
    vu nan = (bits & 0x7FFFFFFFU) > 0x7F800000U;
    return __builtin_convertvector((rounded & ~nan) | (((bits >> 16) | 0x40U) & nan), vh);
}

/* Element src[i] of a float32 or bfloat16 array, as a float; and the reverse */
static inline float read_at(const void *src, int64_t i, int bf16) {
    return bf16 ? bf16_to_float(((const uint16_t *)src)[i]) : ((const float *)src)[i];
}

/* dst[0 .. count) = src[offset ..] as floats; and the reverse. For the short
 * rows (a head's dozen numbers) they are used on, a loop the compiler keeps
 * inline beats a call to memcpy. */
static inline void read_floats(float *dst, const void *src, int64_t offset, int64_t count, int bf16) {
    const float *in32 = (const float *)src + offset;
    const uint16_t *in16 = (const uint16_t *)src + offset;
#pragma omp simd
    for (int64_t i = 0; i < count; i++) dst[i] = bf16 ? bf16_to_float(in16[i]) : in32[i];
}

static inline void write_floats(void *dst, int64_t offset, const float *src, int64_t count, int bf16) {
    float *out32 = (float *)dst + offset;
    uint16_t *out16 = (uint16_t *)dst + offset;
    if (bf16) {
#pragma omp simd
        for (int64_t i = 0; i < count; i++) out16[i] = float_to_bf16(src[i]);
    } else {
#pragma omp simd
        for (int64_t i = 0; i < count; i++) out32[i] = src[i];
    }
}

/* ---- random keep/drop decisions ------------------------------------------------ */

/* splitmix64: one well-mixed 64-bit number per row of the mask. */
static inline uint64_t splitmix64(uint64_t x) {
    x += 0x9E3779B97F4A7C15ULL;
    x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ULL;
    x = (x ^ (x >> 27)) * 0x94D049BB133111EBULL;
    return x ^ (x >> 31);
}

/* A 32-bit integer hash (Wellons' "lowbias32") per element, cheap enough to vectorise. */
static inline vu mix32(vu x) {
    x ^= x >> 16;
    x *= 0x7FEB352DU;
    x ^= x >> 15;
    x *= 0x846CA68BU;
    x ^= x >> 16;
    return x;
}

/* The key of row `row` of a mask */
static inline uint32_t row_key(uint64_t seed, uint64_t row) {
    return (uint32_t)splitmix64(seed + row * 0x9E3779B97F4A7C15ULL);
}

/* Which of the elements W * b .. W * b + W - 1 of a row are kept (lanes all
 * ones) or dropped (zero): dropped when their 32-bit hash is below
 * threshold = round(p * 2^32). */
static inline vu kept_lanes(uint32_t key, int64_t b, uint32_t threshold) {
    return (vu)(mix32(key + (LANE + (uint32_t)(b * W)) * 0x9E3779B9U) >= threshold);
}

/* mask[j] = scale if element j of row `row` is kept, else 0, for j < W * blocks */
static void mask_row(vf *mask, int64_t blocks, uint64_t seed, uint64_t row, uint32_t threshold, float scale) {
    uint32_t key = row_key(seed, row);
    vf kept = (vf){0} + scale;
    for (int64_t b = 0; b < blocks; b++) mask[b] = select_vf(kept_lanes(key, b, threshold), kept, (vf){0});
}

/* ---- dropout -------------------------------------------------------------------- */

/* Dropout rows (one key each) are this long, whatever the tensor's shape;
 * a range handed to one thread starts at a row boundary. */
#define DROPOUT_ROW 1024

int kernels_dropout_row(void) { return DROPOUT_ROW; }

/* y = x * mask for the flat elements [start, end) of a float32 (bfloat16 = 0)
 * or bfloat16 tensor, start a multiple of DROPOUT_ROW. The backward pass is the
 * same call on the incoming gradient. */
static inline __attribute__((always_inline)) void dropout(const void *x, void *y, int bfloat16, int64_t start,
                                                          int64_t end, uint64_t seed, uint32_t threshold,
                                                          float scale, int threads) {
#pragma omp parallel num_threads(threads)
    {
        vf mask[DROPOUT_ROW / W];
        const float *m = (const float *)mask;
        int64_t first, last;
        thread_range(start, end, DROPOUT_ROW, &first, &last);
        for (int64_t begin = first; begin < last; begin += DROPOUT_ROW) {
            int64_t n = last - begin < DROPOUT_ROW ? last - begin : DROPOUT_ROW;
            mask_row(mask, (n + W - 1) / W, seed, (uint64_t)(begin / DROPOUT_ROW), threshold, scale);
            if (bfloat16) {
                const uint16_t *in = (const uint16_t *)x + begin;
                uint16_t *out = (uint16_t *)y + begin;
#pragma omp simd
                for (int64_t j = 0; j < n; j++) out[j] = float_to_bf16(bf16_to_float(in[j]) * m[j]);
            } else {
                const float *in = (const float *)x + begin;
                float *out = (float *)y + begin;
#pragma omp simd
                for (int64_t j = 0; j < n; j++) out[j] = in[j] * m[j];
            }
        }
    }
}

void dropout_float(const float *x, float *y, int64_t start, int64_t end, uint64_t seed, uint32_t threshold,
                   float scale, int threads) {
    dropout(x, y, 0, start, end, seed, threshold, scale, threads);
}

void dropout_bfloat16(const uint16_t *x, uint16_t *y, int64_t start, int64_t end, uint64_t seed,
                      uint32_t threshold, float scale, int threads) {
    dropout(x, y, 1, start, end, seed, threshold, scale, threads);
}

/* ---- e^x, the GELU, attention ----------------------------------------------------- */

/* e^x for x <= 0 (softmax scores minus their maximum), within about 2 ulp:
 * Cephes' polynomial, with 2^n built from the float's bits. */
static inline vf exp_nonpositive(vf x) {
    vf low = (vf){0} - 87.0f;  /* keeps 2^n a normal float */
    x = select_vf((vu)(x < low), low, x);
    /* adding 1.5 * 2^23 rounds x / ln 2 to an integer n, which lands in the low mantissa bits */
    vf shifted = x * 1.44269504088896341f + 12582912.0f;
    vf n = shifted - 12582912.0f;
    vf r = x - n * 0.693359375f + n * 2.12194440e-4f;  /* x - n ln 2, in two parts for accuracy */
    vf p = (vf){0} + 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * r * r + r + 1.0f;
    vu two_n = ((vu)shifted - 0x4B400000U + 127U) << 23;  /* the bits of 2^n */
    return p * (vf)two_n;
}

/* count <= W elements from src[i ..], float32 or bfloat16; missing lanes 0.
 * The fixed-size copy of a whole vector compiles to one unaligned load or
 * store; a partial vector is copied element by element. */
static inline vf load(const void *src, int64_t i, int64_t count, int bf16) {
    vf x = {0};
    if (count == W && bf16) {
        vh h;
        memcpy(&h, (const uint16_t *)src + i, sizeof h);
        return vh_to_vf(h);
    }
    if (count == W) memcpy(&x, (const float *)src + i, sizeof x);
    else read_floats((float *)&x, src, i, count, bf16);
    return x;
}

static inline void store(void *dst, int64_t i, vf x, int64_t count, int bf16) {
    if (count == W && bf16) {
        vh h = vf_to_vh(x);
        memcpy((uint16_t *)dst + i, &h, sizeof h);
    } else if (count == W) {
        memcpy((float *)dst + i, &x, sizeof x);
    } else {
        write_floats(dst, i, (const float *)&x, count, bf16);
    }
}

/* tanh(sqrt(2/pi) (x + 0.044715 x^3)), with tanh|z| = (1 - e^-2|z|) / (1 + e^-2|z|) */
static inline vf gelu_tanh_term(vf x) {
    vf z = 0.7978845608028654f * (x + 0.044715f * x * x * x);
    vu sign = (vu)z & 0x80000000U;
    vf e = exp_nonpositive((vf)((vu)z | 0x80000000U) * 2.0f);  /* e^(-2|z|) */
    return (vf)((vu)((1.0f - e) / (1.0f + e)) | sign);
}

/* y = 0.5 x (1 + tanh(...)) for the flat elements [start, end); x and y float32
 * or (bf16) bfloat16 */
static inline __attribute__((always_inline)) void gelu_forward_range(const void *x, void *y, int64_t start,
                                                                     int64_t end, int bf16) {
    for (int64_t i = start; i < end; i += W) {
        int64_t count = end - i < W ? end - i : W;
        vf xi = load(x, i, count, bf16);
        store(y, i, 0.5f * xi * (1.0f + gelu_tanh_term(xi)), count, bf16);
    }
}

/* dx = dy * d/dx [0.5 x (1 + t)] = dy * (0.5 (1 + t) + 0.5 x (1 - t^2) sqrt(2/pi) (1 + 3 * 0.044715 x^2)) */
static inline __attribute__((always_inline)) void gelu_backward_range(const void *x, const void *dy, void *dx,
                                                                      int64_t start, int64_t end, int bf16) {
    for (int64_t i = start; i < end; i += W) {
        int64_t count = end - i < W ? end - i : W;
        vf xi = load(x, i, count, bf16), t = gelu_tanh_term(xi);
        vf slope = 0.5f * (1.0f + t) + 0.5f * xi * (1.0f - t * t) * 0.7978845608028654f *
                   (1.0f + 0.134145f * xi * xi);
        store(dx, i, load(dy, i, count, bf16) * slope, count, bf16);
    }
}

void gelu_forward(const void *x, void *y, int64_t start, int64_t end, int bf16, int threads) {
#pragma omp parallel num_threads(threads)
    {
        int64_t first, last;
        thread_range(start, end, W, &first, &last);
        if (bf16) gelu_forward_range(x, y, first, last, 1);
        else gelu_forward_range(x, y, first, last, 0);
    }
}

void gelu_backward(const void *x, const void *dy, void *dx, int64_t start, int64_t end, int bf16, int threads) {
#pragma omp parallel num_threads(threads)
    {
        int64_t first, last;
        thread_range(start, end, W, &first, &last);
        if (bf16) gelu_backward_range(x, dy, dx, first, last, 1);
        else gelu_backward_range(x, dy, dx, first, last, 0);
    }
}

/* ---- LayerNorm ------------------------------------------------------------------ */

/* Lanes 0 .. count - 1 all ones, the rest zero */
static inline vu lanes_below(int64_t count) { return (vu)(LANE < (uint32_t)count); }

/* LayerNorm of rows [start, end) of c numbers each (float32):
 *   y = (x - mean) * rstd * weight + bias, rstd = 1 / sqrt(variance + eps),
 * y float32 or (y_bf16) bfloat16; stats gets (mean, rstd) of every row for the
 * backward pass. The variance is computed from the centred values (two passes
 * over a row that sits in the cache), as PyTorch does. */
static inline __attribute__((always_inline)) void layernorm_forward_range(
    const float *x, const float *weight, const float *bias, void *y, float *stats, int64_t start, int64_t end,
    int64_t c, float eps, int y_bf16) {
    for (int64_t row = start; row < end; row++) {
        const float *xr = x + row * c;
        vf sum_v = {0}, square_v = {0};
        for (int64_t k = 0; k < c; k += W) sum_v += load(xr, k, c - k < W ? c - k : W, 0);
        float mean = hsum(sum_v) / (float)c;
        for (int64_t k = 0; k < c; k += W) {
            int64_t count = c - k < W ? c - k : W;
            vf centred = select_vf(lanes_below(count), load(xr, k, count, 0) - mean, (vf){0});
            square_v += centred * centred;
        }
        float rstd = 1.0f / sqrtf(hsum(square_v) / (float)c + eps);
        for (int64_t k = 0; k < c; k += W) {
            int64_t count = c - k < W ? c - k : W;
            vf normalised = (load(xr, k, count, 0) - mean) * rstd;
            store(y, row * c + k, normalised * load(weight, k, count, 0) + load(bias, k, count, 0), count, y_bf16);
        }
        stats[2 * row] = mean;
        stats[2 * row + 1] = rstd;
    }
}

/* Rows of a LayerNorm's backward pass are taken in blocks of this many; each
 * block sums its share of the weight and bias gradients on its own. */
#define LAYERNORM_BLOCK 256

int kernels_layernorm_block(void) { return LAYERNORM_BLOCK; }

/* Gradients of layernorm_forward for rows [start, end), start a multiple of
 * LAYERNORM_BLOCK, from dy (float32, or bfloat16 if dy_bf16): with
 * g = dy * weight and xhat = (x - mean) * rstd,
 *   dx = rstd * (g - mean(g) - xhat * mean(g * xhat)),
 * and for each block of rows b, partial[b] = (sum of dy * xhat, sum of dy)
 * over its rows: summed over blocks, the weight's and the bias's gradients. */
static inline __attribute__((always_inline)) void layernorm_backward_range(
    const float *x, const float *weight, const float *stats, const void *dy, float *dx, float *partial,
    int64_t start, int64_t end, int64_t c, int dy_bf16) {
    for (int64_t row = start; row < end; row++) {
        const float *xr = x + row * c;
        float *dweight = partial + (row / LAYERNORM_BLOCK) * 2 * c, *dbias = dweight + c;
        if (row % LAYERNORM_BLOCK == 0) memset(dweight, 0, sizeof(float) * (size_t)(2 * c));
        float mean = stats[2 * row], rstd = stats[2 * row + 1];
        vf g_sum_v = {0}, gx_sum_v = {0};
        for (int64_t k = 0; k < c; k += W) {  /* missing lanes load as 0, so g is 0 there */
            int64_t count = c - k < W ? c - k : W;
            vf xhat = (load(xr, k, count, 0) - mean) * rstd, dyk = load(dy, row * c + k, count, dy_bf16);
            vf g = dyk * load(weight, k, count, 0);
            g_sum_v += g;
            gx_sum_v += g * xhat;
            store(dweight, k, load(dweight, k, count, 0) + dyk * xhat, count, 0);
            store(dbias, k, load(dbias, k, count, 0) + dyk, count, 0);
        }
        float g_mean = hsum(g_sum_v) / (float)c, gx_mean = hsum(gx_sum_v) / (float)c;
        for (int64_t k = 0; k < c; k += W) {
            int64_t count = c - k < W ? c - k : W;
            vf xhat = (load(xr, k, count, 0) - mean) * rstd;
            vf g = load(dy, row * c + k, count, dy_bf16) * load(weight, k, count, 0);
            store(dx, row * c + k, rstd * (g - g_mean - xhat * gx_mean), count, 0);
        }
    }
}

void layernorm_forward(const float *x, const float *weight, const float *bias, void *y, float *stats,
                       int64_t start, int64_t end, int64_t c, float eps, int y_bf16, int threads) {
#pragma omp parallel num_threads(threads)
    {
        int64_t first, last;
        thread_range(start, end, 1, &first, &last);
        if (y_bf16) layernorm_forward_range(x, weight, bias, y, stats, first, last, c, eps, 1);
        else layernorm_forward_range(x, weight, bias, y, stats, first, last, c, eps, 0);
    }
}

void layernorm_backward(const float *x, const float *weight, const float *stats, const void *dy, float *dx,
                        float *partial, int64_t start, int64_t end, int64_t c, int dy_bf16, int threads) {
#pragma omp parallel num_threads(threads)
    {
        int64_t first, last;
        thread_range(start, end, LAYERNORM_BLOCK, &first, &last);
        if (dy_bf16) layernorm_backward_range(x, weight, stats, dy, dx, partial, first, last, c, 1);
        else layernorm_backward_range(x, weight, stats, dy, dx, partial, first, last, c, 0);
    }
}

/* ---- attention ------------------------------------------------------------------ */

/* A (batch, head) pair's q, k or v (rows of d numbers from src[offset], `stride`
 * apart) copied into zero-padded vector layouts of floats: by_token[j * dv + e]
 * holds row j (dv = d / W rounded up), by_dim[c * nv + b] holds column c
 * (nv = n / W rounded up). */
static inline void pad_by_token(vf *dst, const void *src, int64_t offset, int64_t n, int64_t d, int64_t stride,
                                int64_t dv, int bf16) {
    for (int64_t j = 0; j < n; j++) read_floats((float *)(dst + j * dv), src, offset + j * stride, d, bf16);
}

static inline void pad_by_dim(vf *dst, const void *src, int64_t offset, int64_t n, int64_t d, int64_t stride,
                              int64_t nv, int bf16) {
    float *out = (float *)dst;
    for (int64_t j = 0; j < n; j++)
        for (int64_t c = 0; c < d; c++) out[c * nv * W + j] = read_at(src, offset + j * stride + c, bf16);
}

/* Queries are handled ROWS at a time: each vector of k or v loaded from the
 * cache then serves four rows, and four independent sums keep the
 * multiply-add units busy instead of each waiting for the one before. Row r
 * of a block is at [r * row_vectors] in the buffers below. */
#define ROWS 4

/* out[r][b] = sum_c x[r][c] * by_dim[c][b]: rows of x M^T, one vector of tokens at a time */
static inline void rows_times(vf *out, const vf *x, int64_t dv, const vf *by_dim, int64_t d, int64_t nv) {
    const float *xf = (const float *)x;
    for (int64_t b = 0; b < nv; b++) {
        vf acc[ROWS] = {{0}};
        for (int64_t c = 0; c < d; c++) {
            vf column = by_dim[c * nv + b];
            for (int r = 0; r < ROWS; r++) acc[r] += xf[r * dv * W + c] * column;
        }
        for (int r = 0; r < ROWS; r++) out[r * nv + b] = acc[r];
    }
}

/* out[r][e] = sum_j weights[r][j] * by_token[j][e], for j < n */
static inline void rows_weighted(vf *out, const vf *weights, int64_t nv, const vf *by_token, int64_t n, int64_t dv) {
    const float *w = (const float *)weights;
    for (int64_t e = 0; e < dv; e++) {
        vf acc[2][ROWS] = {{{0}}};  /* two sums per row: even and odd tokens */
        int64_t j = 0;
        for (; j + 2 <= n; j += 2)
            for (int u = 0; u < 2; u++) {
                vf token = by_token[(j + u) * dv + e];
                for (int r = 0; r < ROWS; r++) acc[u][r] += w[r * nv * W + j + u] * token;
            }
        for (; j < n; j++)
            for (int r = 0; r < ROWS; r++) acc[0][r] += w[r * nv * W + j] * by_token[j * dv + e];
        for (int r = 0; r < ROWS; r++) out[r * dv + e] = acc[0][r] + acc[1][r];
    }
}

/* by_token[j][e] += sum_r weights[r][j] * x[r][e], for j < n */
static inline void rows_add_outer(vf *by_token, const vf *weights, int64_t nv, const vf *x, int64_t n, int64_t dv) {
    const float *w = (const float *)weights;
    for (int64_t e = 0; e < dv; e++) {
        vf xr[ROWS];
        for (int r = 0; r < ROWS; r++) xr[r] = x[r * dv + e];
        for (int64_t j = 0; j < n; j++) {
            vf sum = by_token[j * dv + e];
            for (int r = 0; r < ROWS; r++) sum += w[r * nv * W + j] * xr[r];
            by_token[j * dv + e] = sum;
        }
    }
}

/* ROWS rows of d numbers from src[offset], `stride` apart, into dst (ROWS x dv
 * vectors); rows from `rows` on (past the last query) are zero. */
static inline void load_rows(vf *dst, const void *src, int64_t offset, int rows, int64_t stride, int64_t d,
                             int64_t dv, int bf16) {
    memset(dst, 0, sizeof(vf) * (size_t)(ROWS * dv));
    for (int r = 0; r < rows; r++) read_floats((float *)(dst + r * dv), src, offset + r * stride, d, bf16);
}

/* Attention for (batch, head) pairs [start, end) (pair = batch * heads + head),
 * reading q, k and v straight from the fused projection's output and writing
 * the output where the next projection reads it, so neither side needs a
 * transposed copy:
 *   qkv  (batch, n, 3, heads, d): q, k, v of every token
 *   out  (batch, nq, heads, d):   dropout(softmax(q k^T * qk_scale)) v for the first nq tokens
 *   probs (batch, heads, nq, nv * W): for the backward pass (NULL when there is
 *         none), float32, rows padded to whole vectors: the softmax before dropout,
 *         its sign bit set where dropout dropped the element, so the backward pass
 *         reads the mask instead of recomputing it (probabilities are >= 0)
 * qkv and out are float32, or bfloat16 if bf16. The dropout mask row of query i
 * of a pair is pair * nq + i; threshold 0 means no dropout. With mask_diagonal
 * no token attends to itself (locality self-attention): query i's probability
 * of token i is 0, which the backward pass then needs no word of.
 * Returns 0, or -1 if out of memory. */
static inline __attribute__((always_inline)) int attention_forward_range(
    const void *qkv, void *out, float *probs, int64_t start, int64_t end, int64_t heads, int64_t nq, int64_t n,
    int64_t d, float qk_scale, uint64_t seed, uint32_t threshold, float drop_scale, int mask_diagonal, int64_t dv,
    int bf16) {
    int64_t nv = (n + W - 1) / W, stride = 3 * heads * d;
    void *raw;
    vf *kt = vectors((size_t)(d * nv + n * dv + (2 * ROWS + 1) * nv + 2 * ROWS * dv), &raw);
    if (!kt) return -1;
    vf *vr = kt + d * nv, *scores = vr + n * dv, *dropped = scores + ROWS * nv, *padding = dropped + ROWS * nv;
    vf *qs = padding + nv, *o = qs + ROWS * dv;
    for (int64_t b = 0; b < nv; b++)  /* -1e30 on the padding lanes keeps them out of the max */
        padding[b] = select_vf((vu)(LANE + (uint32_t)(b * W) >= (uint32_t)n), (vf){0} - 1e30f, (vf){0});
    for (int64_t pair = start; pair < end; pair++) {
        int64_t q = (pair / heads) * n * stride + (pair % heads) * d;  /* where this pair's q starts */
        pad_by_dim(kt, qkv, q + heads * d, n, d, stride, nv, bf16);
        pad_by_token(vr, qkv, q + 2 * heads * d, n, d, stride, dv, bf16);
        for (int64_t i0 = 0; i0 < nq; i0 += ROWS) {
            int rows = nq - i0 < ROWS ? (int)(nq - i0) : ROWS;
            load_rows(qs, qkv, q + i0 * stride, rows, stride, d, dv, bf16);
            rows_times(scores, qs, dv, kt, d, nv);  /* q k^T, scaled inside the exp below */
            /* rows past the last query (r >= rows) are left as they are: their outputs are never written */
            for (int r = 0; r < rows; r++) {
                vf *s = scores + r * nv, *p = dropped + r * nv;
                int64_t row = pair * nq + i0 + r, self = i0 + r;  /* self: the query's own token */
                if (mask_diagonal) s[self / W][self % W] = -1e30f;  /* out of the max */
                vf max_v = s[0] + padding[0];
                for (int64_t b = 1; b < nv; b++) {
                    vf candidate = s[b] + padding[b];
                    max_v = select_vf((vu)(candidate > max_v), candidate, max_v);
                }
                float max = hmax(max_v);
                vf sum_v = {0};
                for (int64_t b = 0; b < nv; b++) {
                    s[b] = select_vf((vu)(padding[b] < 0.0f), (vf){0}, exp_nonpositive((s[b] - max) * qk_scale));
                    sum_v += s[b];
                }
                float sum = hsum(sum_v);
                if (mask_diagonal) {  /* e^-87 for the -1e30: made an exact 0 */
                    sum -= s[self / W][self % W];
                    s[self / W][self % W] = 0.0f;
                }
                /* one pass: normalise, save for the backward pass, drop out */
                float inv_sum = 1.0f / sum;
                uint32_t key = threshold ? row_key(seed, (uint64_t)row) : 0;
                for (int64_t b = 0; b < nv; b++) {
                    vf prob = s[b] * inv_sum;
                    vu kept = threshold ? kept_lanes(key, b, threshold) : ~(vu){0};
                    if (probs) {
                        vf saved = (vf)((vu)prob | (~kept & 0x80000000U));
                        memcpy(probs + (row * nv + b) * W, &saved, sizeof saved);
                    }
                    s[b] = prob;
                    if (threshold) p[b] = select_vf(kept, prob * drop_scale, (vf){0});
                }
            }
            rows_weighted(o, threshold ? dropped : scores, nv, vr, n, dv);
            for (int r = 0; r < rows; r++)
                write_floats(out, ((pair / heads) * nq + i0 + r) * heads * d + (pair % heads) * d,
                             (const float *)(o + r * dv), d, bf16);
        }
    }
    free(raw);
    return 0;
}

/* Gradients of attention_forward for pairs [start, end), from the saved
 * probs and the mask saved in their sign bits (no seed needed; threshold 0:
 * there was no dropout): dout is shaped as out, dqkv as qkv (the q rows of
 * tokens nq and after get zeros), all three of qkv's type.
 * Returns 0, or -1 if out of memory. */
static inline __attribute__((always_inline)) int attention_backward_range(
    const void *qkv, const float *probs, const void *dout, void *dqkv, int64_t start, int64_t end, int64_t heads,
    int64_t nq, int64_t n, int64_t d, float qk_scale, uint32_t threshold, float drop_scale, int64_t dv, int bf16) {
    int64_t nv = (n + W - 1) / W, stride = 3 * heads * d, out_stride = heads * d;
    void *raw;
    vf *vt = vectors((size_t)(d * nv + 3 * n * dv + 4 * ROWS * nv + (3 * ROWS + 1) * dv), &raw);
    if (!vt) return -1;
    vf *kr = vt + d * nv, *dkr = kr + n * dv, *dvr = dkr + n * dv;
    vf *p = dvr + n * dv, *mask = p + ROWS * nv, *dp = mask + ROWS * nv, *ds = dp + ROWS * nv;
    vf *qi = ds + ROWS * nv, *doi = qi + ROWS * dv, *dqi = doi + ROWS * dv, *zeros = dqi + ROWS * dv;
    if (!threshold)  /* no dropout: every element kept, unscaled */
        for (int64_t b = 0; b < ROWS * nv; b++) mask[b] = (vf){0} + 1.0f;
    for (int64_t pair = start; pair < end; pair++) {
        int64_t q = (pair / heads) * n * stride + (pair % heads) * d;  /* where this pair's q (and dq) starts */
        pad_by_dim(vt, qkv, q + 2 * heads * d, n, d, stride, nv, bf16);
        pad_by_token(kr, qkv, q + heads * d, n, d, stride, dv, bf16);
        memset(dkr, 0, sizeof(vf) * (size_t)(2 * n * dv));  /* dkr and dvr */
        for (int64_t i0 = 0; i0 < nq; i0 += ROWS) {
            int rows = nq - i0 < ROWS ? (int)(nq - i0) : ROWS;
            int64_t row = pair * nq + i0;
            for (int64_t b = 0; b < rows * nv; b++) {
                vf saved;
                memcpy(&saved, probs + (row * nv + b) * W, sizeof saved);
                p[b] = (vf)((vu)saved & 0x7FFFFFFFU);
                if (threshold) {
                    vu kept = ((vu)saved >> 31) - 1U;  /* all ones where the sign bit is clear */
                    mask[b] = (vf)(kept & (vu)((vf){0} + drop_scale));
                }
            }
            /* rows past the last query are all zero, so they add nothing below */
            memset(p + rows * nv, 0, sizeof(vf) * (size_t)((ROWS - rows) * nv));
            load_rows(qi, qkv, q + i0 * stride, rows, stride, d, dv, bf16);
            load_rows(doi, dout, ((pair / heads) * nq + i0) * out_stride + (pair % heads) * d, rows, out_stride, d,
                      dv, bf16);
            /* through the product with v: dv += (dropped-out probs)^T dout; dp = dout v^T */
            rows_times(dp, doi, dv, vt, d, nv);
            for (int64_t b = 0; b < ROWS * nv; b++) ds[b] = p[b] * mask[b];
            rows_add_outer(dvr, ds, nv, doi, n, dv);
            /* through dropout and softmax: ds = p * (dp - sum(dp * p)), times the score scale */
            for (int r = 0; r < ROWS; r++) {
                vf dot_v = {0};
                for (int64_t b = r * nv; b < (r + 1) * nv; b++) {
                    dp[b] *= mask[b];
                    dot_v += dp[b] * p[b];
                }
                float dot = hsum(dot_v);
                for (int64_t b = r * nv; b < (r + 1) * nv; b++) ds[b] = p[b] * (dp[b] - dot) * qk_scale;
            }
            /* through the scores q k^T: dq = ds k, dk += ds^T q */
            rows_weighted(dqi, ds, nv, kr, n, dv);
            for (int r = 0; r < rows; r++)
                write_floats(dqkv, q + (i0 + r) * stride, (const float *)(dqi + r * dv), d, bf16);
            rows_add_outer(dkr, ds, nv, qi, n, dv);
        }
        for (int64_t i = nq; i < n; i++) write_floats(dqkv, q + i * stride, (const float *)zeros, d, bf16);
        for (int64_t j = 0; j < n; j++) {
            write_floats(dqkv, q + j * stride + heads * d, (const float *)(dkr + j * dv), d, bf16);
            write_floats(dqkv, q + j * stride + 2 * heads * d, (const float *)(dvr + j * dv), d, bf16);
        }
    }
    free(raw);
    return 0;
}

/* The two exported functions below call the range functions with their last
 * two arguments, dv and bf16, as constants where they can: a head of at most
 * W numbers (dv == 1) and each number type get code compiled for exactly
 * that case. */
#define SPECIALISED(range, ...)                                                           \
    (d <= W ? (bf16 ? range(__VA_ARGS__, 1, 1) : range(__VA_ARGS__, 1, 0))                \
            : (bf16 ? range(__VA_ARGS__, (d + W - 1) / W, 1) : range(__VA_ARGS__, (d + W - 1) / W, 0)))

int attention_forward(const void *qkv, void *out, float *probs, int64_t start, int64_t end, int64_t heads,
                      int64_t nq, int64_t n, int64_t d, int bf16, float qk_scale, uint64_t seed, uint32_t threshold,
                      float drop_scale, int mask_diagonal, int threads) {
    int failed = 0;
#pragma omp parallel num_threads(threads) reduction(| : failed)
    {
        int64_t first, last;
        thread_range(start, end, 1, &first, &last);
        failed |= SPECIALISED(attention_forward_range, qkv, out, probs, first, last, heads, nq, n, d, qk_scale, seed,
                              threshold, drop_scale, mask_diagonal) != 0;
    }
    return failed ? -1 : 0;
}

int attention_backward(const void *qkv, const float *probs, const void *dout, void *dqkv, int64_t start,
                       int64_t end, int64_t heads, int64_t nq, int64_t n, int64_t d, int bf16, float qk_scale,
                       uint32_t threshold, float drop_scale, int threads) {
    int failed = 0;
#pragma omp parallel num_threads(threads) reduction(| : failed)
    {
        int64_t first, last;
        thread_range(start, end, 1, &first, &last);
        failed |= SPECIALISED(attention_backward_range, qkv, probs, dout, dqkv, first, last, heads, nq, n, d,
                              qk_scale, threshold, drop_scale) != 0;
    }
    return failed ? -1 : 0;
}
