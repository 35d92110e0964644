/* convert.c - sample conversions done in one pass in C.
 *
 * No pointer here is assumed aligned: read_wav views of a mapped file start
 * wherever the file's data chunk starts (a float file written by another
 * program can put it at offset 58), and numpy hands out views at any byte
 * offset. Every sample wider than a byte is loaded and stored with memcpy,
 * which compilers turn into one plain (unaligned) load or store, and which
 * keeps the loops vectorizable; a cast to float * or int32_t * of such a
 * pointer would be undefined behaviour (UBSan -fsanitize=alignment). */
#include "luna_internal.h"

#include <errno.h>
#include <string.h>

#if defined(__SSE2__)
#include <emmintrin.h>
#endif

/* The most samples a call takes: each of its buffers (at most 8 bytes a
 * sample) must fit the address space, so that no size computation wraps. */
#define MAX_COUNT ((uint64_t)SIZE_MAX / 8u)

static inline float load_f32(const uint8_t *p, uint64_t i)
{
    float v;
    memcpy(&v, p + i * sizeof v, sizeof v);
    return v;
}

static inline double load_f64(const uint8_t *p, uint64_t i)
{
    double v;
    memcpy(&v, p + i * sizeof v, sizeof v);
    return v;
}

static inline void store_s16(uint8_t *p, uint64_t i, int16_t v)
{
    memcpy(p + i * sizeof v, &v, sizeof v);
}

static inline void store_s32(uint8_t *p, uint64_t i, int32_t v)
{
    memcpy(p + i * sizeof v, &v, sizeof v);
}

int luna_pack_s24(const void *src, uint8_t *dst, uint64_t count)
{
    if (count > MAX_COUNT)
        return -EFBIG;
    const uint8_t *s = src;
    for (uint64_t i = 0; i < count; i++) {
        int32_t x;
        memcpy(&x, s + 4 * i, sizeof x);
        uint32_t v = (uint32_t)x;
        dst[0] = (uint8_t)(v >> 8);
        dst[1] = (uint8_t)(v >> 16);
        dst[2] = (uint8_t)(v >> 24);
        dst += 3;
    }
    return 0;
}

int luna_unpack_s24(const uint8_t *src, void *dst, uint64_t count)
{
    if (count > MAX_COUNT)
        return -EFBIG;
    /* The same values as decode.c's 24-bit PCM read as int32, which loads all
     * but the last sample with one 4-byte load each (measured about 1.5x faster
     * than three byte loads). */
    return luna_decode(src, LUNA_WAVE_FORMAT_PCM, 24, dst, LUNA_DECODE_INT32, count);
}

/* Float to PCM, one pass, no temporary: scale by the largest positive value
 * of the target (1.0 -> 32767), clip to the target's range, round to nearest
 * with ties to even (like numpy.rint), and write NaN as 0 (silence).
 *
 * The loops are written branch-free so that the compiler vectorizes them
 * (build flags -O3 -fno-trapping-math): rounding adds and subtracts 1.5 * 2^23
 * (float) or 1.5 * 2^52 (double), which rounds any value of the clipped range
 * to an integer, ties to even, in plain SSE2 arithmetic. */

#define ROUND_F 12582912.0f
#define ROUND_D 6755399441055744.0

static inline float scale_clip_f(float x, float scale, float lo, float hi)
{
    float v = x * scale;
    v = v == v ? v : 0.0f; /* NaN -> silence */
    v = v < lo ? lo : v;
    v = v > hi ? hi : v;
    return (v + ROUND_F) - ROUND_F;
}

static inline double scale_clip_d(double x, double scale, double lo, double hi)
{
    double v = x * scale;
    v = v == v ? v : 0.0;
    v = v < lo ? lo : v;
    v = v > hi ? hi : v;
    return (v + ROUND_D) - ROUND_D;
}

/* float32 -> int16, the hot path (TTS output to what players want). With
 * SSE2: NaN masked to 0, min/max clip, cvtps2dq rounds to nearest even (the
 * default MXCSR mode), packssdw narrows; 8 samples per step, through the
 * unaligned load and store instructions. */
