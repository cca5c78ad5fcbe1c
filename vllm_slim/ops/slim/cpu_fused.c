/* Slim's CPU loops, fused: the cache write of a step's new tokens and the decode, each reading its
 * inputs once in place.
 *
 * Store (`slim_store`): for each new token, its K|spill row as `cache.cache_rows` builds it (raw key
 * and value, minus their biases, times the refinement and spill maps; the refined key re-rotated),
 * converted to the cache's dtype and written at its slot (slot -1, padding, is skipped). The products
 * are split over slabs of the maps' columns as well as over tokens (see `product`).
 *
 * Decode (`slim_decode`): for each sequence, a tile of tokens at a time from the first one its sliding
 * window holds (0 without a window: the pages before it are never read): scores s[h][l] = scale *
 * q_h . k_h,l from the post-RoPE keys, each row un-rotated once (the RoPE of position l undone for
 * every head), then, on the running softmax statistics (online softmax), z[h] += w[h][l] * k_raw,l
 * (the whole H*D row) and zs[h] += w[h][l] * spill_l. Outputs are normalised: z [B, H, H*D] =
 * sum_l P[h][l] k_raw,l, zs [B, H, H*R] likewise (R spill coordinates per head): the contract of
 * `decode.decode_rows`, read straight from the pages; one OpenMP thread per sequence at a time.
 *
 * Both products (refinement and spill maps; weights times the tile of raw rows) are one
 * register-blocked routine, `accumulate`. With AVX2 and FMA (x86-64 since 2013) the inner loops use
 * 8-float vectors explicitly: left to the compiler, the product kept its accumulators in memory, the
 * exponentials stayed scalar calls and the rotation stayed scalar: the decode took 1.6 times as long
 * (16 sequences x 640 tokens at 4 x 64: 1.01 against 0.63 ms on 2 cores). Elsewhere the same loops
 * run as plain C.
 *
 * Built at first use by `cpu_kernel.py` with the machine's C compiler; no Python or torch headers.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#include <immintrin.h>
#define VECTOR 1
#else
#define VECTOR 0
#endif

enum { F32 = 0, F16 = 1, BF16 = 2 };
/* Tokens per decode tile; rows per block of the product (its left operand is padded to whole
 * blocks with zero rows). */
enum { TILE = 32, HT = 4 };

static int round_up(int x, int m) { return (x + m - 1) / m * m; }
static int64_t element_size(int dtype) { return dtype == F32 ? 4 : 2; }

static void load_row(const void *src, int dtype, int count, float *dst) {
    int i = 0;
    if (dtype == F32) {
        memcpy(dst, src, count * sizeof(float));
        return;
    }
    const uint16_t *s = (const uint16_t *)src;
    if (dtype == F16) {
#if VECTOR
        for (; i + 8 <= count; i += 8) _mm256_storeu_ps(dst + i, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(s + i))));
#endif
        for (; i < count; i++) dst[i] = (float)((const _Float16 *)s)[i];
    } else {
#if VECTOR
        for (; i + 8 <= count; i += 8) {
            const __m256i wide = _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)(s + i)));
            _mm256_storeu_ps(dst + i, _mm256_castsi256_ps(_mm256_slli_epi32(wide, 16)));
        }
#endif
        for (; i < count; i++) {
            const uint32_t bits = (uint32_t)s[i] << 16;
            memcpy(&dst[i], &bits, sizeof(float));
        }
    }
}

/* float32 to the cache's dtype, rounding to nearest even as torch's `.to()` does. */
static void store_row(const float *src, int count, int dtype, void *dst) {
    if (dtype == F32) {
        memcpy(dst, src, count * sizeof(float));
    } else if (dtype == F16) {
        for (int i = 0; i < count; i++) ((_Float16 *)dst)[i] = (_Float16)src[i];
    } else {
        for (int i = 0; i < count; i++) {
            uint32_t bits;
            memcpy(&bits, &src[i], sizeof(bits));
            ((uint16_t *)dst)[i] = isnan(src[i]) ? 0x7fc0 : (uint16_t)((bits + 0x7fff + ((bits >> 16) & 1)) >> 16);
        }
    }
}

static float dot(const float *a, const float *b, int n) {
    int i = 0;
    float s = 0.0f;
#if VECTOR
    __m256 acc = _mm256_setzero_ps();
    for (; i + 8 <= n; i += 8) acc = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), acc);
    const __m128 four = _mm_add_ps(_mm256_castps256_ps128(acc), _mm256_extractf128_ps(acc, 1));
    const __m128 two = _mm_add_ps(four, _mm_movehl_ps(four, four));
    s = _mm_cvtss_f32(_mm_add_ss(two, _mm_movehdup_ps(two)));
