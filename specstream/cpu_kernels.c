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
#include <omp.h>
#include <stdlib.h>
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
    static void name(int rows, const void *rows_x, int K, const void *tile, float *out) {   \
        const float *x = rows_x;                                                            \
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
    static __attribute__((target("avx512f"))) void name(int rows, const void *rows_x, int K, const void *tile, float *out) { \
        const float *x = rows_x;                                                                                 \
        switch (rows) {                                                                                          \
            CASE_512(1, bf16) CASE_512(2, bf16) CASE_512(3, bf16) CASE_512(4, bf16) CASE_512(5, bf16)            \
            CASE_512(6, bf16) CASE_512(7, bf16) CASE_512(8, bf16) CASE_512(9, bf16) CASE_512(10, bf16)           \
            CASE_512(11, bf16) CASE_512(12, bf16) CASE_512(13, bf16) CASE_512(14, bf16) CASE_512(15, bf16)       \
            default: multiply_tile_512(ROW_BLOCK_512, x, K, tile, out, bf16); break;                             \
        }                                                                                                        \
    }
BLOCK_512(multiply_block_512, 0)
BLOCK_512(multiply_block_512_bf16, 1)

/* Two adjacent tiles per read of x: each broadcast of x feeds two multiply-adds. With many rows the
 * single-tile loop is bound by its loads (one broadcast per row and k for one multiply-add), not by
 * memory: 16 rows took 28 ms for the body where one row takes 21 (2-core Xeon). Up to 12 rows (24
 * accumulators) a block. Same bits: each output is still one fused multiply-add per k, in order. */
#define ROW_BLOCK_PAIR 12

static inline __attribute__((always_inline, target("avx512f"))) void multiply_pair_512(
    int rows, const float *x, int K, const float *tile, float *out /* (rows, 2 * TILE) */) {
    const float *second = tile + (long)TILE * K, *next = tile + 2L * TILE * K;
    __m512 low[ROW_BLOCK_PAIR], high[ROW_BLOCK_PAIR];
    for (int m = 0; m < rows; m++) low[m] = high[m] = _mm512_setzero_ps();
    for (int k = 0; k < K; k++) {
        _mm_prefetch((const char *)(next + TILE * k), _MM_HINT_T0);
        _mm_prefetch((const char *)(next + (long)TILE * K + TILE * k), _MM_HINT_T0);
        __m512 w_low = _mm512_loadu_ps(tile + TILE * k), w_high = _mm512_loadu_ps(second + TILE * k);
        for (int m = 0; m < rows; m++) {
            __m512 xb = _mm512_set1_ps(x[(long)m * K + k]);
            low[m] = _mm512_fmadd_ps(xb, w_low, low[m]);
            high[m] = _mm512_fmadd_ps(xb, w_high, high[m]);
        }
    }
    for (int m = 0; m < rows; m++) {
        _mm512_storeu_ps(out + 2 * TILE * m, low[m]);
        _mm512_storeu_ps(out + 2 * TILE * m + TILE, high[m]);
    }
}

/* x: the block's rows, float32 (or bfloat16 for the dot products below). */
typedef void (*block_function)(int rows, const void *x, int K, const void *tile, float *out);

/* All M rows against one tile (or pair of tiles), in blocks of nearly equal size (8 rows: 4 + 4, not
 * 6 + 2), so none is too small to hide the latency of its multiply-adds; each block's products,
 * `width` floats a row in `out`, go to `columns` columns of y from `first_column`. */
static inline void multiply_rows(block_function multiply, int row_block, int width, const void *x, int x_bytes, int M,
                                 int K, const void *tile, float *out, float *y, int N, int first_column, int columns) {
    int blocks = (M + row_block - 1) / row_block;
    for (int block = 0, first = 0; block < blocks; block++) {
        int rows = (M - first + blocks - block - 1) / (blocks - block);
        multiply(rows, (const char *)x + (long)first * K * x_bytes, K, tile, out);
        for (int m = 0; m < rows; m++)
            memcpy(y + (long)(first + m) * N + first_column, out + width * m, columns * sizeof(float));
        first += rows;
    }
}

#define CASE_PAIR(n) case n: multiply_pair_512(n, x, K, tile, out); break;
static __attribute__((target("avx512f"))) void multiply_pair_block(int rows, const void *rows_x, int K, const void *pair, float *out) {
    const float *x = rows_x, *tile = pair;
    switch (rows) {
        CASE_PAIR(1) CASE_PAIR(2) CASE_PAIR(3) CASE_PAIR(4) CASE_PAIR(5) CASE_PAIR(6) CASE_PAIR(7) CASE_PAIR(8)
        CASE_PAIR(9) CASE_PAIR(10) CASE_PAIR(11)
        default: multiply_pair_512(ROW_BLOCK_PAIR, x, K, tile, out); break;
    }
}

static __attribute__((target("avx512f"))) void gemm_pairs(const float *x, int M, int K, const float *packed, int N, float *y, int threads) {
    int tiles = (N + TILE - 1) / TILE, pairs = tiles / 2;
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int t = 0; t < pairs + tiles % 2; t++) {
        const float *tile = packed + 2L * t * K * TILE;
        int columns = N - 2 * TILE * t < 2 * TILE ? N - 2 * TILE * t : 2 * TILE;
        float out[ROW_BLOCK_512 * 2 * TILE];
        if (t == pairs)  /* an odd last tile */
            multiply_rows(multiply_block_512, ROW_BLOCK_512, TILE, x, sizeof(float), M, K, tile, out, y, N, 2 * TILE * t, columns);
        else
            multiply_rows(multiply_pair_block, ROW_BLOCK_PAIR, 2 * TILE, x, sizeof(float), M, K, tile, out, y, N, 2 * TILE * t, columns);
    }
}

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
        multiply_rows(multiply, row_block, TILE, x, sizeof(float), M, K, tile, out, y, N, TILE * t, columns);
    }
}