static void f32_to_s16(const uint8_t *restrict s, uint8_t *restrict d, uint64_t count)
{
    uint64_t i = 0;
#if defined(__SSE2__)
    const __m128 scale = _mm_set1_ps(32767.0f);
    const __m128 lo = _mm_set1_ps(-32768.0f);
    const __m128 hi = _mm_set1_ps(32767.0f);
    for (; i + 8 <= count; i += 8) {
        __m128 a = _mm_mul_ps(_mm_loadu_ps((const float *)(const void *)(s + 4 * i)), scale);
        __m128 b = _mm_mul_ps(_mm_loadu_ps((const float *)(const void *)(s + 4 * i + 16)),
                              scale);
        a = _mm_and_ps(a, _mm_cmpord_ps(a, a));
        b = _mm_and_ps(b, _mm_cmpord_ps(b, b));
        a = _mm_min_ps(_mm_max_ps(a, lo), hi);
        b = _mm_min_ps(_mm_max_ps(b, lo), hi);
        __m128i packed = _mm_packs_epi32(_mm_cvtps_epi32(a), _mm_cvtps_epi32(b));
        _mm_storeu_si128((__m128i *)(void *)(d + 2 * i), packed);
    }
#endif
    for (; i < count; i++)
        store_s16(d, i, (int16_t)(int32_t)scale_clip_f(load_f32(s, i), 32767.0f, -32768.0f,
                                                       32767.0f));
}

/* One loop per source type and target width: each vectorizes on its own. */
#define CONVERT_LOOP(LOAD, SCALE_CLIP, DST_EXPR, SCALE, LO, HI)                 \
    do {                                                                       \
        for (uint64_t i = 0; i < count; i++) {                                 \
            __typeof__(SCALE_CLIP(LOAD(s, i), SCALE, LO, HI)) v =              \
                SCALE_CLIP(LOAD(s, i), SCALE, LO, HI);                         \
            DST_EXPR;                                                          \
        }                                                                      \
    } while (0)

int luna_float_to_pcm(const void *src, int src_is_double, void *dst, int dst_bits,
                      uint64_t count)
{
    const uint8_t *restrict s = src;
    uint8_t *restrict d = dst;
    if (dst_bits != 8 && dst_bits != 16 && dst_bits != 24 && dst_bits != 32)
        return -EINVAL;
    if (count > MAX_COUNT)
        return -EFBIG;
    switch (dst_bits) {
    case 8: /* 8-bit WAV is unsigned, 128 is silence */
        if (src_is_double)
            CONVERT_LOOP(load_f64, scale_clip_d, d[i] = (uint8_t)((int32_t)v + 128),
                         127.0, -128.0, 127.0);
        else
            CONVERT_LOOP(load_f32, scale_clip_f, d[i] = (uint8_t)((int32_t)v + 128),
                         127.0f, -128.0f, 127.0f);
        return 0;
    case 16:
        if (src_is_double)
            CONVERT_LOOP(load_f64, scale_clip_d, store_s16(d, i, (int16_t)(int32_t)v),
                         32767.0, -32768.0, 32767.0);
        else
            f32_to_s16(s, d, count);
        return 0;
    case 24: /* packed little-endian, 3 bytes a sample; in double for precision */
        if (src_is_double)
            CONVERT_LOOP(load_f64, scale_clip_d, {
                uint32_t u = (uint32_t)(int32_t)v;
                d[3 * i] = (uint8_t)u;
                d[3 * i + 1] = (uint8_t)(u >> 8);
                d[3 * i + 2] = (uint8_t)(u >> 16);
            }, 8388607.0, -8388608.0, 8388607.0);
        else
            CONVERT_LOOP(load_f32, scale_clip_d, {
                uint32_t u = (uint32_t)(int32_t)v;
                d[3 * i] = (uint8_t)u;
                d[3 * i + 1] = (uint8_t)(u >> 8);
                d[3 * i + 2] = (uint8_t)(u >> 16);
            }, 8388607.0, -8388608.0, 8388607.0);
        return 0;
    default: /* 32, in double: float32 cannot hold 2147483647 exactly */
        if (src_is_double)
            CONVERT_LOOP(load_f64, scale_clip_d, store_s32(d, i, (int32_t)v), 2147483647.0,
                         -2147483648.0, 2147483647.0);
        else
            CONVERT_LOOP(load_f32, scale_clip_d, store_s32(d, i, (int32_t)v), 2147483647.0,
                         -2147483648.0, 2147483647.0);
        return 0;
    }
}