#endif
    for (; i < n; i++) s += a[i] * b[i];
    return s;
}

/* One head's key k [D] rotated by the angles cs (cos [rotary_dim / 2], then sin) into o [D]:
 * sign +1 applies the RoPE, -1 undoes it; dimensions past rotary_dim pass through. */
static void rotate(const float *k, const float *cs, int rotary_dim, int neox, int D, float sign, float *o) {
    const int half = rotary_dim / 2;
    memcpy(o + rotary_dim, k + rotary_dim, sizeof(float) * (D - rotary_dim));
    for (int i = 0; i < half; i++) {
        const int a = neox ? i : 2 * i, b = neox ? half + i : 2 * i + 1;
        const float c = cs[i], s = sign * cs[half + i], x1 = k[a], x2 = k[b];
        o[a] = x1 * c - x2 * s;
        o[b] = x2 * c + x1 * s;
    }
}

#if VECTOR
static __m256 load8(const void *src, int dtype, int i) {
    if (dtype == F16) return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)((const uint16_t *)src + i)));
    if (dtype == BF16) {
        const __m256i wide = _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)((const uint16_t *)src + i)));
        return _mm256_castsi256_ps(_mm256_slli_epi32(wide, 16));
    }
    return _mm256_loadu_ps((const float *)src + i);
}

static float horizontal_sum(__m256 x) {
    const __m128 four = _mm_add_ps(_mm256_castps256_ps128(x), _mm256_extractf128_ps(x, 1));
    const __m128 two = _mm_add_ps(four, _mm_movehl_ps(four, four));
    return _mm_cvtss_f32(_mm_add_ss(two, _mm_movehdup_ps(two)));
}
#endif

/* One cached row of one head, read in place: returns q_h . k (the post-RoPE key) and writes the raw
 * key to raw [D] and the spill to spill [R]. `scratch` holds D + R floats. */
static float read_key(const void *src, int dtype, const float *qh, const float *cs, int rotary_dim, int neox, int D,
                      int R, float *raw, float *spill, float *scratch) {
#if VECTOR
    const int half = rotary_dim / 2;
    if ((neox || rotary_dim == 0) && half % 8 == 0 && (D - rotary_dim) % 8 == 0) { /* all in registers */
        __m256 score1 = _mm256_setzero_ps(), score2 = _mm256_setzero_ps();
        for (int i = 0; i < half; i += 8) {
            const __m256 x1 = load8(src, dtype, i), x2 = load8(src, dtype, half + i);
            const __m256 c = _mm256_loadu_ps(cs + i), s = _mm256_loadu_ps(cs + half + i);
            score1 = _mm256_fmadd_ps(_mm256_loadu_ps(qh + i), x1, score1);
            score2 = _mm256_fmadd_ps(_mm256_loadu_ps(qh + half + i), x2, score2);
            _mm256_storeu_ps(raw + i, _mm256_fmadd_ps(x2, s, _mm256_mul_ps(x1, c)));
            _mm256_storeu_ps(raw + half + i, _mm256_fnmadd_ps(x1, s, _mm256_mul_ps(x2, c)));
        }
        for (int d = rotary_dim; d < D; d += 8) {
            const __m256 x = load8(src, dtype, d);
            score1 = _mm256_fmadd_ps(_mm256_loadu_ps(qh + d), x, score1);
            _mm256_storeu_ps(raw + d, x);
        }
        load_row((const char *)src + D * element_size(dtype), dtype, R, spill);
        return horizontal_sum(_mm256_add_ps(score1, score2));
    }
#endif
    load_row(src, dtype, D + R, scratch);
    rotate(scratch, cs, rotary_dim, neox, D, -1.0f, raw);
    memcpy(spill, scratch + D, sizeof(float) * R);
    return dot(qh, scratch, D);
}

#if VECTOR
/* e^x for x <= 0 (x = score - running max), Cody-Waite reduction and a degree-6 polynomial:
 * within 2 ulp of expf; below -87 it gives 0. */
static __m256 exp_nonpositive(__m256 x) {
    x = _mm256_max_ps(x, _mm256_set1_ps(-87.0f));
    const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                     _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
    r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
    __m256 p = _mm256_set1_ps(1.9875691500e-4f);
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
    p = _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
    const __m256i scale = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(p, _mm256_castsi256_ps(scale));
}
#endif

