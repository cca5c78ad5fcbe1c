/* Slim decode on the CPU, fused: for each sequence, each cached row is read once from its page,
 * converted to float32 into a tile buffer, and never materialised elsewhere.
 *
 *   a tile of tokens at a time: scores s[h][l] = scale * q_h . k_h,l from the post-RoPE keys, each
 *   row un-rotated once (the RoPE of position l undone for every head), then, on the running
 *   softmax statistics (online softmax), z[h] += w[h][l] * k_raw,l (the whole H*D row) and
 *   zs[h] += w[h][l] * spill_l, as a small register-blocked product per tile.
 *
 * Outputs are normalised: z [B, H, H*D] = sum_l P[h][l] k_raw,l, zs [B, H, H*R] likewise (R spill
 * coordinates per head). What `decode.paged_decode_slim_attention` computes with torch ops, read
 * straight from the pages; one OpenMP thread per sequence at a time.
 *
 * Built at first use by `cpu_kernel.py` with the machine's C compiler; no Python or torch headers.
 */
#include <math.h>
#include <stdint.h>
#if defined(__F16C__)
#include <immintrin.h>
#endif
#include <stdlib.h>
#include <string.h>

enum { F32 = 0, F16 = 1, BF16 = 2 };

static void load_row(const void *src, int dtype, int64_t count, float *dst) {
    if (dtype == F32) {
        memcpy(dst, src, count * sizeof(float));
    } else if (dtype == F16) {
        const _Float16 *s = (const _Float16 *)src;
        int64_t i = 0;
#if defined(__AVX512F__)
        for (; i + 16 <= count; i += 16)
            _mm512_storeu_ps(dst + i, _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(s + i))));
#elif defined(__F16C__)
        for (; i + 8 <= count; i += 8) _mm256_storeu_ps(dst + i, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(s + i))));
#endif
        for (; i < count; i++) dst[i] = (float)s[i];
    } else {
        const uint16_t *s = (const uint16_t *)src;
        for (int64_t i = 0; i < count; i++) {
            uint32_t bits = (uint32_t)s[i] << 16;
            memcpy(&dst[i], &bits, sizeof(float));
        }
    }
}

/* One token's row: every head's C = D + R entries, float32, heads contiguous [H][C]. */
static void load_token(const char *cache, int dtype, int64_t elem, int64_t stride_head, int64_t base,
                       int H, int C, float *row) {
    for (int h = 0; h < H; h++) load_row(cache + (base + h * stride_head) * elem, dtype, C, row + h * C);
}

/* Un-rotate one token's keys (all heads) into out [H*D] and copy its spill after them [H*R]. */
static void raw_row(const float *row, const float *cs, int rotary_dim, int neox, int H, int D, int R, float *out) {
    const int C = D + R, half = rotary_dim / 2;
    for (int h = 0; h < H; h++) {
        const float *k = row + h * C;
        float *o = out + h * D;
        for (int d = rotary_dim; d < D; d++) o[d] = k[d];
        if (neox) {
            for (int i = 0; i < half; i++) {
                const float c = cs[i], s = cs[half + i], x1 = k[i], x2 = k[half + i];
                o[i] = x1 * c + x2 * s;
                o[half + i] = x2 * c - x1 * s;
            }
        } else {
            for (int i = 0; i < half; i++) {
                const float c = cs[i], s = cs[half + i], x1 = k[2 * i], x2 = k[2 * i + 1];
                o[2 * i] = x1 * c + x2 * s;
                o[2 * i + 1] = x2 * c - x1 * s;
            }
        }
    }
    for (int h = 0; h < H; h++)
        for (int r = 0; r < R; r++) out[H * D + h * R + r] = row[h * C + D + r];
}

enum { TILE = 32, JT = 64, HT = 4 };

/* acc [H][W] += w [H][TILE] (first t columns) . tile [t][W]: register blocks of HT heads x JT columns. */
static void accumulate(float *acc, const float *w, const float *tile, int t, int H, int W) {
    for (int j0 = 0; j0 < W; j0 += JT)
        for (int h0 = 0; h0 < H; h0 += HT) {
            if (j0 + JT <= W && h0 + HT <= H) {
                float a[HT][JT];
                for (int hh = 0; hh < HT; hh++)
                    for (int jj = 0; jj < JT; jj++) a[hh][jj] = acc[(int64_t)(h0 + hh) * W + j0 + jj];
                for (int i = 0; i < t; i++) {
                    const float *k = tile + (int64_t)i * W + j0;
                    for (int hh = 0; hh < HT; hh++) {
                        const float x = w[(h0 + hh) * TILE + i];
                        for (int jj = 0; jj < JT; jj++) a[hh][jj] += x * k[jj];
                    }
                }
                for (int hh = 0; hh < HT; hh++)
                    for (int jj = 0; jj < JT; jj++) acc[(int64_t)(h0 + hh) * W + j0 + jj] = a[hh][jj];
            } else {
                const int hn = H - h0 < HT ? H - h0 : HT, jn = W - j0 < JT ? W - j0 : JT;
                for (int i = 0; i < t; i++)
                    for (int hh = 0; hh < hn; hh++) {
                        const float x = w[(h0 + hh) * TILE + i];
                        float *a = acc + (int64_t)(h0 + hh) * W + j0;
                        const float *k = tile + (int64_t)i * W + j0;
                        for (int jj = 0; jj < jn; jj++) a[jj] += x * k[jj];
                    }
            }
        }
}

