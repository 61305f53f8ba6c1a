/* Float32 kernels for decoding on x86 CPUs with AVX2 (built by cpu_kernels.py).
 *
 * small_gemm: y (M, N) = x (M, K) @ W^T, with W packed once as (ceil(N / 16), K, 16), zero padded.
 * Decoding multiplies a handful of rows by large weight matrices. Each 16-column tile of W is
 * streamed from memory once and multiplied into up to six rows at a time, all accumulators in
 * AVX2 registers, so a pass over 8 rows reads the weights no more often than a pass over one.
 * With three or more rows the multiply-adds take as long as the memory reads, and the two did not
 * overlap (the hardware prefetcher fell behind), so the kernel prefetches the next tile while it
 * multiplies this one: body of SmolLM2-135M on the 2-core AMD EPYC, 8 rows 26.6 -> 22.0 ms,
 * 12 rows 29.7 -> 23.9, 16 rows 36.4 -> 30.6 (one or two rows, memory-bound, are faster without).
 * Every output element is the same sequence of fused multiply-adds over k whatever M is, so a
 * row's result does not depend on which other rows share the call. Where the CPU has AVX-512 a wider
 * variant (below) takes up to 16 rows per read of the weights, with the same bits.
 */
#include <immintrin.h>
#include <math.h>
#include <string.h>

#define TILE 16
#define ROW_BLOCK 6