/* w[i] = e^(w[i] - top) for i < t; returns their sum. */
static float exponentiate(float *w, int t, float top) {
    int i = 0;
    float total = 0.0f;
#if VECTOR
    for (; i + 8 <= t; i += 8)
        _mm256_storeu_ps(w + i, exp_nonpositive(_mm256_sub_ps(_mm256_loadu_ps(w + i), _mm256_set1_ps(top))));
#endif
    for (; i < t; i++) w[i] = expf(w[i] - top);
    for (i = 0; i < t; i++) total += w[i];
    return total;
}

/* One register block: acc [HT][8 * VECTORS] += a [HT][n] . b [n][8 * VECTORS] (leading dimensions given). */
#if VECTOR
static inline __attribute__((always_inline)) void block(float *acc, int ld_acc, const float *a, int ld_a,
                                                        const float *b, int ld_b, int n, const int VECTORS) {
    __m256 c[HT][3];
    for (int h = 0; h < HT; h++)
        for (int v = 0; v < VECTORS; v++) c[h][v] = _mm256_loadu_ps(acc + (int64_t)h * ld_acc + 8 * v);
    for (int i = 0; i < n; i++) {
        __m256 k[3];
        for (int v = 0; v < VECTORS; v++) k[v] = _mm256_loadu_ps(b + (int64_t)i * ld_b + 8 * v);
        for (int h = 0; h < HT; h++) {
            const __m256 x = _mm256_broadcast_ss(a + (int64_t)h * ld_a + i);
            for (int v = 0; v < VECTORS; v++) c[h][v] = _mm256_fmadd_ps(x, k[v], c[h][v]);
        }
    }
    for (int h = 0; h < HT; h++)
        for (int v = 0; v < VECTORS; v++) _mm256_storeu_ps(acc + (int64_t)h * ld_acc + 8 * v, c[h][v]);
}
#endif

/* acc [rows][ld_acc] += a [rows][ld_a] (first n columns) . b [n][ld_b] (first W columns), rows a
 * multiple of HT. Register blocks of HT rows x 24 columns (12 of the 16 vector registers), then x 8,
 * then a scalar tail; a slab of b's columns serves every block of rows while it is in L1. */
static void accumulate(float *acc, int ld_acc, const float *a, int ld_a, const float *b, int ld_b, int n, int rows,
                       int W) {
    int j0 = 0;
#if VECTOR
    for (; j0 + 24 <= W; j0 += 24)
        for (int h0 = 0; h0 < rows; h0 += HT)
            block(acc + (int64_t)h0 * ld_acc + j0, ld_acc, a + (int64_t)h0 * ld_a, ld_a, b + j0, ld_b, n, 3);
    for (; j0 + 8 <= W; j0 += 8)
        for (int h0 = 0; h0 < rows; h0 += HT)
            block(acc + (int64_t)h0 * ld_acc + j0, ld_acc, a + (int64_t)h0 * ld_a, ld_a, b + j0, ld_b, n, 1);
#endif
    for (int h = 0; h < rows; h++)
        for (int i = 0; i < n; i++) {
            const float x = a[(int64_t)h * ld_a + i];
            const float *k = b + (int64_t)i * ld_b;
            float *out = acc + (int64_t)h * ld_acc;
            for (int j = j0; j < W; j++) out[j] += x * k[j];
        }
}

/* ---- store ---- */

/* Tokens per pass of the store (bounds its buffers); columns per task of its products, and rows of
 * a map per sweep (a 128 x 512 piece of it, 256 KiB, stays in L2 while every register block reads it). */
enum { STORE_CHUNK = 64, SLAB = 512, MAP_ROWS = 128 };

/* out [rows][W] = a [rows][K] . b [K][W], split over (block of HT rows, slab of columns) tasks so that
 * one token's product still uses every thread on the map, the larger read (128 MiB a layer at
 * Llama-7B's shape), which each task reads in contiguous row pieces. */
static void product(float *out, const float *a, const float *b, int rows, int K, int W) {
    const int slabs = (W + SLAB - 1) / SLAB;
#pragma omp for collapse(2) schedule(dynamic, 1)
    for (int r0 = 0; r0 < rows; r0 += HT)
        for (int s = 0; s < slabs; s++) {
            const int j0 = s * SLAB, width = W - j0 < SLAB ? W - j0 : SLAB;
            float *acc = out + (int64_t)r0 * W + j0;
            for (int h = 0; h < HT; h++) memset(acc + (int64_t)h * W, 0, sizeof(float) * width);
            for (int k0 = 0; k0 < K; k0 += MAP_ROWS)
                accumulate(acc, W, a + (int64_t)r0 * K + k0, K, b + (int64_t)k0 * W + j0, W,
                           K - k0 < MAP_ROWS ? K - k0 : MAP_ROWS, HT, width);
        }
}