static int decode_range(const void *cache, int dtype, int64_t stride_block, int64_t stride_head, int64_t stride_token,
                const int32_t *block_table, int64_t table_stride, const int32_t *seq_lens,
                const float *q, const float *cos_sin, int rotary_dim, int neox,
                int first, int end, int H, int D, int R, int block_size, float scale,
                float *z, float *zs) {
    const int C = D + R, HD = H * D, HR = H * R, W = HD + HR;
    const int64_t elem = dtype == F32 ? 4 : 2;
    float *row = malloc(sizeof(float) * H * C);
    float *tile = malloc(sizeof(float) * TILE * W);
    float *weights = malloc(sizeof(float) * H * TILE);
    float *acc = malloc(sizeof(float) * H * W);
    if (!row || !tile || !weights || !acc) {
        free(row);
        free(tile);
        free(weights);
        free(acc);
        return 1;
    }
    for (int b = first; b < end; b++) {
        const int n = seq_lens[b] > 0 ? seq_lens[b] : 1; /* padding rows: any finite answer */
        const float *qb = q + (int64_t)b * HD;
        const int32_t *blocks = block_table + (int64_t)b * table_stride;
        float peak[256], total[256]; /* running max and sum per head, H <= 256 */
        for (int h = 0; h < H; h++) peak[h] = -INFINITY, total[h] = 0.0f;
        memset(acc, 0, sizeof(float) * H * W);
        /* One pass, a tile of tokens at a time (online softmax): each row is read once. */
        for (int l0 = 0; l0 < n; l0 += TILE) {
            const int t = n - l0 < TILE ? n - l0 : TILE;
            for (int i = 0; i < t; i++) {
                const int l = l0 + i;
                const int64_t base = (int64_t)blocks[l / block_size] * stride_block + (int64_t)(l % block_size) * stride_token;
                load_token(cache, dtype, elem, stride_head, base, H, C, row);
                for (int h = 0; h < H; h++) {
                    float s = 0.0f;
                    for (int d = 0; d < D; d++) s += qb[h * D + d] * row[h * C + d];
                    weights[h * TILE + i] = s * scale;
                }
                raw_row(row, cos_sin + (int64_t)l * rotary_dim, rotary_dim, neox, H, D, R, tile + (int64_t)i * W);
            }
            for (int h = 0; h < H; h++) {
                float top = peak[h];
                for (int i = 0; i < t; i++) top = weights[h * TILE + i] > top ? weights[h * TILE + i] : top;
                if (top > peak[h]) { /* a larger max: what was summed so far shrinks by exp(old - new) */
                    const float shrink = expf(peak[h] - top);
                    for (int j = 0; j < W; j++) acc[(int64_t)h * W + j] *= shrink;
                    total[h] *= shrink;
                    peak[h] = top;
                }
                for (int i = 0; i < t; i++) {
                    const float w = expf(weights[h * TILE + i] - top);
                    weights[h * TILE + i] = w;
                    total[h] += w;
                }
            }
            accumulate(acc, weights, tile, t, H, W);
        }
        for (int h = 0; h < H; h++) {
            const float inv = 1.0f / total[h];
            float *zh = z + ((int64_t)b * H + h) * HD, *zsh = zs + ((int64_t)b * H + h) * HR;
            for (int j = 0; j < HD; j++) zh[j] = acc[(int64_t)h * W + j] * inv;
            for (int j = 0; j < HR; j++) zsh[j] = acc[(int64_t)h * W + HD + j] * inv;
        }
    }
    free(row);
    free(tile);
    free(weights);
    free(acc);
    return 0;
}

/* All sequences, split across the OpenMP threads torch runs with (built with -fopenmp, this library
 * shares the libgomp torch already loaded, so its threads are torch's own, not a second pool). */
int slim_decode(const void *cache, int dtype, int64_t stride_block, int64_t stride_head, int64_t stride_token,
                const int32_t *block_table, int64_t table_stride, const int32_t *seq_lens,
                const float *q, const float *cos_sin, int rotary_dim, int neox,
                int batch, int H, int D, int R, int block_size, float scale,
                float *z, float *zs) {
    int status = 0;
#pragma omp parallel for schedule(dynamic, 1) reduction(| : status)
    for (int b = 0; b < batch; b++)
        status |= decode_range(cache, dtype, stride_block, stride_head, stride_token, block_table, table_stride,
                               seq_lens, q, cos_sin, rotary_dim, neox, b, b + 1, H, D, R, block_size, scale, z, zs);
    return status;
}