/* Paired tiles measured faster at every row count but 13 to 16, which one 16-row block of one tile
 * takes in a single read (body of SmolLM2-135M, 2-core Xeon, medians of 10, single tile / pairs:
 * 1 row 25.8 / 23.7 ms, 8 rows 27.9 / 25.9, 12 rows 28.4 / 25.6, 16 rows 26.9 / 28.9, 17 rows
 * 35.7 / 31.3, 24 rows 38.7 / 34.0). Not on AMD's Zen 4, which splits each 512-bit multiply-add in two:
 * there the single tile's broadcast per multiply-add costs more than a second block (the 24 layers below
 * the streams, 2-core EPYC, two rounds of medians of 11, single tile / pairs: 13 rows 17.7-18.3 /
 * 16.1-16.6 ms, 14 rows 17.8-19.6 / 16.2-17.1, 16 rows 18.4-21.4 / 17.4-18.4). Same bits either way. */
void small_gemm(const float *x, int M, int K, const float *packed, int N, float *y, int threads) {
    if (!__builtin_cpu_supports("avx512f")) gemm(x, M, K, packed, N, y, threads, 0, 0);
    else if (M > ROW_BLOCK_PAIR && M <= ROW_BLOCK_512 && !__builtin_cpu_is("amd")) gemm(x, M, K, packed, N, y, threads, 1, 0);
    else gemm_pairs(x, M, K, packed, N, y, threads);
}

/* The AVX2 path on any CPU: lets the tests check that both paths give the same bits. */
void small_gemm_avx2(const float *x, int M, int K, const float *packed, int N, float *y, int threads) {
    gemm(x, M, K, packed, N, y, threads, 0, 0);
}

/* The same with bfloat16 weights (packed the same way, 2 bytes each): half the memory to read. */
void small_gemm_bf16(const float *x, int M, int K, const unsigned short *packed, int N, float *y, int threads) {
    gemm(x, M, K, packed, N, y, threads, __builtin_cpu_supports("avx512f"), 1);
}

/* y (M, N) += (x (M, K) @ down^T) @ up^T for a low-rank pair packed as small_gemm takes them (down
 * (rank, K), up (N, rank); with bf16 as small_gemm_bf16 takes them): a stream row's correction in one
 * call instead of two products and an add, which cost 60 us a call in torch around 20 us of
 * arithmetic, 24 calls a pass. */
void lora_add(const float *x, int M, int K, const void *down, int rank, const void *up, int N, float *y, int threads,
              int bf16) {
    float *low = malloc(sizeof(float) * M * rank), *high = malloc(sizeof(float) * M * N);
    if (bf16) {
        small_gemm_bf16(x, M, K, down, rank, low, threads);
        small_gemm_bf16(low, M, rank, up, N, high, threads);
    } else {
        small_gemm(x, M, K, down, rank, low, threads);
        small_gemm(low, M, rank, up, N, high, threads);
    }
    for (long i = 0; i < (long)M * N; i++) y[i] += high[i];
    free(low);
    free(high);
}

/* The screen of head_argmax on CPUs with AMX (Intel Xeons since Sapphire Rapids; the 2-core Xeons
 * here have it): the rows rounded to bfloat16 too, and one tile instruction multiplies up to 16 rows
 * by 32 k of a 16-column tile. The widening screen above is compute-bound beyond a few rows (8 rows
 * 4.5 ms against 2.0 for one, 2-core Xeon; AVX512-BF16's dot instruction was no faster there, but is on a
 * Zen 4 EPYC, which has no AMX: bf16_dot_gemm below), and a tree
 * pass verifies every node's row. `rows` (M, K) bfloat16, K a multiple of 32; the weights packed as
 * (ceil(N / 16), K / 2, 16, 2): for each 16-column tile, k in pairs, the layout tiles multiply. */
#include <stdint.h>
#include <sys/syscall.h>
#include <unistd.h>

typedef struct {
    uint8_t palette, start_row, reserved[14];
    uint16_t bytes_per_row[16];
    uint8_t rows[16];
} tile_config;

/* Linux hands out the tile registers' state only on request, once per process. */
int amx_ready(void) {
    if (!__builtin_cpu_supports("amx-bf16")) return 0;
    return syscall(SYS_arch_prctl, 0x1023 /* ARCH_REQ_XCOMP_PERM */, 18 /* XFEATURE_XTILEDATA */) == 0;
}

/* Tile 0: M rows of 16 products (float32 or int32); tile 1: M rows of 64 bytes (32 bfloat16 or 64 int8
 * of k); tile 2: 16 rows of 64 bytes (pairs or quads of k for 16 columns), as both dot products take them. */
static __attribute__((target("amx-tile"))) void configure_tiles(int M) {
    tile_config config = {0};
    config.palette = 1;
    config.rows[0] = M, config.bytes_per_row[0] = 64;
    config.rows[1] = M, config.bytes_per_row[1] = 64;
    config.rows[2] = 16, config.bytes_per_row[2] = 64;
    _tile_loadconfig(&config);
}

static __attribute__((target("amx-tile,amx-bf16"))) void amx_block(
    const unsigned short *rows, int M, int K, const unsigned short *packed, int first_tile, int last_tile, int N,
    float *y) {
    configure_tiles(M);
    float out[16 * TILE];
    for (int t = first_tile; t < last_tile; t++) {
        const unsigned short *tile = packed + (long)t * K * TILE;
        _tile_zero(0);
        for (int k = 0; k < K; k += 32) {
            _tile_loadd(1, rows + k, K * 2);
            _tile_loadd(2, tile + (long)k * TILE, 64);
            _tile_dpbf16ps(0, 1, 2);
        }
        _tile_stored(0, out, 64);
        int columns = N - TILE * t < TILE ? N - TILE * t : TILE;
        for (int m = 0; m < M; m++) memcpy(y + (long)m * N + TILE * t, out + TILE * m, columns * sizeof(float));
    }
    _tile_release();
}

void amx_gemm(const unsigned short *rows, int M, int K, const unsigned short *packed, int N, float *y, int threads) {
    int tiles = (N + TILE - 1) / TILE;
#pragma omp parallel num_threads(threads)
    {
        int count = omp_get_num_threads(), me = omp_get_thread_num();
        int first = (int)((long)tiles * me / count), last = (int)((long)tiles * (me + 1) / count);
        for (int row = 0; row < M; row += 16)
            amx_block(rows + (long)row * K, M - row < 16 ? M - row : 16, K, packed, first, last, N, y + (long)row * N);
    }
}