/* T new tokens' rows written at their slots, STORE_CHUNK tokens a pass, on torch's OpenMP threads:
 * key [T][H*D] (row stride key_stride elements), value [T][H*Dv] (value_stride); refine [K][H*D] or
 * NULL, spill_in [K][H*R] (K = H*D + H*Dv); biases or NULL; cos_sin [positions][rotary_dim] the
 * model's table (it re-rotates refined keys), uncos_sin its inverse (it un-rotates the given keys: a
 * scaled table's magnitude divided out); rotary_dim 0: no RoPE. */
int slim_store(void *cache, int cache_dtype, int64_t stride_block, int64_t stride_head, int64_t stride_token,
               int block_size, const void *key, const void *value, int in_dtype, int64_t key_stride,
               int64_t value_stride, const int64_t *slots, const int64_t *positions, int T, int H, int D, int Dv,
               int R, const float *refine, const float *spill_in, const float *k_bias, const float *v_bias,
               const float *cos_sin, const float *uncos_sin, int rotary_dim, int neox) {
    const int HD = H * D, HR = H * R, K = HD + H * Dv, derived = refine != NULL || R > 0;
    const int64_t in_size = element_size(in_dtype), cache_size = element_size(cache_dtype);
    /* kv0: each token's raw key minus its bias, then its value minus its bias (rows past the chunk's
     * tokens zero); keys: what is stored as the key; refined, spill: the products. */
    float *kv0 = calloc((size_t)STORE_CHUNK * K, sizeof(float));
    float *keys = malloc(sizeof(float) * STORE_CHUNK * HD);
    float *refined = malloc(sizeof(float) * STORE_CHUNK * HD);
    float *spill = malloc(sizeof(float) * STORE_CHUNK * (HR + 1));
    if (!kv0 || !keys || !refined || !spill) {
        free(kv0);
        free(keys);
        free(refined);
        free(spill);
        return 1;
    }
    for (int first = 0; first < T; first += STORE_CHUNK) {
        const int count = T - first < STORE_CHUNK ? T - first : STORE_CHUNK, rows = round_up(count, HT);
#pragma omp parallel
        {
#pragma omp for schedule(static)
            for (int t = 0; t < rows; t++) {
                float *row = kv0 + (int64_t)t * K;
                if (t >= count) {
                    memset(row, 0, sizeof(float) * K);
                    continue;
                }
                const int64_t n = first + t;
                load_row((const char *)key + n * key_stride * in_size, in_dtype, HD, keys + (int64_t)t * HD);
                if (!derived) continue;
                const float *cs = uncos_sin + positions[n] * rotary_dim;
                for (int h = 0; h < H; h++)
                    rotate(keys + (int64_t)t * HD + h * D, cs, rotary_dim, neox, D, -1.0f, row + h * D);
                load_row((const char *)value + n * value_stride * in_size, in_dtype, H * Dv, row + HD);
                for (int j = 0; k_bias && j < HD; j++) row[j] -= k_bias[j];
                for (int j = 0; v_bias && j < H * Dv; j++) row[HD + j] -= v_bias[j];
            }
            if (R > 0) product(spill, kv0, spill_in, rows, K, HR);
            if (refine) product(refined, kv0, refine, rows, K, HD);
#pragma omp for schedule(static)
            for (int t = 0; t < count; t++) {
                const int64_t n = first + t;
                if (slots[n] < 0) continue;
                if (refine) { /* the least-squares input's key, re-rotated */
                    float *r = refined + (int64_t)t * HD;
                    for (int j = 0; k_bias && j < HD; j++) r[j] += k_bias[j];
                    for (int h = 0; h < H; h++)
                        rotate(r + h * D, cos_sin + positions[n] * rotary_dim, rotary_dim, neox, D, 1.0f,
                               keys + (int64_t)t * HD + h * D);
                }
                const int64_t at = slots[n] / block_size * stride_block + slots[n] % block_size * stride_token;
                for (int h = 0; h < H; h++) {
                    char *dst = (char *)cache + (at + h * stride_head) * cache_size;
                    store_row(keys + (int64_t)t * HD + h * D, D, cache_dtype, dst);
                    store_row(spill + (int64_t)t * HR + h * R, R, cache_dtype, dst + D * cache_size);
                }
            }
        }
    }
    free(kv0);
    free(keys);
    free(refined);
    free(spill);
    return 0;
}

/* ---- decode ---- */

