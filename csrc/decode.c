/* decode.c - samples as a file stores them, to the type the caller asked for,
 * in one pass (convert-on-read).
 *
 * The values are python-soundfile's (libsndfile's) for the same request, so that
 * read_wav(path, dtype=...) can replace soundfile.read(path, dtype=...):
 *   PCM to float: scaled by 1 / 2^(bits-1) (8-bit PCM is unsigned: 128 is 0), so
 *     -1.0 <= x < 1.0; in float32 the int is rounded to float first (32-bit PCM);
 *   PCM to int: left-justified (16-bit PCM as int32: x << 16), or its top bits
 *     (24-bit PCM as int16: x >> 8, arithmetic);
 *   float to float: a cast. Float to int is not made here (-EINVAL).
 * No pointer needs any alignment: every sample wider than a byte is loaded and
 * stored with memcpy, which compilers turn into plain (vectorizable) moves.
 */
#include "luna_internal.h"

#include <errno.h>
#include <string.h>

static inline int32_t load_pcm(const uint8_t *p, int bits, uint64_t i)
{
    switch (bits) {
    case 8:
        return (int32_t)p[i] - 128;
    case 16: {
        int16_t v;
        memcpy(&v, p + 2 * i, sizeof v);
        return v;
    }
    case 24: {
        const uint8_t *q = p + 3 * i;
        uint32_t u = ((uint32_t)q[0] << 8) | ((uint32_t)q[1] << 16) | ((uint32_t)q[2] << 24);
        return (int32_t)u >> 8; /* sign-extended */
    }
    case 25: { /* 24-bit with a readable byte after the sample: one 4-byte load */
        uint32_t u;
        memcpy(&u, p + 3 * i, sizeof u);
        return (int32_t)(u << 8) >> 8;
    }
    default: {
        int32_t v;
        memcpy(&v, p + 4 * i, sizeof v);
        return v;
    }
    }
}

/* One loop per (source width, target type): the switch on bits is hoisted by
 * the compiler out of each loop, which then vectorizes. */
#define DECODE_LOOP(LOADBITS, T, EXPR)                                         \
    for (uint64_t i = 0; i < count; i++) {                                     \
        int32_t v = load_pcm(s, LOADBITS, i);                                  \
        T out = (EXPR);                                                        \
        memcpy(d + i * sizeof out, &out, sizeof out);                          \
    }

#define DECODE_PCM_AS(LOADBITS, BITS)                                                       \
    do {                                                                       \
        switch (dst_type) {                                                    \
        case LUNA_DECODE_FLOAT32:                                              \
            DECODE_LOOP(LOADBITS, float, (float)v * (1.0f / (float)(1u << ((BITS) - 1)))) \
            return 0;                                                          \
        case LUNA_DECODE_FLOAT64:                                              \
            DECODE_LOOP(LOADBITS, double, (double)v / (double)(1u << ((BITS) - 1))) \
            return 0;                                                          \
        case LUNA_DECODE_INT32:                                                \
            DECODE_LOOP(LOADBITS, int32_t, (int32_t)((uint32_t)v << (32 - (BITS)))) \
            return 0;                                                          \
        case LUNA_DECODE_INT16:                                                \
            DECODE_LOOP(LOADBITS, int16_t,                                         \
                        (int16_t)((BITS) <= 16 ? (int32_t)((uint32_t)v << (16 - (BITS))) \
                                               : v >> ((BITS) - 16)))         \
            return 0;                                                          \
        default:                                                               \
            return -EINVAL;                                                    \
        }                                                                      \
    } while (0)

#define DECODE_PCM(BITS) DECODE_PCM_AS(BITS, BITS)

static int decode_float(const uint8_t *s, int bits, uint8_t *d, int dst_type,
                        uint64_t count)
{
    if (bits == 32 && dst_type == LUNA_DECODE_FLOAT64) {
        for (uint64_t i = 0; i < count; i++) {
            float v;
            memcpy(&v, s + 4 * i, sizeof v);
            double out = v;
            memcpy(d + 8 * i, &out, sizeof out);
        }
        return 0;
    }
    if (bits == 64 && dst_type == LUNA_DECODE_FLOAT32) {
        for (uint64_t i = 0; i < count; i++) {
            double v;
            memcpy(&v, s + 8 * i, sizeof v);
            float out = (float)v;
            memcpy(d + 4 * i, &out, sizeof out);
        }
        return 0;
    }
    if ((bits == 32 && dst_type == LUNA_DECODE_FLOAT32) ||
        (bits == 64 && dst_type == LUNA_DECODE_FLOAT64)) {
        memcpy(d, s, (size_t)(count * (uint64_t)(bits / 8)));
        return 0;
    }
    return -EINVAL;
}

