/* y (M, N) = x (M, K) @ W^T for float32, with W packed once as (ceil(N / 16), K, 16), zero padded.
 *
 * Decoding multiplies a handful of rows by large weight matrices. Each 16-column tile of W is
 * streamed from memory once and multiplied into up to six rows at a time, all accumulators in
 * AVX2 registers, so a pass over 8 rows reads the weights no more often than a pass over one.
 * Every output element is the same sequence of fused multiply-adds over k whatever M is, so a
 * row's result does not depend on which other rows share the call.
 */
#include <immintrin.h>
#include <string.h>

#define TILE 16
#define ROW_BLOCK 6

static inline __attribute__((always_inline)) void multiply_tile(
    int rows, const float *x, int K, const float *tile, float *out /* (rows, TILE) */) {
    __m256 low[ROW_BLOCK], high[ROW_BLOCK];
    for (int m = 0; m < rows; m++) {
        low[m] = _mm256_setzero_ps();
        high[m] = _mm256_setzero_ps();
    }
    for (int k = 0; k < K; k++) {
        __m256 w_low = _mm256_loadu_ps(tile + TILE * k), w_high = _mm256_loadu_ps(tile + TILE * k + 8);
        for (int m = 0; m < rows; m++) {
            __m256 xb = _mm256_broadcast_ss(x + (long)m * K + k);
            low[m] = _mm256_fmadd_ps(xb, w_low, low[m]);
            high[m] = _mm256_fmadd_ps(xb, w_high, high[m]);
        }
    }
    for (int m = 0; m < rows; m++) {
        _mm256_storeu_ps(out + TILE * m, low[m]);
        _mm256_storeu_ps(out + TILE * m + 8, high[m]);
    }
}

/* The row count as a compile-time constant, so each case keeps its accumulators in registers. */
static void multiply_block(int rows, const float *x, int K, const float *tile, float *out) {
    switch (rows) {
        case 1: multiply_tile(1, x, K, tile, out); break;
        case 2: multiply_tile(2, x, K, tile, out); break;
        case 3: multiply_tile(3, x, K, tile, out); break;
        case 4: multiply_tile(4, x, K, tile, out); break;
        case 5: multiply_tile(5, x, K, tile, out); break;
        default: multiply_tile(ROW_BLOCK, x, K, tile, out); break;
    }
}

void small_gemm(const float *x, int M, int K, const float *packed, int N, float *y, int threads) {
    int tiles = (N + TILE - 1) / TILE;
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int t = 0; t < tiles; t++) {
        const float *tile = packed + (long)t * K * TILE;
        int columns = N - TILE * t < TILE ? N - TILE * t : TILE;
        float out[ROW_BLOCK * TILE];
        for (int first = 0; first < M; first += ROW_BLOCK) {
            int rows = M - first < ROW_BLOCK ? M - first : ROW_BLOCK;
            multiply_block(rows, x + (long)first * K, K, tile, out);
            for (int m = 0; m < rows; m++)
                memcpy(y + (long)(first + m) * N + TILE * t, out + TILE * m, columns * sizeof(float));
        }
    }
}
