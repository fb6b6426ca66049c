/* Fused CPU kernels for the training step: dropout, the tanh GELU, and attention with dropout.
 *
 * Why: with 65 tokens and 12-wide heads the seed model's attention is a swarm
 * of tiny matrix products, and PyTorch runs it as separate passes over the
 * (B, heads, N, N) scores (matmul, softmax, random mask, multiply, matmul,
 * and the same again backwards), each reading and writing megabytes. Here one
 * (batch, head) pair is done start to finish while its numbers sit in the
 * processor's cache.
 *
 * Dropout masks are not stored: whether element j of row r is kept is a hash
 * of (seed, r, j), so the backward pass regenerates the forward's mask.
 *
 * vitcraft.cpu_kernels compiles this file with the system C compiler on first
 * use and calls it through ctypes; each call handles a range of elements or of
 * (batch, head) pairs. C99 with GCC/Clang vector extensions and OpenMP
 * pragmas (optional: without OpenMP, Python splits the work over threads).
 */
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

/* Vectors of 16 floats (GCC/Clang vector extensions): the compiler maps them
 * onto whatever vector registers the processor has (one AVX-512 register, two
 * AVX2 ones, four NEON ones). Scalars in arithmetic with them are broadcast. */
#define W 16
typedef float vf __attribute__((vector_size(4 * W)));
typedef uint32_t vu __attribute__((vector_size(4 * W)));

static const vu LANE = {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15};

static inline vf select_vf(vu condition, vf yes, vf no) {  /* condition lanes are all ones or zero */
    return (vf)(((vu)yes & condition) | ((vu)no & ~condition));
}

/* Sum and maximum of a vector's lanes, halving the width each step (4 steps, not 15) */
static inline float hsum(vf x) {
    float lane[W];
    memcpy(lane, &x, sizeof x);
    for (int width = W / 2; width > 0; width /= 2)
        for (int i = 0; i < width; i++) lane[i] += lane[i + width];
    return lane[0];
}

static inline float hmax(vf x) {
    float lane[W];
    memcpy(lane, &x, sizeof x);
    for (int width = W / 2; width > 0; width /= 2)
        for (int i = 0; i < width; i++) lane[i] = lane[i + width] > lane[i] ? lane[i + width] : lane[i];
    return lane[0];
}