/* The same product without AMX, where the CPU has AVX512-BF16 (AMD Zen 4): `vdpbf16ps` multiplies pairs
 * of bfloat16 into float32 accumulators, exactly as a tile does (products of bfloat16 are exact in float32,
 * denormals flushed), in the tiles' packed layout, up to 12 rows a block and two 16-column tiles per
 * broadcast of a row's pair. The widening screen (bfloat16 weights shifted to float32, one multiply-add
 * per row and k) made a tree's rows compute-bound: this does two k per instruction with no widening. The
 * head's screen (49152 x 576) on a 2-core AMD EPYC (Zen 4), widening / dot, medians of 15: 1 row 2.40 / 2.25 ms,
 * 8 rows 2.66 / 2.62, 12 rows 3.57 / 2.73, 16 rows 5.34 / 3.89, 32 rows 10.52 / 5.76. */
#define DOT_ROWS 12

static inline __attribute__((always_inline, target("avx512f,avx512bf16"))) void dot_tiles(
    int rows, int pairs, const unsigned short *x, int K, const unsigned short *tile, float *out /* (rows, pairs * TILE) */) {
    const unsigned short *second = tile + (long)TILE * K, *next = tile + (long)pairs * TILE * K;
    __m512 low[DOT_ROWS], high[DOT_ROWS];
    for (int m = 0; m < rows; m++) low[m] = high[m] = _mm512_setzero_ps();
    for (int k = 0; k < K; k += 2) {
        _mm_prefetch((const char *)(next + TILE * k), _MM_HINT_T0);
        __m512bh w_low = (__m512bh)_mm512_loadu_si512(tile + TILE * k), w_high;
        if (pairs == 2) {
            _mm_prefetch((const char *)(next + (long)TILE * K + TILE * k), _MM_HINT_T0);
            w_high = (__m512bh)_mm512_loadu_si512(second + TILE * k);
        }
        for (int m = 0; m < rows; m++) {
            __m512bh xb = (__m512bh)_mm512_set1_epi32(*(const int *)(x + (long)m * K + k));
            low[m] = _mm512_dpbf16_ps(low[m], xb, w_low);
            if (pairs == 2) high[m] = _mm512_dpbf16_ps(high[m], xb, w_high);
        }
    }
    for (int m = 0; m < rows; m++) {
        _mm512_storeu_ps(out + pairs * TILE * m, low[m]);
        if (pairs == 2) _mm512_storeu_ps(out + pairs * TILE * m + TILE, high[m]);
    }
}

#define CASE_DOT(n, pairs) case n: dot_tiles(n, pairs, x, K, tile, out); break;
#define DOT_BLOCK(name, pairs)                                                                                      \
    static __attribute__((target("avx512f,avx512bf16"))) void name(int rows, const void *rows_x, int K,            \
                                                                   const void *tiles, float *out) {                 \
        const unsigned short *x = rows_x, *tile = tiles;                                                            \
        switch (rows) {                                                                                             \
            CASE_DOT(1, pairs) CASE_DOT(2, pairs) CASE_DOT(3, pairs) CASE_DOT(4, pairs) CASE_DOT(5, pairs)          \
            CASE_DOT(6, pairs) CASE_DOT(7, pairs) CASE_DOT(8, pairs) CASE_DOT(9, pairs) CASE_DOT(10, pairs)         \
            CASE_DOT(11, pairs)                                                                                     \
            default: dot_tiles(DOT_ROWS, pairs, x, K, tile, out); break;                                            \
        }                                                                                                           \
    }
DOT_BLOCK(dot_block_one, 1)
DOT_BLOCK(dot_block_pair, 2)

int bf16_dot_ready(void) { return __builtin_cpu_supports("avx512bf16"); }

/* rows (M, K) and packed as amx_gemm takes them; K even. */
void bf16_dot_gemm(const unsigned short *rows, int M, int K, const unsigned short *packed, int N, float *y, int threads) {
    int tiles = (N + TILE - 1) / TILE, pairs = (tiles + 1) / 2;
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int p = 0; p < pairs; p++) {
        int width = 2 * p + 1 < tiles ? 2 : 1, first_column = 2 * TILE * p;
        int columns = N - first_column < width * TILE ? N - first_column : width * TILE;
        float out[DOT_ROWS * 2 * TILE];
        multiply_rows(width == 2 ? dot_block_pair : dot_block_one, DOT_ROWS, width * TILE, rows, sizeof(unsigned short),
                      M, K, packed + (long)2 * p * K * TILE, out, y, N, first_column, columns);
    }
}

/* The same in int8 (AMX's dpbssd): rows (M, K) and weights as int8, a scale per row and per column,
 * the weights packed as (ceil(N / 16), K / 4, 16, 4); K a multiple of 64. A quarter of float32's bytes,
 * for the streams' draft head, whose logits only rank drafts: read every pass, 16k rows took 1.1 ms
 * as bfloat16. */
static __attribute__((target("amx-tile,amx-int8"))) void amx_int8_block(
    const signed char *rows, int M, int K, const signed char *packed, const float *row_scales, const float *scales,
    int first_tile, int last_tile, int N, float *y) {
    configure_tiles(M);
    int out[16 * TILE];
    for (int t = first_tile; t < last_tile; t++) {
        const signed char *tile = packed + (long)t * K * TILE;
        _tile_zero(0);
        for (int k = 0; k < K; k += 64) {
            _tile_loadd(1, rows + k, K);
            _tile_loadd(2, tile + (long)k * TILE, 64);
            _tile_dpbssd(0, 1, 2);
        }
        _tile_stored(0, out, 64);
        int columns = N - TILE * t < TILE ? N - TILE * t : TILE;
        for (int m = 0; m < M; m++)
            for (int c = 0; c < columns; c++)
                y[(long)m * N + TILE * t + c] = (float)out[TILE * m + c] * row_scales[m] * scales[TILE * t + c];
    }
    _tile_release();
}