#if defined(__SSE2__) && __BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__
#include <emmintrin.h>
#define LUNA_S24_SSE2 1

/* Four 24-bit samples at s as int32 with each sample in the top 24 bits (x << 8).
 * Reads 16 bytes: the caller keeps 4 readable bytes past the 12 it decodes. The
 * compiler does not vectorize the stride-3 loads of load_pcm; SSE2 byte shifts
 * put each sample into its own 32-bit lane. */
static inline __m128i load4_s24_high(const uint8_t *s)
{
    __m128i v = _mm_loadu_si128((const __m128i *)s);
    __m128i s01 = _mm_unpacklo_epi32(v, _mm_srli_si128(v, 3));
    __m128i s23 = _mm_unpacklo_epi32(_mm_srli_si128(v, 6), _mm_srli_si128(v, 9));
    return _mm_slli_epi32(_mm_unpacklo_epi64(s01, s23), 8);
}

/* The leading samples of a 24-bit decode, four at a time with SSE2, with the
 * values of DECODE_PCM(24) (exact: every 24-bit int is a float). Returns how
 * many samples it decoded (a multiple of 4; the caller does the rest). One loop
 * per target type: a switch inside the loop would cost a third of its time. */
#define S24_SSE2_LOOP(STORE)                                                   \
    for (; i + 6 <= count; i += 4) { /* 3 * i + 16 <= 3 * count: in bounds */ \
        __m128i high = load4_s24_high(s + 3 * i);                              \
        STORE;                                                                 \
    }

static uint64_t decode_s24_sse2(const uint8_t *s, uint8_t *d, int dst_type, uint64_t count)
{
    uint64_t i = 0;
    const __m128 scale32 = _mm_set1_ps(1.0f / 8388608.0f);
    const __m128d scale64 = _mm_set1_pd(1.0 / 8388608.0);
    switch (dst_type) {
    case LUNA_DECODE_INT32:
        S24_SSE2_LOOP(_mm_storeu_si128((__m128i *)(d + 4 * i), high))
        break;
    case LUNA_DECODE_FLOAT32:
        S24_SSE2_LOOP(_mm_storeu_ps((float *)(d + 4 * i),
                                    _mm_mul_ps(_mm_cvtepi32_ps(_mm_srai_epi32(high, 8)),
                                               scale32)))
        break;
    case LUNA_DECODE_FLOAT64:
        S24_SSE2_LOOP(__m128i v = _mm_srai_epi32(high, 8);
                      _mm_storeu_pd((double *)(d + 8 * i),
                                    _mm_mul_pd(_mm_cvtepi32_pd(v), scale64));
                      _mm_storeu_pd((double *)(d + 8 * i + 16),
                                    _mm_mul_pd(_mm_cvtepi32_pd(_mm_srli_si128(v, 8)),
                                               scale64)))
        break;
    case LUNA_DECODE_INT16: /* x >> 8 fits int16: the saturating pack is exact */
        S24_SSE2_LOOP(__m128i top = _mm_srai_epi32(high, 16);
                      _mm_storel_epi64((__m128i *)(d + 2 * i), _mm_packs_epi32(top, top)))
        break;
    default:
        break;
    }
    return i;
}
#endif

#if __BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__
/* 24-bit samples whose next byte can be read (all but the last): the 25 case of
 * load_pcm, one unaligned 4-byte load each instead of three byte loads. */
static int decode_s24_body(const uint8_t *s, uint8_t *d, int dst_type, uint64_t count)
{
    DECODE_PCM_AS(25, 24);
}
#else
static int decode_s24_body(const uint8_t *s, uint8_t *d, int dst_type, uint64_t count)
{
    DECODE_PCM(24);
}
#endif

/* The bytes of one decoded sample of dst_type (a decodable one). */
static uint64_t decoded_size(int dst_type)
{
    return dst_type == LUNA_DECODE_INT16 ? 2 : dst_type == LUNA_DECODE_FLOAT64 ? 8 : 4;
}

