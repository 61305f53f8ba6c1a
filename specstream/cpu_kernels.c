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

/* Weights come as float32 or as bfloat16 (the upper half of a float32: widening is a shift), the
 * latter for heads whose logits only rank drafts or screen candidates (see head_argmax). */
static inline __attribute__((always_inline)) __m256 load8(const void *tile, long at, int bf16) {
    if (!bf16) return _mm256_loadu_ps((const float *)tile + at);
    __m128i half = _mm_loadu_si128((const __m128i *)((const unsigned short *)tile + at));
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(half), 16));
}

static inline __attribute__((always_inline)) void multiply_tile(
    int rows, const float *x, int K, const void *tile, float *out /* (rows, TILE) */, int bf16) {
    /* the next tile; a prefetch past the end never faults */
    const char *next = (const char *)tile + (long)TILE * K * (bf16 ? 2 : 4);
    __m256 low[ROW_BLOCK], high[ROW_BLOCK];
    for (int m = 0; m < rows; m++) {
        low[m] = _mm256_setzero_ps();
        high[m] = _mm256_setzero_ps();
    }
    for (int k = 0; k < K; k++) {
        if (rows > 2) _mm_prefetch(next + (long)TILE * k * (bf16 ? 2 : 4), _MM_HINT_T0);
        __m256 w_low = load8(tile, (long)TILE * k, bf16), w_high = load8(tile, (long)TILE * k + 8, bf16);
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

/* The row count (and weight type) as compile-time constants, so each case keeps its accumulators in
 * registers. */
#define CASE_256(n, bf16) case n: multiply_tile(n, x, K, tile, out, bf16); break;
#define BLOCK_256(name, bf16)                                                                 \
    static void name(int rows, const float *x, int K, const void *tile, float *out) {       \
        switch (rows) {                                                                     \
            CASE_256(1, bf16) CASE_256(2, bf16) CASE_256(3, bf16) CASE_256(4, bf16) CASE_256(5, bf16) \
            default: multiply_tile(ROW_BLOCK, x, K, tile, out, bf16); break;                \
        }                                                                                   \
    }
BLOCK_256(multiply_block, 0)
BLOCK_256(multiply_block_bf16, 1)

/* The AVX-512 variant, for CPUs that have it (recent Intel Xeons among this project's machines): a
 * 16-column tile is one 512-bit register per row, so up to 16 rows share one read of each tile with
 * every accumulator in a register. Each output is still one fused multiply-add per k, in k order, from
 * zero: the same bits as the AVX2 path. */
#define ROW_BLOCK_512 16

static inline __attribute__((always_inline, target("avx512f"))) __m512 load16(const void *tile, long at, int bf16) {
    if (!bf16) return _mm512_loadu_ps((const float *)tile + at);
    __m256i half = _mm256_loadu_si256((const __m256i *)((const unsigned short *)tile + at));
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(half), 16));
}

static inline __attribute__((always_inline, target("avx512f"))) void multiply_tile_512(
    int rows, const float *x, int K, const void *tile, float *out, int bf16) {
    const char *next = (const char *)tile + (long)TILE * K * (bf16 ? 2 : 4);
    __m512 acc[ROW_BLOCK_512];
    for (int m = 0; m < rows; m++) acc[m] = _mm512_setzero_ps();
    for (int k = 0; k < K; k++) {
        _mm_prefetch(next + (long)TILE * k * (bf16 ? 2 : 4), _MM_HINT_T0);
        __m512 w = load16(tile, (long)TILE * k, bf16);
        for (int m = 0; m < rows; m++)
            acc[m] = _mm512_fmadd_ps(_mm512_set1_ps(x[(long)m * K + k]), w, acc[m]);
    }
    for (int m = 0; m < rows; m++) _mm512_storeu_ps(out + TILE * m, acc[m]);
}

/* Prefetching the next tile pays here at every row count (body of SmolLM2-135M on a 2-core Intel
 * Xeon with AVX-512, medians of 10: 2 rows 25.6 ms with it, 31.7 without; 8 rows 25.0 vs 42.2). */