void amx_int8_gemm(const signed char *rows, int M, int K, const signed char *packed, const float *row_scales,
                   const float *scales, int N, float *y, int threads) {
    int tiles = (N + TILE - 1) / TILE;
#pragma omp parallel num_threads(threads)
    {
        int count = omp_get_num_threads(), me = omp_get_thread_num();
        int first = (int)((long)tiles * me / count), last = (int)((long)tiles * (me + 1) / count);
        for (int row = 0; row < M; row += 16)
            amx_int8_block(rows + (long)row * K, M - row < 16 ? M - row : 16, K, packed, row_scales + row, scales, first,
                           last, N, y + (long)row * N);
    }
}

/* head_argmax's bound for eight columns, and for one: both sweeps must compute the same numbers. */
static inline __m256 bound8(__m256 scale, __m256 rounding, const float *slack, const float *norms) {
    return _mm256_fmadd_ps(rounding, _mm256_loadu_ps(norms), _mm256_mul_ps(scale, _mm256_loadu_ps(slack)));
}

static inline float bound1(float scale, float rounding, float slack, float norm) {
    return fmaf(rounding, norm, scale * slack);
}

/* Greedy decoding's argmax over the LM head, exactly as over the float32 logits of small_gemm, reading
 * half the memory. A one-row pass spends ~5 ms of ~35 reading SmolLM2's 49152 x 576 float32 head.
 *
 * approx (M, N) are the screened logits (the head in bfloat16; the rows too, with AMX). For row m and
 * column i they differ from the float32 kernel's logit by at most scales[2m] * slack[i] +
 * scales[2m + 1] * norms[i]: the row's norm times the head row's rounding error and float32 rounding
 * terms, plus the row's own rounding error times the rounded head row's norm (Cauchy-Schwarz; see
 * ExactArgmax in cpu_kernels.py). So the true best column is among those whose
 * approx + bound reaches the highest approx - bound; those few are recomputed with the float32 kernel's
 * own sequence of fused multiply-adds (fmaf over k from zero: the bits of its vector lanes), and the
 * best wins, the lowest index on a tie, as torch.argmax. `weights` (N, K) float32, row-major.
 * Writes the winning column and the number of candidates recomputed, per row. */
