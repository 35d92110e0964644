/* convert.c - sample conversions done in one pass in C. */
#include "luna_shm.h"

#include <errno.h>

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
 * with ties to even (like numpy.rint), and write NaN as 0 (silence). */

/* Adding and subtracting 1.5 * 2^23 rounds a float of magnitude < 2^22 to an
 * integer, ties to even, with plain SSE2 arithmetic that vectorizes. */
static inline float round_even_small(float v)
{
    const float magic = 12582912.0f;
    return (v + magic) - magic;
}

static inline float clip_f(float v, float lo, float hi)
{
    v = v != v ? 0.0f : v; /* NaN -> silence */
    return v < lo ? lo : (v > hi ? hi : v);
}

static inline double clip_d(double v, double lo, double hi)
{
    v = v != v ? 0.0 : v;
    return v < lo ? lo : (v > hi ? hi : v);
}

/* Round a clipped double to nearest, ties to even, without libm. */
static inline int64_t round_even_d(double v)
{
    double fl = (double)(int64_t)v;
    if (fl > v)
        fl -= 1.0; /* floor for negatives */
    double frac = v - fl;
    int64_t i = (int64_t)fl;
    if (frac > 0.5 || (frac == 0.5 && (i & 1)))
        i += 1;
    return i;
}

static inline double load(const void *src, int src_is_double, uint64_t i)
{
    return src_is_double ? ((const double *)src)[i] : (double)((const float *)src)[i];
}

int luna_float_to_pcm(const void *src, int src_is_double, void *dst, int dst_bits,
                      uint64_t count)
{
    uint64_t i;
    switch (dst_bits) {
    case 16:
        if (!src_is_double) {
            const float *s = src;
            int16_t *d = dst;
            for (i = 0; i < count; i++)
                d[i] = (int16_t)round_even_small(
                    clip_f(s[i] * 32767.0f, -32768.0f, 32767.0f));
            return 0;
        }
        for (i = 0; i < count; i++)
            ((int16_t *)dst)[i] = (int16_t)round_even_d(
                clip_d(load(src, 1, i) * 32767.0, -32768.0, 32767.0));
        return 0;
    case 8:
        /* 8-bit WAV is unsigned with 128 as silence. */
        for (i = 0; i < count; i++)
            ((uint8_t *)dst)[i] = (uint8_t)(
                round_even_d(clip_d(load(src, src_is_double, i) * 127.0, -128.0,
                                    127.0)) + 128);
        return 0;
    case 24:
        for (i = 0; i < count; i++) {
            uint32_t v = (uint32_t)round_even_d(clip_d(
                load(src, src_is_double, i) * 8388607.0, -8388608.0, 8388607.0));
            uint8_t *d = (uint8_t *)dst + 3 * i;
            d[0] = (uint8_t)v;
            d[1] = (uint8_t)(v >> 8);
            d[2] = (uint8_t)(v >> 16);
        }
        return 0;
    case 32:
        for (i = 0; i < count; i++)
            ((int32_t *)dst)[i] = (int32_t)round_even_d(
                clip_d(load(src, src_is_double, i) * 2147483647.0, -2147483648.0,
                       2147483647.0));
        return 0;
    default:
        return -EINVAL;
    }
}