#define CASE_512(n, bf16) case n: multiply_tile_512(n, x, K, tile, out, bf16); break;
#define BLOCK_512(name, bf16)                                                                                      \
    static __attribute__((target("avx512f"))) void name(int rows, const float *x, int K, const void *tile, float *out) { \
        switch (rows) {                                                                                          \
            CASE_512(1, bf16) CASE_512(2, bf16) CASE_512(3, bf16) CASE_512(4, bf16) CASE_512(5, bf16)            \
            CASE_512(6, bf16) CASE_512(7, bf16) CASE_512(8, bf16) CASE_512(9, bf16) CASE_512(10, bf16)           \
            CASE_512(11, bf16) CASE_512(12, bf16) CASE_512(13, bf16) CASE_512(14, bf16) CASE_512(15, bf16)       \
            default: multiply_tile_512(ROW_BLOCK_512, x, K, tile, out, bf16); break;                             \
        }                                                                                                        \
    }
BLOCK_512(multiply_block_512, 0)
BLOCK_512(multiply_block_512_bf16, 1)

typedef void (*block_function)(int rows, const float *x, int K, const void *tile, float *out);

static void gemm(const float *x, int M, int K, const void *packed, int N, float *y, int threads, int wide, int bf16) {
    int tiles = (N + TILE - 1) / TILE;
    block_function multiply = wide ? (bf16 ? multiply_block_512_bf16 : multiply_block_512)
                                   : (bf16 ? multiply_block_bf16 : multiply_block);
    int row_block = wide ? ROW_BLOCK_512 : ROW_BLOCK;
    long tile_bytes = (long)K * TILE * (bf16 ? 2 : 4);
    /* Static halves: each thread streams one contiguous run of tiles, which keeps the hardware
     * prefetchers busy. (A work-stealing pool of pthreads was measured too: 20x better than OpenMP
     * while another process kept both cores busy, 10-15 % slower on a quiet machine, so not kept.) */
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int t = 0; t < tiles; t++) {
        const char *tile = (const char *)packed + t * tile_bytes;
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
    gemm(x, M, K, packed, N, y, threads, __builtin_cpu_supports("avx512f"), 0);
}

/* The AVX2 path on any CPU: lets the tests check that both paths give the same bits. */
void small_gemm_avx2(const float *x, int M, int K, const float *packed, int N, float *y, int threads) {
    gemm(x, M, K, packed, N, y, threads, 0, 0);
}

/* The same with bfloat16 weights (packed the same way, 2 bytes each): half the memory to read. */
void small_gemm_bf16(const float *x, int M, int K, const unsigned short *packed, int N, float *y, int threads) {
    gemm(x, M, K, packed, N, y, threads, __builtin_cpu_supports("avx512f"), 1);
}

/* Greedy decoding's argmax over the LM head, exactly as over the float32 logits of small_gemm, reading
 * half the memory. A one-row pass spends ~5 ms of ~35 reading SmolLM2's 49152 x 576 float32 head.
 *
 * approx (M, N) are the logits against the bfloat16 head. For row x and column i, approx differs from
 * the float32 kernel's logit by at most |x| * slack[i], where slack[i] = |w_i - bf16(w_i)| plus twice
 * the worst float32 rounding of a K-term dot product (|x| |w_i| K 2^-24 / (1 - K 2^-24), each way),
 * with margin (Cauchy-Schwarz; see cpu_kernels.py). So the true best column is among those whose
 * approx + bound reaches the highest approx - bound; those few are recomputed with the float32 kernel's
 * own sequence of fused multiply-adds (fmaf over k from zero: the bits of its vector lanes), and the
 * best wins, the lowest index on a tie, as torch.argmax. `weights` (N, K) float32, row-major.
 * Writes the winning column and the number of candidates recomputed, per row. */
void head_argmax(const float *x, int M, int K, const float *approx, int N, const float *slack,
                 const float *weights, long *best, int *candidates, int threads) {
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int m = 0; m < M; m++) {
        const float *xm = x + (long)m * K, *am = approx + (long)m * N;
        double norm = 0;
        for (int k = 0; k < K; k++) norm += (double)xm[k] * xm[k];
        float scale = (float)(sqrt(norm) * 1.0001);
        float floor_value = -INFINITY;
        for (int i = 0; i < N; i++) {
            float low = am[i] - scale * slack[i];
            if (low > floor_value) floor_value = low;
        }
        float top = -INFINITY;
        long winner = -1;
        int count = 0;
        for (int i = 0; i < N; i++) {
            if (!(am[i] + scale * slack[i] >= floor_value)) continue;
            const float *w = weights + (long)i * K;
            float exact = 0.0f;
            for (int k = 0; k < K; k++) exact = fmaf(xm[k], w[k], exact);
            count++;
            if (winner < 0 || exact > top) {
                top = exact;
                winner = i;
            }
        }
        best[m] = winner;
        candidates[m] = count;
    }
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