void head_argmax(const float *x, int M, int K, const float *approx, int N, const float *scales, const float *slack,
                 const float *norms, const float *weights, long *best, int *candidates, int threads) {
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int m = 0; m < M; m++) {
        const float *xm = x + (long)m * K, *am = approx + (long)m * N;
        float scale = scales[2 * m], rounding = scales[2 * m + 1];
        /* Two sweeps of the row, eight columns at a time: a tree pass screens 8-16 rows. */
        __m256 vscale = _mm256_set1_ps(scale), vrounding = _mm256_set1_ps(rounding);
        __m256 lows = _mm256_set1_ps(-INFINITY);
        int i = 0;
        for (; i + 8 <= N; i += 8) {
            lows = _mm256_max_ps(lows, _mm256_sub_ps(_mm256_loadu_ps(am + i), bound8(vscale, vrounding, slack + i, norms + i)));
        }
        float low_values[8], floor_value = -INFINITY;
        _mm256_storeu_ps(low_values, lows);
        for (int j = 0; j < 8; j++) floor_value = low_values[j] > floor_value ? low_values[j] : floor_value;
        for (; i < N; i++) {
            float low = am[i] - bound1(scale, rounding, slack[i], norms[i]);
            if (low > floor_value) floor_value = low;
        }
        __m256 vfloor = _mm256_set1_ps(floor_value);
        float top = -INFINITY;
        long winner = -1;
        int count = 0;
        for (int start = 0; start < N; start += 8) {
            unsigned reaches;
            if (start + 8 <= N) {
                __m256 bound = bound8(vscale, vrounding, slack + start, norms + start);
                reaches = (unsigned)_mm256_movemask_ps(_mm256_cmp_ps(_mm256_add_ps(_mm256_loadu_ps(am + start), bound), vfloor, _CMP_GE_OQ));
            } else {
                reaches = 0;
                for (int j = start; j < N; j++)
                    if (am[j] + bound1(scale, rounding, slack[j], norms[j]) >= floor_value) reaches |= 1u << (j - start);
            }
            for (; reaches; reaches &= reaches - 1) {  /* ascending columns: a tie keeps the lowest */
                int column = start + __builtin_ctz(reaches);
                const float *w = weights + (long)column * K;
                float exact = 0.0f;
                for (int k = 0; k < K; k++) exact = fmaf(xm[k], w[k], exact);
                count++;
                if (winner < 0 || exact > top) {
                    top = exact;
                    winner = column;
                }
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

/* Attention for decoding passes: a few query rows against the KV cache, grouped-query.
 *
 * torch's CPU attention cost 80 microseconds a layer for one query row (2.4 ms of a 35 ms plain step on
 * the 2-core Xeon), nearly all of it dispatch and set-up. Here each (row, key/value head) pair is one
 * work item, and its arithmetic depends only on the keys the row may see, taken in slot order: a tree
 * node's row sees the committed prefix, then its ancestors, then itself, which are the keys (with the
 * same bits) and the order that plain decoding sees when it reaches that token. The summation order
 * never depends on where in the cache those keys lie nor on what else is in the call, so a token's
 * attention output is the same bits in a tree as in plain decoding. */

/* e^x (Cephes' expf polynomial): 0 below -87, e^88 above 88. Lane-wise, so a value's result does not
 * depend on its neighbours. */
static inline __m256 exp8(__m256 x) {
    const __m256 low = _mm256_set1_ps(-87.0f);
    __m256 under = _mm256_cmp_ps(x, low, _CMP_LT_OQ);
    x = _mm256_min_ps(_mm256_max_ps(x, low), _mm256_set1_ps(88.0f));
    __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
    r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
    __m256 p = _mm256_set1_ps(1.9875691500e-4f);
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
    p = _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
    __m256i power = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_andnot_ps(under, _mm256_mul_ps(p, _mm256_castsi256_ps(power)));
}

/* Eight dot products (one per accumulator) as the lanes of one vector, in a fixed order. */
static inline __m256 sum8x8(__m256 a[8]) {
    __m256 t0 = _mm256_hadd_ps(a[0], a[1]), t1 = _mm256_hadd_ps(a[2], a[3]);
    __m256 t2 = _mm256_hadd_ps(a[4], a[5]), t3 = _mm256_hadd_ps(a[6], a[7]);
    __m256 u0 = _mm256_hadd_ps(t0, t1), u1 = _mm256_hadd_ps(t2, t3);
    return _mm256_add_ps(_mm256_permute2f128_ps(u0, u1, 0x20), _mm256_permute2f128_ps(u0, u1, 0x31));
}


/* Scores of `group` query heads (head_dim apart from q) against the keys at slots seen[0..count),
 * count a multiple of 8, times scale plus the row's bias at those slots; into scores[h * count + j]. */
static void attention_scores(const float *q, int group, int head_dim, const float *keys, const int *seen, int count,
                             const float *bias, float scale, float *scores) {
    for (int j = 0; j < count; j += 8) {
        const float *k[8];
        for (int t = 0; t < 8; t++) k[t] = keys + (long)seen[j + t] * head_dim;
        for (int h = 0; h < group; h++) {
            const float *qh = q + (long)h * head_dim;
            __m256 acc[8];
            for (int t = 0; t < 8; t++) acc[t] = _mm256_setzero_ps();
            for (int i = 0; i < head_dim; i += 8) {
                __m256 qi = _mm256_loadu_ps(qh + i);
                for (int t = 0; t < 8; t++) acc[t] = _mm256_fmadd_ps(qi, _mm256_loadu_ps(k[t] + i), acc[t]);
            }
            __m256 s = _mm256_mul_ps(sum8x8(acc), _mm256_set1_ps(scale));
            if (bias) {
                float add[8];
                for (int t = 0; t < 8; t++) add[t] = bias[seen[j + t]];
                s = _mm256_add_ps(s, _mm256_loadu_ps(add));
            }
            _mm256_storeu_ps(scores + (long)h * count + j, s);
        }
    }
}

/* The same with AVX-512 for `group` (1 to 4, a constant where inlined) query heads sharing each key
 * load: 8 keys x group heads accumulators, reduced 16 lanes -> 8 -> one vector of 8 scores. */
static inline __attribute__((always_inline, target("avx512f"))) void attention_scores_512(
    const float *q, int group, int head_dim, const float *keys, const int *seen, int count, const float *bias,
    float scale, float *scores) {
    for (int j = 0; j < count; j += 8) {
        const float *k[8];
        for (int t = 0; t < 8; t++) k[t] = keys + (long)seen[j + t] * head_dim;
        __m512 acc[4][8];
        for (int h = 0; h < group; h++)
            for (int t = 0; t < 8; t++) acc[h][t] = _mm512_setzero_ps();
        for (int i = 0; i < head_dim; i += 16) {
            __m512 qi[4];
            for (int h = 0; h < group; h++) qi[h] = _mm512_loadu_ps(q + (long)h * head_dim + i);
            for (int t = 0; t < 8; t++) {
                __m512 ki = _mm512_loadu_ps(k[t] + i);
                for (int h = 0; h < group; h++) acc[h][t] = _mm512_fmadd_ps(qi[h], ki, acc[h][t]);
            }
        }
        __m256 add = _mm256_setzero_ps();
        if (bias) {
            float gathered[8];
            for (int t = 0; t < 8; t++) gathered[t] = bias[seen[j + t]];
            add = _mm256_loadu_ps(gathered);
        }
        for (int h = 0; h < group; h++) {
            __m256 halves[8];
            for (int t = 0; t < 8; t++)
                halves[t] = _mm256_add_ps(_mm512_castps512_ps256(acc[h][t]),
                                          _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(acc[h][t]), 1)));
            _mm256_storeu_ps(scores + (long)h * count + j, _mm256_add_ps(_mm256_mul_ps(sum8x8(halves), _mm256_set1_ps(scale)), add));
        }
    }
}

/* sum_j weights[h][j] * values[seen[j]] for `group` heads (1 to 4) sharing each value load; head_dim
 * a multiple of 64 (four vectors of accumulators per head and sweep). */
static inline __attribute__((always_inline, target("avx512f"))) void weighted_values_512(
    const float *weights, long weight_stride, int group, int head_dim, const float *values, const int *seen, int count,
    const float *inverse, float *out) {
    for (int i = 0; i < head_dim; i += 64) {
        __m512 acc[4][4];
        for (int h = 0; h < group; h++)
            for (int t = 0; t < 4; t++) acc[h][t] = _mm512_setzero_ps();
        for (int j = 0; j < count; j++) {
            const float *v = values + (long)seen[j] * head_dim + i;
            __m512 vt[4];
            for (int t = 0; t < 4; t++) vt[t] = _mm512_loadu_ps(v + 16 * t);
            for (int h = 0; h < group; h++) {
                __m512 w = _mm512_set1_ps(weights[h * weight_stride + j]);
                for (int t = 0; t < 4; t++) acc[h][t] = _mm512_fmadd_ps(w, vt[t], acc[h][t]);
            }
        }
        for (int h = 0; h < group; h++)
            for (int t = 0; t < 4; t++)
                _mm512_storeu_ps(out + (long)h * head_dim + i + 16 * t, _mm512_mul_ps(acc[h][t], _mm512_set1_ps(inverse[h])));
    }
}

/* Softmax numerators in place over scores[0, padded) of each head (the lanes past count -inf, so
 * they come out 0), and 1 / their sum per head. */
static inline __attribute__((always_inline)) void softmax_weights(float *scores, int group, int count, int padded, float *inverse) {
    for (int h = 0; h < group; h++) {
        float *sh = scores + (long)h * padded;
        for (int j = count; j < padded; j++) sh[j] = -INFINITY;
        __m256 most = _mm256_set1_ps(-INFINITY), total = _mm256_setzero_ps();
        for (int j = 0; j < padded; j += 8) most = _mm256_max_ps(most, _mm256_loadu_ps(sh + j));  /* exact in any order */
        __m128 m4 = _mm_max_ps(_mm256_castps256_ps128(most), _mm256_extractf128_ps(most, 1));
        m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
        __m256 top = _mm256_set1_ps(_mm_cvtss_f32(_mm_max_ss(m4, _mm_shuffle_ps(m4, m4, 1))));
        for (int j = 0; j < padded; j += 8) {
            __m256 e = exp8(_mm256_sub_ps(_mm256_loadu_ps(sh + j), top));
            _mm256_storeu_ps(sh + j, e);
            total = _mm256_add_ps(total, e);
        }
        inverse[h] = 1.0f / horizontal_sum(total);
    }
}

/* One (row, key/value head) item with AVX2: `group` query heads at q, their outputs at o. */
static void attend_item(const float *q, int group, int head_dim, const float *keys, const float *values, const int *seen,
                        int count, int padded, const float *bias, float scale, float *scores, float *o) {
    float inverse[64];
    attention_scores(q, group, head_dim, keys, seen, padded, bias, scale, scores);
    softmax_weights(scores, group, count, padded, inverse);
    for (int h = 0; h < group; h++) {
        const float *sh = scores + (long)h * padded;
        float *oh = o + (long)h * head_dim;
        for (int i = 0; i < head_dim; i += 64) {  /* 64 dimensions a sweep: 8 accumulators in registers */
            int width = head_dim - i < 64 ? (head_dim - i) / 8 : 8;
            __m256 acc[8];
            for (int t = 0; t < 8; t++) acc[t] = _mm256_setzero_ps();
            for (int j = 0; j < count; j++) {
                const float *v = values + (long)seen[j] * head_dim + i;
                __m256 weight = _mm256_set1_ps(sh[j]);
                for (int t = 0; t < width; t++) acc[t] = _mm256_fmadd_ps(weight, _mm256_loadu_ps(v + 8 * t), acc[t]);
            }
            for (int t = 0; t < width; t++) _mm256_storeu_ps(oh + i + 8 * t, _mm256_mul_ps(acc[t], _mm256_set1_ps(inverse[h])));
        }
    }
}

#define ITEM_512(group) \
    attention_scores_512(q, group, head_dim, keys, seen, padded, bias, scale, scores); \
    softmax_weights(scores, group, count, padded, inverse); \
    weighted_values_512(scores, padded, group, head_dim, values, seen, count, inverse, o);

/* The same with AVX-512, for 1 to 4 query heads per key/value head and head_dim a multiple of 64. */
static __attribute__((target("avx512f"))) void attend_item_512(
    const float *q, int group, int head_dim, const float *keys, const float *values, const int *seen, int count,
    int padded, const float *bias, float scale, float *scores, float *o) {
    float inverse[4];
    switch (group) {  /* a constant group lets the compiler keep every accumulator in a register */
    case 1: ITEM_512(1) break;
    case 2: ITEM_512(2) break;
    case 3: ITEM_512(3) break;
    default: ITEM_512(4) break;
    }
}

/* out (rows, heads * head_dim) = softmax(q k^T * scale + bias) v for each query row, where q rows are
 * `q_stride` floats apart (the fused q/k/v rows), keys and values (kv_heads, S, head_dim) rows of a
 * cache with `head_stride` floats per head, and bias (rows, span) additive: 0 where a row may attend,
 * -inf where not (NULL: every slot below span). head_dim a multiple of 8; at most 64 query heads per
 * key/value head. */
void attend_rows(const float *q, int rows, int q_stride, int heads, int kv_heads, int head_dim, const float *keys,
                 const float *values, long head_stride, int span, const float *bias, float scale, float *out, int threads) {
    int group = heads / kv_heads, items = rows * kv_heads;
    int wide = group <= 4 && head_dim % 64 == 0 && __builtin_cpu_supports("avx512f");
    if (threads > items) threads = items;
#pragma omp parallel num_threads(threads)
    {
        int *seen = malloc(sizeof(int) * (span + 8));
        float *scores = malloc(sizeof(float) * group * (span + 8));
#pragma omp for schedule(static)
        for (int item = 0; item < items; item++) {
            int r = item / kv_heads, g = item % kv_heads;
            const float *row_bias = bias ? bias + (long)r * span : NULL;
            int count = 0;
            for (int s = 0; s < span; s++)
                if (!row_bias || row_bias[s] != -INFINITY) seen[count++] = s;
            float *o = out + (long)r * heads * head_dim + (long)g * group * head_dim;
            if (count == 0) {
                memset(o, 0, sizeof(float) * group * head_dim);
                continue;
            }
            int padded = (count + 7) & ~7;
            for (int j = count; j < padded; j++) seen[j] = seen[count - 1];
            const float *qg = q + (long)r * q_stride + (long)g * group * head_dim;
            (wide ? attend_item_512 : attend_item)(qg, group, head_dim, keys + g * head_stride, values + g * head_stride,
                                                   seen, count, padded, row_bias, scale, scores, o);
        }
        free(seen);
        free(scores);
    }
}

/* Copy the keys and values of `rows` fused q/k/v rows (q_stride apart; keys after `heads` query
 * heads, values after those) into cache slot slot[r] (or start + r where slot is NULL) of each of kv_heads heads (head_stride apart). */
void write_kv(const float *qkv, int rows, int q_stride, int heads, int kv_heads, int head_dim, long start,
              const long *slot, float *keys, float *values, long head_stride) {
    for (int r = 0; r < rows; r++) {
        long at = slot ? slot[r] : start + r;
        const float *k = qkv + (long)r * q_stride + (long)heads * head_dim, *v = k + (long)kv_heads * head_dim;
        for (int g = 0; g < kv_heads; g++) {
            memcpy(keys + g * head_stride + at * head_dim, k + (long)g * head_dim, sizeof(float) * head_dim);
            memcpy(values + g * head_stride + at * head_dim, v + (long)g * head_dim, sizeof(float) * head_dim);
        }
    }
}

/* y = silu(gate) * up for each row of `both` (rows, 2 ff): gate its first ff columns, up the rest
 * (ff a multiple of 8). silu(g) = g / (1 + e^-g). */
static void silu_mul(const float *both, float *y, int rows, int ff) {
    const __m256 one = _mm256_set1_ps(1.0f);
    for (int r = 0; r < rows; r++) {
        const float *gate = both + (long)r * 2 * ff, *up = gate + ff;
        for (int i = 0; i < ff; i += 8) {
            __m256 g = _mm256_loadu_ps(gate + i);
            __m256 e = exp8(_mm256_sub_ps(_mm256_setzero_ps(), g));
            _mm256_storeu_ps(y + (long)r * ff + i, _mm256_mul_ps(_mm256_div_ps(g, _mm256_add_ps(one, e)), _mm256_loadu_ps(up + i)));
        }
    }
}

/* Weights that are exactly 4-bit codes per 32 k of a column, w = d * q + m with q in 0..15 (as a GGUF
 * Q4_1 weight de-quantizes: SmolLM2's body is), read as those codes: 5/32 of float32's bytes. Each weight
 * is rebuilt exactly (one fused multiply-add: d * q needs 15 bits, so d * q + m rounds once as the
 * de-quantizer's float32 arithmetic did), then multiplied in the float32 kernel's own sequence of fused
 * multiply-adds over k from zero: the same bits as small_gemm on the de-quantized weights. `codes`
 * (tiles, K / 2, 16) bytes, k even in the low nibble and k + 1 in the high; `scales` (tiles, K / 32, 2, 16)
 * float32, d then m. AVX-512; K a multiple of 32. */
#define Q4_ROWS 8

static inline __attribute__((always_inline, target("avx512f"))) void q4_tiles(
    int tiles, int rows, const float *x, int K, const unsigned char *codes, const float *scales, float *out) {
    __m512 acc[2][Q4_ROWS];
    const __m512i low = _mm512_set1_epi32(15);
    long tile_codes = (long)K / 2 * TILE, tile_scales = (long)K / 32 * 2 * TILE;
    for (int t = 0; t < tiles; t++)
        for (int m = 0; m < rows; m++) acc[t][m] = _mm512_setzero_ps();
    for (int block = 0; block < K / 32; block++) {
        __m512 d[2], offset[2];
        for (int t = 0; t < tiles; t++) {
            const float *scale = scales + t * tile_scales + block * 2 * TILE;
            d[t] = _mm512_loadu_ps(scale);
            offset[t] = _mm512_loadu_ps(scale + TILE);
            const char *next = (const char *)(codes + (t + tiles) * tile_codes + block * 16 * TILE);
            for (int line = 0; line < 256; line += 64) _mm_prefetch(next + line, _MM_HINT_T0);
        }
        for (int pair = 16 * block; pair < 16 * block + 16; pair++) {
            __m512 even[2], odd[2];
            for (int t = 0; t < tiles; t++) {
                __m512i q = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(codes + t * tile_codes + (long)pair * TILE)));
                even[t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_and_si512(q, low)), d[t], offset[t]);
                odd[t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_srli_epi32(q, 4)), d[t], offset[t]);
            }
            for (int m = 0; m < rows; m++) {  /* each x broadcast once for both tiles */
                __m512 first = _mm512_set1_ps(x[(long)m * K + 2 * pair]), second = _mm512_set1_ps(x[(long)m * K + 2 * pair + 1]);
                for (int t = 0; t < tiles; t++)
                    acc[t][m] = _mm512_fmadd_ps(second, odd[t], _mm512_fmadd_ps(first, even[t], acc[t][m]));
            }
        }
    }
    for (int m = 0; m < rows; m++)
        for (int t = 0; t < tiles; t++) _mm512_storeu_ps(out + (long)m * 2 * TILE + t * TILE, acc[t][m]);
}

