/* SATA decode on the CPU, fused: one new token per sequence, its state updated in place and read in
 * the same pass.
 *
 * Per sequence and KV head, the state S [m][dv + 1] = sum_t phi(k_t) [v_t, 1] (float32, in its page):
 * zeroed first when the sequence starts (its page may hold another's), then S[j] += phi(k)[j] * [v, 1]
 * and, while the row is in cache, acc[g] += phi(q_g)[j] * S[j] for the G query heads of the KV head;
 * out = acc[:dv] / acc[dv]. phi(x)[j] = coef[j] * prod_i x~[index[j][i]] with x~ = [x, 1] (the tables
 * of `basis.feature_tables`). What `chunk.chunk_sata_varlen` computes for one token per sequence
 * without a window, read and written once. One OpenMP thread per sequence at a time.
 *
 * Built at first use by `vllm_slim.ops.cpu_build`; no Python or torch headers.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

static void features(const float *x, int d, const int32_t *index, int width, const float *coef, int m, float *xt,
                     float *phi) {
    memcpy(xt, x, sizeof(float) * d);
    xt[d] = 1.0f;
    for (int j = 0; j < m; j++) {
        float f = coef[j];
        for (int i = 0; i < width; i++) f *= xt[index[j * width + i]];
        phi[j] = f;
    }
}

int sata_decode(float *pages, int64_t page_stride, int64_t head_stride, const int64_t *state_indices, const uint8_t *reset,
                const float *q, const float *k, const float *v, const int32_t *index, int width, const float *coef,
                int m, int batch, int kv_heads, int group, int d, int dv, float *out) {
    const int64_t head_floats = (int64_t)m * (dv + 1);
    int status = 0;
#pragma omp parallel reduction(| : status)
    {
        float *xt = malloc(sizeof(float) * (d + 1));
        float *phi_k = malloc(sizeof(float) * m);
        float *phi_q = malloc(sizeof(float) * (int64_t)group * m);
        float *acc = malloc(sizeof(float) * (int64_t)group * (dv + 1));
        float *v1 = malloc(sizeof(float) * (dv + 1));
        if (!xt || !phi_k || !phi_q || !acc || !v1) status = 1;
#pragma omp for schedule(dynamic, 1)
        for (int bh = 0; bh < batch * kv_heads; bh++) {
            if (status) continue;
            const int b = bh / kv_heads, h = bh % kv_heads;
            float *state = pages + state_indices[b] * page_stride + h * head_stride;
            if (reset[b]) memset(state, 0, sizeof(float) * head_floats);
            features(k + ((int64_t)b * kv_heads + h) * d, d, index, width, coef, m, xt, phi_k);
            for (int g = 0; g < group; g++)
                features(q + (((int64_t)b * kv_heads + h) * group + g) * d, d, index, width, coef, m, xt,
                         phi_q + (int64_t)g * m);
            memcpy(v1, v + ((int64_t)b * kv_heads + h) * dv, sizeof(float) * dv);
            v1[dv] = 1.0f;
            memset(acc, 0, sizeof(float) * group * (dv + 1));
            for (int j = 0; j < m; j++) {
                float *row = state + (int64_t)j * (dv + 1);
                const float w = phi_k[j];
                for (int e = 0; e <= dv; e++) row[e] += w * v1[e];
                for (int g = 0; g < group; g++) {
                    const float p = phi_q[(int64_t)g * m + j];
                    float *a = acc + (int64_t)g * (dv + 1);
                    for (int e = 0; e <= dv; e++) a[e] += p * row[e];
                }
            }
            for (int g = 0; g < group; g++) {
                const float *a = acc + (int64_t)g * (dv + 1);
                float *o = out + (((int64_t)b * kv_heads + h) * group + g) * dv;
                for (int e = 0; e < dv; e++) o[e] = a[e] / a[dv];
            }
        }
        free(xt);
        free(phi_k);
        free(phi_q);
        free(acc);
        free(v1);
    }
    return status;
}
