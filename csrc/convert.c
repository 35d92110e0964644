/* convert.c - sample conversions done in one pass in C. */
#include "luna_shm.h"

#include <errno.h>

#if defined(__SSE2__)
#include <emmintrin.h>
#endif

void luna_pack_s24(const int32_t *src, uint8_t *dst, uint64_t count)
{
    for (uint64_t i = 0; i < count; i++) {
        uint32_t v = (uint32_t)src[i];
        dst[0] = (uint8_t)(v >> 8);
        dst[1] = (uint8_t)(v >> 16);
        dst[2] = (uint8_t)(v >> 24);
        dst += 3;
    }
}

void luna_unpack_s24(const uint8_t *src, int32_t *dst, uint64_t count)
{
    for (uint64_t i = 0; i < count; i++) {
        uint32_t v = ((uint32_t)src[0] << 8) | ((uint32_t)src[1] << 16) |
                     ((uint32_t)src[2] << 24);
        dst[i] = (int32_t)v;
        src += 3;
    }
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
 * default MXCSR mode), packssdw narrows; 8 samples per step. */
static void f32_to_s16(const float *restrict s, int16_t *restrict d, uint64_t count)
{
    uint64_t i = 0;
#if defined(__SSE2__)
    const __m128 scale = _mm_set1_ps(32767.0f);
    const __m128 lo = _mm_set1_ps(-32768.0f);
    const __m128 hi = _mm_set1_ps(32767.0f);
    for (; i + 8 <= count; i += 8) {
        __m128 a = _mm_mul_ps(_mm_loadu_ps(s + i), scale);
        __m128 b = _mm_mul_ps(_mm_loadu_ps(s + i + 4), scale);
        a = _mm_and_ps(a, _mm_cmpord_ps(a, a));
        b = _mm_and_ps(b, _mm_cmpord_ps(b, b));
        a = _mm_min_ps(_mm_max_ps(a, lo), hi);
        b = _mm_min_ps(_mm_max_ps(b, lo), hi);
        __m128i packed = _mm_packs_epi32(_mm_cvtps_epi32(a), _mm_cvtps_epi32(b));
        _mm_storeu_si128((__m128i *)(void *)(d + i), packed);
    }
#endif
    for (; i < count; i++)
        d[i] = (int16_t)(int32_t)scale_clip_f(s[i], 32767.0f, -32768.0f, 32767.0f);
}

/* One loop per source type and target width: each vectorizes on its own. */
#define CONVERT_LOOP(SRC_T, SCALE_CLIP, DST_EXPR, SCALE, LO, HI)               \
    do {                                                                       \
        const SRC_T *restrict s = src;                                         \
        for (uint64_t i = 0; i < count; i++) {                                 \
            __typeof__(SCALE_CLIP(s[i], SCALE, LO, HI)) v =                    \
                SCALE_CLIP(s[i], SCALE, LO, HI);                               \
            DST_EXPR;                                                          \
        }                                                                      \
    } while (0)

int luna_float_to_pcm(const void *src, int src_is_double, void *dst, int dst_bits,
                      uint64_t count)
{
    uint8_t *restrict d8 = dst;
    int16_t *restrict d16 = dst;
    int32_t *restrict d32 = dst;
    switch (dst_bits) {
    case 8: /* 8-bit WAV is unsigned, 128 is silence */
        if (src_is_double)
            CONVERT_LOOP(double, scale_clip_d, d8[i] = (uint8_t)((int32_t)v + 128),
                         127.0, -128.0, 127.0);
        else
            CONVERT_LOOP(float, scale_clip_f, d8[i] = (uint8_t)((int32_t)v + 128),
                         127.0f, -128.0f, 127.0f);
        return 0;
    case 16:
        if (src_is_double)
            CONVERT_LOOP(double, scale_clip_d, d16[i] = (int16_t)(int32_t)v, 32767.0,
                         -32768.0, 32767.0);
        else
            f32_to_s16(src, d16, count);
        return 0;
    case 24: /* packed little-endian, 3 bytes a sample; in double for precision */
        if (src_is_double)
            CONVERT_LOOP(double, scale_clip_d, {
                uint32_t u = (uint32_t)(int32_t)v;
                d8[3 * i] = (uint8_t)u;
                d8[3 * i + 1] = (uint8_t)(u >> 8);
                d8[3 * i + 2] = (uint8_t)(u >> 16);
            }, 8388607.0, -8388608.0, 8388607.0);
        else
            CONVERT_LOOP(float, scale_clip_d, {
                uint32_t u = (uint32_t)(int32_t)v;
                d8[3 * i] = (uint8_t)u;
                d8[3 * i + 1] = (uint8_t)(u >> 8);
                d8[3 * i + 2] = (uint8_t)(u >> 16);
            }, 8388607.0, -8388608.0, 8388607.0);
        return 0;
    case 32: /* in double: float32 cannot hold 2147483647 exactly */
        if (src_is_double)
            CONVERT_LOOP(double, scale_clip_d, d32[i] = (int32_t)v, 2147483647.0,
                         -2147483648.0, 2147483647.0);
        else
            CONVERT_LOOP(float, scale_clip_d, d32[i] = (int32_t)v, 2147483647.0,
                         -2147483648.0, 2147483647.0);
        return 0;
    default:
        return -EINVAL;
    }
}