#define CASE_Q4(t, n) case n: q4_tiles(t, n, x, K, codes, scales, out); break;
#define SWITCH_Q4(t)                                                                                   \
    switch (rows) {                                                                                   \
        CASE_Q4(t, 1) CASE_Q4(t, 2) CASE_Q4(t, 3) CASE_Q4(t, 4) CASE_Q4(t, 5) CASE_Q4(t, 6) CASE_Q4(t, 7) \
        default: q4_tiles(t, Q4_ROWS, x, K, codes, scales, out); break;                               \
    }
static __attribute__((target("avx512f"))) void q4_block(int tiles, int rows, const float *x, int K,
                                                        const unsigned char *codes, const float *scales, float *out) {
    /* both tile counts and every row count as constants, so the accumulators stay in registers */
    if (tiles == 2)
        SWITCH_Q4(2)
    else
        SWITCH_Q4(1)
}

/* y (M, N) = x (M, K) @ W^T for 4-bit weights as above; two tiles a step (a row's multiply-adds
 * form one dependency chain per tile: one tile alone would wait on their latency). */
void q4_gemm(const float *x, int M, int K, const unsigned char *codes, const float *scales, int N, float *y, int threads) {
    int tiles = (N + TILE - 1) / TILE, steps = (tiles + 1) / 2;
    long tile_codes = (long)K / 2 * TILE, tile_scales = (long)K / 32 * 2 * TILE;
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int step = 0; step < steps; step++) {
        int first = 2 * step, count = tiles - first < 2 ? tiles - first : 2;
        int columns = N - TILE * first < TILE * count ? N - TILE * first : TILE * count;
        float out[Q4_ROWS * 2 * TILE];
        for (int row = 0; row < M; row += Q4_ROWS) {
            int rows = M - row < Q4_ROWS ? M - row : Q4_ROWS;
            q4_block(count, rows, x + (long)row * K, K, codes + first * tile_codes, scales + first * tile_scales, out);
            for (int m = 0; m < rows; m++)
                memcpy(y + (long)(row + m) * N + TILE * first, out + (long)m * 2 * TILE, columns * sizeof(float));
        }
    }
}