/* 1 when luna_decode makes this conversion. */
static int decodable(int src_format, int src_bits, int dst_type)
{
    if (dst_type < LUNA_DECODE_INT16 || dst_type > LUNA_DECODE_FLOAT64)
        return 0;
    if (src_format == LUNA_WAVE_FORMAT_PCM)
        return src_bits == 8 || src_bits == 16 || src_bits == 24 || src_bits == 32;
    return src_format == LUNA_WAVE_FORMAT_IEEE_FLOAT && (src_bits == 32 || src_bits == 64) &&
           (dst_type == LUNA_DECODE_FLOAT32 || dst_type == LUNA_DECODE_FLOAT64);
}

int luna_decode(const void *src, int src_format, int src_bits, void *dst,
                int dst_type, uint64_t count)
{
    if (count > (uint64_t)SIZE_MAX / 8)
        return -EFBIG;
    const uint8_t *s = src;
    uint8_t *d = dst;
    if (src_format == LUNA_WAVE_FORMAT_IEEE_FLOAT && (src_bits == 32 || src_bits == 64))
        return decode_float(s, src_bits, d, dst_type, count);
    if (src_format != LUNA_WAVE_FORMAT_PCM)
        return -EINVAL;
    switch (src_bits) {
    case 8:
        DECODE_PCM(8);
    case 16:
        DECODE_PCM(16);
    case 24:
#ifdef LUNA_S24_SSE2
        { /* none for a dst_type it does not make: the scalar path refuses it */
            uint64_t done = decode_s24_sse2(s, d, dst_type, count);
            s += 3 * done;
            d += decoded_size(dst_type) * done;
            count -= done;
        }
#endif
        if (count > 1) { /* all but the last sample with 4-byte loads (little-endian) */
            int rc = decode_s24_body(s, d, dst_type, count - 1);
            if (rc < 0)
                return rc;
            s += 3 * (count - 1);
            d += decoded_size(dst_type) * (count - 1);
            count = 1;
        }
        DECODE_PCM(24);
    case 32:
        DECODE_PCM(32);
    default:
        return -EINVAL;
    }
}

int luna_read_decode(int fd, uint64_t offset, int src_format, int src_bits,
                     void *dst, int dst_type, uint64_t count)
{
    /* Chunks small enough to stay in the cache between the read and the
     * decode: one pass over the caller's memory, not two. */
    enum { CHUNK_BYTES = 1 << 16 };
    uint8_t chunk[CHUNK_BYTES];
    if (!decodable(src_format, src_bits, dst_type))
        return -EINVAL; /* before any read */
    uint64_t sample_bytes = (uint64_t)src_bits / 8;
    uint64_t out_bytes = decoded_size(dst_type);
    if (offset > (uint64_t)INT64_MAX)
        return -EINVAL;
    if (count > (uint64_t)SIZE_MAX / 8 || count * sample_bytes > (uint64_t)INT64_MAX - offset)
        return -EFBIG;
    int same = (src_format == LUNA_WAVE_FORMAT_PCM &&
                ((src_bits == 16 && dst_type == LUNA_DECODE_INT16) ||
                 (src_bits == 32 && dst_type == LUNA_DECODE_INT32))) ||
               (src_format == LUNA_WAVE_FORMAT_IEEE_FLOAT &&
                ((src_bits == 32 && dst_type == LUNA_DECODE_FLOAT32) ||
                 (src_bits == 64 && dst_type == LUNA_DECODE_FLOAT64)));
    if (same) /* nothing to convert: straight into the caller's memory */
        return luna_read_at(fd, offset, dst, count * sample_bytes);
    uint64_t per_chunk = CHUNK_BYTES / 24 * 24 / sample_bytes; /* whole samples */
    uint8_t *d = dst;
    while (count > 0) {
        uint64_t n = count < per_chunk ? count : per_chunk;
        int rc = luna_read_at(fd, offset, chunk, n * sample_bytes);
        if (rc < 0)
            return rc;
        rc = luna_decode(chunk, src_format, src_bits, d, dst_type, n);
        if (rc < 0)
            return rc;
        offset += n * sample_bytes;
        d += n * out_bytes;
        count -= n;
    }
    return 0;
}