static void decode_one(const void *cache, int dtype, int64_t stride_block, int64_t stride_head, int64_t stride_token,
                       const int32_t *blocks, int first, int n, const float *qb, const float *uncos_sin, int rotary_dim,
                       int neox, int H, int D, int R, int block_size, float scale, float *scratch, float *tile,
                       float *weights, float *acc, float *z, float *zs) {
    const int HD = H * D, HR = H * R, Hp = round_up(H, HT), W = HD + HR;
    float peak[256], total[256]; /* running max and sum per head, H <= 256 */
    for (int h = 0; h < H; h++) peak[h] = -INFINITY, total[h] = 0.0f;
    memset(acc, 0, sizeof(float) * Hp * W);
    /* One pass over positions first..n-1, a tile of tokens at a time (online softmax): each row is read once. */
    for (int l0 = first; l0 < n; l0 += TILE) {
        const int t = n - l0 < TILE ? n - l0 : TILE;
        /* Head by head: a head's rows of the tile are contiguous in its page. */
        for (int h = 0; h < H; h++)
            for (int i = 0; i < t; i++) {
                const int l = l0 + i;
                const int64_t at = (int64_t)blocks[l / block_size] * stride_block + h * stride_head +
                                   (int64_t)(l % block_size) * stride_token;
                float *raw = tile + (int64_t)i * W;
                weights[h * TILE + i] = scale * read_key((const char *)cache + at * element_size(dtype), dtype,
                                                         qb + h * D, uncos_sin + (int64_t)l * rotary_dim, rotary_dim,
                                                         neox, D, R, raw + h * D, raw + HD + h * R, scratch);
            }
        for (int h = 0; h < H; h++) {
            float *w = weights + h * TILE, top = peak[h];
            for (int i = 0; i < t; i++) top = w[i] > top ? w[i] : top;
            if (top > peak[h]) { /* a larger max: what was summed so far shrinks by exp(old - new) */
                const float shrink = expf(peak[h] - top);
                for (int j = 0; j < W; j++) acc[(int64_t)h * W + j] *= shrink;
                total[h] *= shrink;
                peak[h] = top;
            }
            total[h] += exponentiate(w, t, top);
        }
        accumulate(acc, W, weights, TILE, tile, W, t, Hp, W);
    }
    for (int h = 0; h < H; h++) {
        const float inv = 1.0f / total[h];
        float *zh = z + (int64_t)h * HD, *zsh = zs + (int64_t)h * HR;
        for (int j = 0; j < HD; j++) zh[j] = acc[(int64_t)h * W + j] * inv;
        for (int j = 0; j < HR; j++) zsh[j] = acc[(int64_t)h * W + HD + j] * inv;
    }
}

/* All sequences, split across the OpenMP threads torch runs with (built with -fopenmp, this library
 * shares the libgomp torch already loaded, so its threads are torch's own, not a second pool). window: each
 * query sees its own and the window - 1 keys before it (vLLM's sliding window), 0: every key. */
int slim_decode(const void *cache, int dtype, int64_t stride_block, int64_t stride_head, int64_t stride_token,
                const int32_t *block_table, int64_t table_stride, const int32_t *seq_lens,
                const float *q, const float *uncos_sin, int rotary_dim, int neox,
                int batch, int H, int D, int R, int block_size, float scale, int window,
                float *z, float *zs) {
    const int Hp = round_up(H, HT), W = H * (D + R);
    int status = 0;
#pragma omp parallel reduction(| : status)
    {
        /* The padding heads' weights stay zero: their rows of the product add nothing. */
        float *scratch = malloc(sizeof(float) * (D + R));
        float *tile = malloc(sizeof(float) * TILE * W);
        float *weights = calloc((size_t)Hp * TILE, sizeof(float));
        float *acc = malloc(sizeof(float) * Hp * W);
        if (!scratch || !tile || !weights || !acc) status = 1;
#pragma omp for schedule(dynamic, 1)
        for (int b = 0; b < batch; b++) {
            if (status) continue;
            const int n = seq_lens[b] > 0 ? seq_lens[b] : 1; /* padding rows: any finite answer */
            const int first = window > 0 && n > window ? n - window : 0;
            decode_one(cache, dtype, stride_block, stride_head, stride_token, block_table + (int64_t)b * table_stride,
                       first, n, q + (int64_t)b * H * D, uncos_sin, rotary_dim, neox, H, D, R, block_size, scale,
                       scratch, tile, weights, acc, z + (int64_t)b * H * H * D, zs + (int64_t)b * H * H * R);
        }
        free(scratch);
        free(tile);
        free(weights);
        free(acc);
    }
    return status;
}