/* One Llama decoder layer over a decoding pass's rows, in one call: the dozen torch ops and kernel
 * calls of a layer cost about 100 us of dispatch a layer (3 ms of a 33 ms pass, 2-core Xeon). */
typedef struct {
    int d, heads, kv_heads, head_dim, ff;
    float eps;
    const float *input_norm, *post_norm;
    const float *projection[4]; /* q/k/v, o, gate/up, down, packed as small_gemm takes them */
    const unsigned char *codes[4]; /* the same as 4-bit codes for q4_gemm, or NULL */
    const float *scales[4];
} layer_weights;

/* Low-rank corrections of the same four projections (rank 0: none), for rows first_row and after. */
typedef struct {
    int rank[4];
    const void *down[4], *up[4];
    int bf16; /* the pairs are packed in bfloat16 (stream rows only: drafts, never verified tokens) */
} layer_lora;

static void project(const layer_weights *w, const layer_lora *lora, int which, const float *x, int rows, int K, int N,
                    float *y, int first_row, int threads) {
    if (w->codes[which])
        q4_gemm(x, rows, K, w->codes[which], w->scales[which], N, y, threads);
    else
        small_gemm(x, rows, K, w->projection[which], N, y, threads);
    if (lora && lora->rank[which] && first_row < rows)
        lora_add(x + (long)first_row * K, rows - first_row, K, lora->down[which], lora->rank[which], lora->up[which], N,
                 y + (long)first_row * N, threads, lora->bf16);
}