/* A 64-byte aligned buffer of `count` vectors, zeroed; free(*raw) releases it. */
static vf *vectors(size_t count, void **raw) {
    *raw = calloc(count * sizeof(vf) + 64, 1);
    if (!*raw) return NULL;
    return (vf *)(((uintptr_t)*raw + 63) & ~(uintptr_t)63);
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

/* mask[j] = scale if element j of row `row` is kept, else 0, for j < 16 * blocks.
 * An element is dropped when its 32-bit hash is below threshold = round(p * 2^32). */
static void mask_row(vf *mask, int64_t blocks, uint64_t seed, uint64_t row, uint32_t threshold, float scale) {
    uint32_t key = (uint32_t)splitmix64(seed + row * 0x9E3779B97F4A7C15ULL);
    vf kept = (vf){0} + scale;
    for (int64_t b = 0; b < blocks; b++) {
        vu hash = mix32(key + (LANE + (uint32_t)(b * W)) * 0x9E3779B9U);
        mask[b] = select_vf((vu)(hash >= threshold), kept, (vf){0});
    }
}

/* ---- dropout -------------------------------------------------------------------- */

/* Dropout rows (one key each) are this long, whatever the tensor's shape. */
#define DROPOUT_ROW 1024

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

/* count <= W floats; missing lanes 0. The fixed-size copy of a whole vector
 * compiles to one unaligned load or store; the variable one to a call. */
static inline vf load(const float *src, int64_t count) {
    vf x = {0};
    if (count == W) memcpy(&x, src, sizeof(vf));
    else memcpy(&x, src, sizeof(float) * (size_t)count);
    return x;
}

static inline void store(float *dst, vf x, int64_t count) {
    if (count == W) memcpy(dst, &x, sizeof(vf));
    else memcpy(dst, &x, sizeof(float) * (size_t)count);
}

/* tanh(sqrt(2/pi) (x + 0.044715 x^3)), with tanh|z| = (1 - e^-2|z|) / (1 + e^-2|z|) */
static inline vf gelu_tanh_term(vf x) {
    vf z = 0.7978845608028654f * (x + 0.044715f * x * x * x);
    vu sign = (vu)z & 0x80000000U;
    vf e = exp_nonpositive((vf)((vu)z | 0x80000000U) * 2.0f);  /* e^(-2|z|) */
    return (vf)((vu)((1.0f - e) / (1.0f + e)) | sign);
}

/* y = 0.5 x (1 + tanh(...)) for the flat elements [start, end) */
void gelu_forward(const float *x, float *y, int64_t start, int64_t end, int threads) {
#pragma omp parallel num_threads(threads)
    {
        int64_t first, last;
        thread_range(start, end, W, &first, &last);
        for (int64_t i = first; i < last; i += W) {
            int64_t count = last - i < W ? last - i : W;
            vf xi = load(x + i, count);
            store(y + i, 0.5f * xi * (1.0f + gelu_tanh_term(xi)), count);
        }
    }
}

/* dx = dy * d/dx [0.5 x (1 + t)] = dy * (0.5 (1 + t) + 0.5 x (1 - t^2) sqrt(2/pi) (1 + 3 * 0.044715 x^2)) */
void gelu_backward(const float *x, const float *dy, float *dx, int64_t start, int64_t end, int threads) {
#pragma omp parallel num_threads(threads)
    {
        int64_t first, last;
        thread_range(start, end, W, &first, &last);
        for (int64_t i = first; i < last; i += W) {
            int64_t count = last - i < W ? last - i : W;
            vf xi = load(x + i, count), t = gelu_tanh_term(xi);
            vf slope = 0.5f * (1.0f + t) + 0.5f * xi * (1.0f - t * t) * 0.7978845608028654f *
                       (1.0f + 0.134145f * xi * xi);
            store(dx + i, load(dy + i, count) * slope, count);
        }
    }
}

/* ---- attention ------------------------------------------------------------------ */

/* A (batch, head) pair's q, k or v (rows of d floats, `stride` floats apart)
 * copied into zero-padded vector layouts: by_token[j * dv + e] holds row j
 * (dv = d / 16 rounded up), by_dim[c * nv + b] holds column c (nv = n / 16
 * rounded up). */
static void pad_by_token(vf *dst, const float *src, int64_t n, int64_t d, int64_t stride, int64_t dv) {
    for (int64_t j = 0; j < n; j++) memcpy(dst + j * dv, src + j * stride, sizeof(float) * (size_t)d);
}

static void pad_by_dim(vf *dst, const float *src, int64_t n, int64_t d, int64_t stride, int64_t nv) {
    float *out = (float *)dst;
    for (int64_t j = 0; j < n; j++)
        for (int64_t c = 0; c < d; c++) out[c * nv * W + j] = src[j * stride + c];
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

/* Rows i0 .. i0 + ROWS - 1 of a (tokens x d) matrix, `stride` floats apart, into
 * dst (ROWS x dv vectors); rows from `rows` on (past the last query) are zero. */
static void load_rows(vf *dst, const float *src, int rows, int64_t stride, int64_t d, int64_t dv) {
    memset(dst, 0, sizeof(vf) * (size_t)(ROWS * dv));
    for (int r = 0; r < rows; r++) memcpy(dst + r * dv, src + r * stride, sizeof(float) * (size_t)d);
}

/* Attention for (batch, head) pairs [start, end) (pair = batch * heads + head),
 * reading q, k and v straight from the fused projection's output and writing
 * the output where the next projection reads it, so neither side needs a
 * transposed copy:
 *   qkv  (batch, n, 3, heads, d): q, k, v of every token
 *   out  (batch, nq, heads, d):   dropout(softmax(q k^T * qk_scale)) v for the first nq tokens
 *   probs (batch, heads, nq, n):  the softmax before dropout, which the backward pass
 *                                 needs (NULL when there is no backward pass)
 * The dropout mask row of query i of a pair is pair * nq + i; threshold 0 means no dropout.
 * Returns 0, or -1 if out of memory. */
static inline __attribute__((always_inline)) int attention_forward_range(
    const float *qkv, float *out, float *probs, int64_t start, int64_t end, int64_t heads, int64_t nq, int64_t n,
    int64_t d, int64_t dv, float qk_scale, uint64_t seed, uint32_t threshold, float drop_scale) {
    int64_t nv = (n + W - 1) / W, stride = 3 * heads * d;
    void *raw;
    vf *kt = vectors((size_t)(d * nv + n * dv + (2 * ROWS + 1) * nv + 2 * ROWS * dv), &raw);
    if (!kt) return -1;
    vf *vr = kt + d * nv, *scores = vr + n * dv, *dropped = scores + ROWS * nv, *padding = dropped + ROWS * nv;
    vf *qs = padding + nv, *o = qs + ROWS * dv;
    for (int64_t b = 0; b < nv; b++)  /* -1e30 on the padding lanes keeps them out of the max */
        padding[b] = select_vf((vu)(LANE + (uint32_t)(b * W) >= (uint32_t)n), (vf){0} - 1e30f, (vf){0});
    for (int64_t pair = start; pair < end; pair++) {
        const float *q = qkv + (pair / heads) * n * stride + (pair % heads) * d;
        pad_by_dim(kt, q + heads * d, n, d, stride, nv);
        pad_by_token(vr, q + 2 * heads * d, n, d, stride, dv);
        for (int64_t i0 = 0; i0 < nq; i0 += ROWS) {
            int rows = nq - i0 < ROWS ? (int)(nq - i0) : ROWS;
            load_rows(qs, q + i0 * stride, rows, stride, d, dv);
            for (int64_t e = 0; e < ROWS * dv; e++) qs[e] *= qk_scale;
            rows_times(scores, qs, dv, kt, d, nv);
            for (int r = 0; r < ROWS; r++) {
                vf *s = scores + r * nv, *p = dropped + r * nv;
                int64_t row = pair * nq + i0 + r;
                if (r >= rows) {  /* past the last query: weight nothing */
                    memset(p, 0, sizeof(vf) * (size_t)nv);
                    continue;
                }
                vf max_v = s[0] + padding[0];
                for (int64_t b = 1; b < nv; b++) {
                    vf candidate = s[b] + padding[b];
                    max_v = select_vf((vu)(candidate > max_v), candidate, max_v);
                }
                float max = hmax(max_v);
                vf sum_v = {0};
                for (int64_t b = 0; b < nv; b++) {
                    s[b] = select_vf((vu)(padding[b] < 0.0f), (vf){0}, exp_nonpositive(s[b] - max));
                    sum_v += s[b];
                }
                float inv_sum = 1.0f / hsum(sum_v);
                for (int64_t b = 0; b < nv; b++) s[b] *= inv_sum;
                if (probs) memcpy(probs + row * n, s, sizeof(float) * (size_t)n);
                if (threshold) {
                    mask_row(p, nv, seed, (uint64_t)row, threshold, drop_scale);
                    for (int64_t b = 0; b < nv; b++) p[b] *= s[b];  /* the probabilities after dropout */
                } else {
                    memcpy(p, s, sizeof(vf) * (size_t)nv);
                }
            }
            rows_weighted(o, dropped, nv, vr, n, dv);
            for (int r = 0; r < rows; r++)
                memcpy(out + ((pair / heads) * nq + i0 + r) * heads * d + (pair % heads) * d, o + r * dv,
                       sizeof(float) * (size_t)d);
        }
    }
    free(raw);
    return 0;
}

/* Gradients of attention_forward for pairs [start, end), from the saved
 * probs and the regenerated mask: dout is shaped as out, dqkv as qkv (the
 * q rows of tokens nq and after get zeros). Returns 0, or -1 if out of memory. */
static inline __attribute__((always_inline)) int attention_backward_range(
    const float *qkv, const float *probs, const float *dout, float *dqkv, int64_t start, int64_t end, int64_t heads,
    int64_t nq, int64_t n, int64_t d, int64_t dv, float qk_scale, uint64_t seed, uint32_t threshold,
    float drop_scale) {
    int64_t nv = (n + W - 1) / W, stride = 3 * heads * d, out_stride = heads * d;
    void *raw;
    vf *vt = vectors((size_t)(d * nv + 3 * n * dv + 4 * ROWS * nv + 3 * ROWS * dv), &raw);
    if (!vt) return -1;
    vf *kr = vt + d * nv, *dkr = kr + n * dv, *dvr = dkr + n * dv;
    vf *p = dvr + n * dv, *mask = p + ROWS * nv, *dp = mask + ROWS * nv, *ds = dp + ROWS * nv;
    vf *qi = ds + ROWS * nv, *doi = qi + ROWS * dv, *dqi = doi + ROWS * dv;
    if (!threshold)  /* no dropout: every element kept, unscaled */
        for (int64_t b = 0; b < ROWS * nv; b++) mask[b] = (vf){0} + 1.0f;
    for (int64_t pair = start; pair < end; pair++) {
        int64_t offset = (pair / heads) * n * stride + (pair % heads) * d;
        const float *q = qkv + offset;
        float *dq = dqkv + offset;
        pad_by_dim(vt, q + 2 * heads * d, n, d, stride, nv);
        pad_by_token(kr, q + heads * d, n, d, stride, dv);
        memset(dkr, 0, sizeof(vf) * (size_t)(2 * n * dv));  /* dkr and dvr */
        for (int64_t i0 = 0; i0 < nq; i0 += ROWS) {
            int rows = nq - i0 < ROWS ? (int)(nq - i0) : ROWS;
            int64_t row = pair * nq + i0;
            /* rows past the last query are all zero, so they add nothing below */
            memset(p, 0, sizeof(vf) * (size_t)(ROWS * nv));
            for (int r = 0; r < rows; r++) {
                memcpy(p + r * nv, probs + (row + r) * n, sizeof(float) * (size_t)n);
                if (threshold) mask_row(mask + r * nv, nv, seed, (uint64_t)(row + r), threshold, drop_scale);
            }
            load_rows(qi, q + i0 * stride, rows, stride, d, dv);
            load_rows(doi, dout + ((pair / heads) * nq + i0) * out_stride + (pair % heads) * d, rows, out_stride, d,
                      dv);
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
            for (int r = 0; r < rows; r++) memcpy(dq + (i0 + r) * stride, dqi + r * dv, sizeof(float) * (size_t)d);
            rows_add_outer(dkr, ds, nv, qi, n, dv);
        }
        for (int64_t i = nq; i < n; i++) memset(dq + i * stride, 0, sizeof(float) * (size_t)d);
        for (int64_t j = 0; j < n; j++) {
            memcpy(dq + j * stride + heads * d, dkr + j * dv, sizeof(float) * (size_t)d);
            memcpy(dq + j * stride + 2 * heads * d, dvr + j * dv, sizeof(float) * (size_t)d);
        }
    }
    free(raw);
    return 0;
}

int attention_forward(const float *qkv, float *out, float *probs, int64_t start, int64_t end, int64_t heads,
                      int64_t nq, int64_t n, int64_t d, float qk_scale, uint64_t seed, uint32_t threshold,
                      float drop_scale, int threads) {
    int failed = 0;
#pragma omp parallel num_threads(threads) reduction(| : failed)
    {
        int64_t first, last;
        thread_range(start, end, 1, &first, &last);
        /* a head of at most 16 numbers (dv == 1) gets code compiled for exactly that */
        failed |= (d <= W ? attention_forward_range(qkv, out, probs, first, last, heads, nq, n, d, 1, qk_scale,
                                                    seed, threshold, drop_scale)
                          : attention_forward_range(qkv, out, probs, first, last, heads, nq, n, d, (d + W - 1) / W,
                                                    qk_scale, seed, threshold, drop_scale)) != 0;
    }
    return failed ? -1 : 0;
}

int attention_backward(const float *qkv, const float *probs, const float *dout, float *dqkv, int64_t start,
                       int64_t end, int64_t heads, int64_t nq, int64_t n, int64_t d, float qk_scale,
                       uint64_t seed, uint32_t threshold, float drop_scale, int threads) {
    int failed = 0;
#pragma omp parallel num_threads(threads) reduction(| : failed)
    {
        int64_t first, last;
        thread_range(start, end, 1, &first, &last);
        failed |= (d <= W ? attention_backward_range(qkv, probs, dout, dqkv, first, last, heads, nq, n, d, 1,
                                                     qk_scale, seed, threshold, drop_scale)
                          : attention_backward_range(qkv, probs, dout, dqkv, first, last, heads, nq, n, d,
                                                     (d + W - 1) / W, qk_scale, seed, threshold, drop_scale)) != 0;
    }
    return failed ? -1 : 0;
}