static inline __attribute__((always_inline)) void multiply_tile(
    int rows, const float *x, int K, const float *tile, float *out /* (rows, TILE) */) {
    const float *next = tile + (long)TILE * K;  /* the next tile; a prefetch past the end never faults */
    __m256 low[ROW_BLOCK], high[ROW_BLOCK];
    for (int m = 0; m < rows; m++) {
        low[m] = _mm256_setzero_ps();
        high[m] = _mm256_setzero_ps();
    }
    for (int k = 0; k < K; k++) {
        if (rows > 2) _mm_prefetch((const char *)(next + TILE * k), _MM_HINT_T0);
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

/* The AVX-512 variant, for CPUs that have it (recent Intel Xeons among this project's machines): a
 * 16-column tile is one 512-bit register per row, so up to 16 rows share one read of each tile with
 * every accumulator in a register. Each output is still one fused multiply-add per k, in k order, from
 * zero: the same bits as the AVX2 path. */
#define ROW_BLOCK_512 16

static inline __attribute__((always_inline, target("avx512f"))) void multiply_tile_512(
    int rows, const float *x, int K, const float *tile, float *out, int prefetch) {
    const float *next = tile + (long)TILE * K;
    __m512 acc[ROW_BLOCK_512];
    for (int m = 0; m < rows; m++) acc[m] = _mm512_setzero_ps();
    for (int k = 0; k < K; k++) {
        if (prefetch) _mm_prefetch((const char *)(next + TILE * k), _MM_HINT_T0);
        __m512 w = _mm512_loadu_ps(tile + TILE * k);
        for (int m = 0; m < rows; m++)
            acc[m] = _mm512_fmadd_ps(_mm512_set1_ps(x[(long)m * K + k]), w, acc[m]);
    }
    for (int m = 0; m < rows; m++) _mm512_storeu_ps(out + TILE * m, acc[m]);
}

/* Prefetching the next tile pays here at every row count (body of SmolLM2-135M on a 2-core Intel
 * Xeon with AVX-512, medians of 10: 2 rows 25.6 ms with it, 31.7 without; 8 rows 25.0 vs 42.2). */
#define CASE_512(n) case n: multiply_tile_512(n, x, K, tile, out, 1); break;

static __attribute__((target("avx512f"))) void multiply_block_512(int rows, const float *x, int K, const float *tile, float *out) {
    switch (rows) {
        CASE_512(1) CASE_512(2) CASE_512(3) CASE_512(4) CASE_512(5) CASE_512(6) CASE_512(7) CASE_512(8)
        CASE_512(9) CASE_512(10) CASE_512(11) CASE_512(12) CASE_512(13) CASE_512(14) CASE_512(15)
        default: multiply_tile_512(ROW_BLOCK_512, x, K, tile, out, 1); break;
    }
}

typedef void (*block_function)(int rows, const float *x, int K, const float *tile, float *out);

static void gemm(const float *x, int M, int K, const float *packed, int N, float *y, int threads, int wide) {
    int tiles = (N + TILE - 1) / TILE;
    block_function multiply = wide ? multiply_block_512 : multiply_block;
    int row_block = wide ? ROW_BLOCK_512 : ROW_BLOCK;
    /* Static halves: each thread streams one contiguous run of tiles, which keeps the hardware
     * prefetchers busy. (A work-stealing pool of pthreads was measured too: 20x better than OpenMP
     * while another process kept both cores busy, 10-15 % slower on a quiet machine, so not kept.) */
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int t = 0; t < tiles; t++) {
        const float *tile = packed + (long)t * K * TILE;
        int columns = N - TILE * t < TILE ? N - TILE * t : TILE;
        float out[ROW_BLOCK_512 * TILE];
        /* Blocks of nearly equal size (8 rows: 4 + 4, not 6 + 2), so none is too small to hide the
         * latency of its multiply-adds. */
        int blocks = (M + row_block - 1) / row_block;
        for (int block = 0, first = 0; block < blocks; block++) {
            int rows = (M - first + blocks - block - 1) / (blocks - block);
            multiply(rows, x + (long)first * K, K, tile, out);
            for (int m = 0; m < rows; m++)
                memcpy(y + (long)(first + m) * N + TILE * t, out + TILE * m, columns * sizeof(float));
            first += rows;
        }
    }
}

void small_gemm(const float *x, int M, int K, const float *packed, int N, float *y, int threads) {
    gemm(x, M, K, packed, N, y, threads, __builtin_cpu_supports("avx512f"));
}

/* The AVX2 path on any CPU: lets the tests check that both paths give the same bits. */
void small_gemm_avx2(const float *x, int M, int K, const float *packed, int N, float *y, int threads) {
    gemm(x, M, K, packed, N, y, threads, 0);
}

/* The row-wise steps between the matmuls, one call each instead of five to eight small torch ops
 * (each op costs a few microseconds of dispatch, and a layer had about sixty). Rows are independent,
 * so these too give a row the same bits whatever else is in the call. */

static float horizontal_sum(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
    return _mm_cvtss_f32(s);
}

/* y = x / rms(x) * weight per row of d (d a multiple of 8). */
void rms_norm(const float *x, const float *weight, float *y, int rows, int d, float eps) {
    for (int r = 0; r < rows; r++) {
        const float *xr = x + (long)r * d;
        float *yr = y + (long)r * d;
        __m256 squares = _mm256_setzero_ps();
        for (int i = 0; i < d; i += 8) {
            __m256 v = _mm256_loadu_ps(xr + i);
            squares = _mm256_fmadd_ps(v, v, squares);
        }
        __m256 scale = _mm256_set1_ps(1.0f / sqrtf(horizontal_sum(squares) / d + eps));
        for (int i = 0; i < d; i += 8)
            _mm256_storeu_ps(yr + i, _mm256_mul_ps(_mm256_loadu_ps(weight + i), _mm256_mul_ps(_mm256_loadu_ps(xr + i), scale)));
    }
}

/* Rotary embedding in place on the first `heads` heads of each row (the queries and keys of a fused
 * q/k/v row, `row_stride` floats apart): x * cos + rotate_half(x) * sin, rotate_half(x) = (-x2, x1).
 * cos and sin are (period, head_dim), row r using row r % period (a batch of sequences shares them);
 * head_dim / 2 a multiple of 8. */
void rotary(float *qkv, int rows, int row_stride, int heads, int head_dim, const float *cos, const float *sin, int period) {
    int half = head_dim / 2;
    for (int r = 0; r < rows; r++) {
        const float *c = cos + (long)(r % period) * head_dim, *s = sin + (long)(r % period) * head_dim;
        for (int h = 0; h < heads; h++) {
            float *x = qkv + (long)r * row_stride + (long)h * head_dim;
            for (int i = 0; i < half; i += 8) {
                __m256 low = _mm256_loadu_ps(x + i), high = _mm256_loadu_ps(x + half + i);
                __m256 new_low = _mm256_fnmadd_ps(high, _mm256_loadu_ps(s + i), _mm256_mul_ps(low, _mm256_loadu_ps(c + i)));
                __m256 new_high = _mm256_fmadd_ps(low, _mm256_loadu_ps(s + half + i), _mm256_mul_ps(high, _mm256_loadu_ps(c + half + i)));
                _mm256_storeu_ps(x + i, new_low);
                _mm256_storeu_ps(x + half + i, new_high);
            }
        }
    }
}