/* y (rows, d) = the layer applied to x (rows, d), writing the rows' keys and values into the cache
 * (slot[r], or start + r where slot is NULL) and attending over slots [0, span) with `bias` as in
 * attend_rows; cos and sin (rows, head_dim) per row. The same kernels and order as the layer in
 * torch with the other kernels, but silu here (a row gets the same bits whichever pass it is in). */
static void decoder_layer_rows(const layer_weights *w, const layer_lora *lora, int first_row, const float *x, float *y, int rows,
                        const float *cos, const float *sin, float *keys, float *values, long head_stride, long start,
                        const long *slot, int span, const float *bias, int threads) {
    int d = w->d, hd = w->head_dim, heads = w->heads, kv = w->kv_heads, ff = w->ff;
    int width = (heads + 2 * kv) * hd, widest = width > 2 * ff ? width : 2 * ff;
    float *h = malloc(sizeof(float) * rows * d), *wide = malloc(sizeof(float) * rows * widest);
    float *attn = malloc(sizeof(float) * rows * heads * hd), *act = malloc(sizeof(float) * rows * ff);
    float *out = malloc(sizeof(float) * rows * d);
    rms_norm(x, w->input_norm, h, rows, d, w->eps);
    project(w, lora, 0, h, rows, d, width, wide, first_row, threads);
    rotary(wide, rows, width, heads + kv, hd, cos, sin, rows);
    write_kv(wide, rows, width, heads, kv, hd, start, slot, keys, values, head_stride);
    attend_rows(wide, rows, width, heads, kv, hd, keys, values, head_stride, span, bias, 1.0f / sqrtf((float)hd), attn, threads);
    project(w, lora, 1, attn, rows, heads * hd, d, out, first_row, threads);
    for (long i = 0; i < (long)rows * d; i++) y[i] = x[i] + out[i];
    rms_norm(y, w->post_norm, h, rows, d, w->eps);
    project(w, lora, 2, h, rows, d, 2 * ff, wide, first_row, threads);
    silu_mul(wide, act, rows, ff);
    project(w, lora, 3, act, rows, ff, d, out, first_row, threads);
    for (long i = 0; i < (long)rows * d; i++) y[i] += out[i];
    free(h);
    free(wide);
    free(attn);
    free(act);
    free(out);
}

/* A run of decoder layers over the same rows in one call, x updated in place (decoder_layer_rows reads
 * each element of its input before it writes that element of its output): a layer's call from Python
 * cost about 70 us around 770 of arithmetic (2-core Xeon), 2 ms of a 27 ms plain pass. Layer l's keys
 * and values start layer_stride floats after layer l - 1's; lora[l] NULL (or lora NULL) for none. */
void decoder_layers_rows(const layer_weights *const *w, const layer_lora *const *lora, int layers, int first_row,
                         float *x, int rows, const float *cos, const float *sin, float *keys, float *values,
                         long layer_stride, long head_stride, long start, const long *slot, int span, const float *bias,
                         int threads) {
    for (int l = 0; l < layers; l++)
        decoder_layer_rows(w[l], lora ? lora[l] : NULL, first_row, x, x, rows, cos, sin, keys + l * layer_stride,
                           values + l * layer_stride, head_stride, start, slot, span, bias, threads);
}

/* Each row of x (M, K) as int8 times a scale, as Int8Matrix rounds rows for amx_int8_gemm: scale the
 * row's largest magnitude (at least 1e-30) over 127, each element x / scale rounded to nearest even. A
 * dozen small torch ops did this in 0.15 ms a pass (2-core Xeon). */
void int8_rows(const float *x, int M, int K, signed char *q, float *scales) {
    for (int m = 0; m < M; m++) {
        const float *row = x + (long)m * K;
        float largest = 1e-30f;
        for (int k = 0; k < K; k++) largest = fabsf(row[k]) > largest ? fabsf(row[k]) : largest;
        float scale = largest / 127.0f;
        scales[m] = scale;
        for (int k = 0; k < K; k++) {
            float v = nearbyintf(row[k] / scale);
            q[(long)m * K + k] = (signed char)(v > 127.0f ? 127.0f : v < -127.0f ? -127.0f : v);
        }
    }
}

/* The k (at most 64) largest logits of each row (M, N), best first (the lower column on a tie), and
 * their softmax probabilities over the row: what the streams draft. In torch a softmax, a top-k and
 * an index cost 0.25 ms a pass for three rows. */
void top_probabilities(const float *logits, int M, int N, int k, float *probs, long *columns) {
    for (int m = 0; m < M; m++) {
        const float *row = logits + (long)m * N;
        float best[64];
        long at[64];
        int have = 0;
        for (long i = 0; i < N; i++) {
            float v = row[i];
            if (have == k && !(v > best[k - 1])) continue;
            int j = have < k ? have++ : k - 1;
            while (j > 0 && v > best[j - 1]) {
                best[j] = best[j - 1];
                at[j] = at[j - 1];
                j--;
            }
            best[j] = v;
            at[j] = i;
        }
        __m256 total = _mm256_setzero_ps(), top = _mm256_set1_ps(best[0]);
        long i = 0;
        for (; i + 8 <= N; i += 8) total = _mm256_add_ps(total, exp8(_mm256_sub_ps(_mm256_loadu_ps(row + i), top)));
        float sum = horizontal_sum(total);
        for (; i < N; i++) sum += expf(row[i] - best[0]);
        for (int j = 0; j < have; j++) {
            probs[(long)m * k + j] = expf(best[j] - best[0]) / sum;
            columns[(long)m * k + j] = at[j];
        }
    }
}
