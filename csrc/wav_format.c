/* wav_format.c - writing RIFF/WAVE headers.
 *
 * Layout: "RIFF" size "WAVE", a "fmt " chunk (PCM/IEEE-float with up to two
 * channels, WAVE_FORMAT_EXTENSIBLE above that), a "fact" chunk for float
 * data, a "JUNK" chunk when the data would otherwise start at an offset that
 * is not a multiple of the sample size (so that mapped numpy views are
 * aligned), then "data". A slot's unused tail is a second "JUNK" chunk.
 */
#include "luna_shm.h"

#include <errno.h>
#include <stdint.h>
#include <string.h>

/* KSDATAFORMAT_SUBTYPE_{PCM,IEEE_FLOAT} after their first two bytes. */
static const uint8_t guid_tail[14] = {0x00, 0x00, 0x00, 0x00, 0x10, 0x00, 0x80,
                                      0x00, 0x00, 0xaa, 0x00, 0x38, 0x9b, 0x71};

static uint8_t *put_tag(uint8_t *p, const char *tag)
{
    memcpy(p, tag, 4);
    return p + 4;
}

static uint8_t *put_u16(uint8_t *p, uint32_t v)
{
    p[0] = (uint8_t)v;
    p[1] = (uint8_t)(v >> 8);
    return p + 2;
}

static uint8_t *put_u32(uint8_t *p, uint64_t v)
{
    p[0] = (uint8_t)v;
    p[1] = (uint8_t)(v >> 8);
    p[2] = (uint8_t)(v >> 16);
    p[3] = (uint8_t)(v >> 24);
    return p + 4;
}

static int spec_is_valid(const struct luna_wav_spec *s)
{
    if (s->channels == 0 || s->samplerate == 0)
        return 0;
    if (s->format == LUNA_WAVE_FORMAT_PCM)
        return s->bits == 8 || s->bits == 16 || s->bits == 24 || s->bits == 32;
    if (s->format == LUNA_WAVE_FORMAT_IEEE_FLOAT)
        return s->bits == 32 || s->bits == 64;
    return 0;
}

/* Default speaker mask for channels > 2: the layouts that have a usual one, as
 * libsndfile writes them (quad 0x33, 5.1 0x3F, 7.1 0xFF); else 0, "unspecified".
 * Naming the first n positions (FL, FR, FC, LFE, ...) made quad a 3.1 with its
 * fourth channel on the subwoofer. */
static uint32_t default_channel_mask(uint32_t channels)
{
    switch (channels) {
    case 4:
        return 0x33u; /* FL FR BL BR */
    case 6:
        return 0x3Fu; /* FL FR FC LFE BL BR */
    case 8:
        return 0xFFu; /* FL FR FC LFE BL BR FLC FRC */
    default:
        return 0u;
    }
}

int luna_wav_header(uint8_t *out, const struct luna_wav_spec *spec,
                    uint64_t data_bytes, uint64_t tail_bytes)
{
    if (!out || !spec || !spec_is_valid(spec) ||
        (tail_bytes != 0 && tail_bytes < 8) || (tail_bytes & 1u))
        return -EINVAL;
    /* Checked before any sum, so that none of them can wrap. */
    if (data_bytes > 0xFFFFFFFFu || tail_bytes > 0xFFFFFFFFu)
        return -EFBIG;
    uint32_t sample_bytes = spec->bits / 8u;
    uint64_t block_align = (uint64_t)spec->channels * sample_bytes;
    uint64_t byte_rate = block_align * spec->samplerate;
    /* Both are fixed-width fields of the fmt chunk. */
    if (block_align > 0xFFFFu || byte_rate > 0xFFFFFFFFu)
        return -EINVAL;

    int extensible = spec->channels > 2;
    int is_float = spec->format == LUNA_WAVE_FORMAT_IEEE_FLOAT;
    uint32_t fmt_size = extensible ? 40u : (is_float ? 18u : 16u);
    uint64_t base = 12u + 8u + fmt_size + (is_float ? 12u : 0u);
    uint32_t align = (sample_bytes == 3u) ? 1u : sample_bytes;
    uint64_t pad_body = 0;
    int pad_chunk = 0;
    if ((base + 8u) % align != 0u) {
        pad_chunk = 1;
        while ((base + 8u + 8u + pad_body) % align != 0u)
            pad_body += 2u;
    }
    uint64_t header_len = base + (pad_chunk ? 8u + pad_body : 0u) + 8u;
    uint64_t riff_size = header_len - 8u + data_bytes + (data_bytes & 1u) +
                         tail_bytes;
    if (riff_size > 0xFFFFFFFFu)
        return -EFBIG;

    uint8_t *p = out;
    p = put_tag(p, "RIFF");
    p = put_u32(p, riff_size);
    p = put_tag(p, "WAVE");
    p = put_tag(p, "fmt ");
    p = put_u32(p, fmt_size);
    p = put_u16(p, extensible ? LUNA_WAVE_FORMAT_EXTENSIBLE : spec->format);
    p = put_u16(p, spec->channels);
    p = put_u32(p, spec->samplerate);
    p = put_u32(p, byte_rate);
    p = put_u16(p, (uint32_t)block_align);
    p = put_u16(p, spec->bits);
    if (extensible) {
        p = put_u16(p, 22);                 /* cbSize */
        p = put_u16(p, spec->bits);         /* wValidBitsPerSample */
        p = put_u32(p, default_channel_mask(spec->channels));
        p = put_u16(p, spec->format);       /* SubFormat GUID */
        memcpy(p, guid_tail, sizeof guid_tail);
        p += sizeof guid_tail;
    } else if (is_float) {
        p = put_u16(p, 0);                  /* cbSize */
    }
    if (is_float) {
        p = put_tag(p, "fact");
        p = put_u32(p, 4);
        p = put_u32(p, data_bytes / block_align); /* dwSampleLength: frames */
    }
    if (pad_chunk) {
        p = put_tag(p, "JUNK");
        p = put_u32(p, pad_body);
        memset(p, 0, (size_t)pad_body);
        p += pad_body;
    }
    p = put_tag(p, "data");
    p = put_u32(p, data_bytes);
    return (int)(p - out);
}

/* Everything luna_wav_format_slot checks, before a byte of the slot changes:
 * writes the header into header and the offset of the slot's end of audio
 * (pad byte included) into *end. Returns the header length or -errno. */
static int plan_slot(uint8_t *header, uint64_t slot_len,
                     const struct luna_wav_spec *spec, uint64_t data_bytes,
                     uint64_t *end)
{
    /* data_bytes <= 4 GiB once the header accepts it: end cannot wrap. */
    int len = luna_wav_header(header, spec, data_bytes, 8);
    if (len < 0)
        return len;
    *end = (uint64_t)len + data_bytes + (data_bytes & 1u);
    if (*end + 8u > slot_len)
        return -EFBIG;
    uint64_t tail = slot_len - *end;
    if (tail & 1u)
        return -EINVAL;
    return luna_wav_header(header, spec, data_bytes, tail);
}

/* Store a planned slot's header, pad byte and JUNK chunk. */
static void format_planned(uint8_t *slot, uint64_t slot_len, const uint8_t *header,
                           int len, uint64_t data_bytes, uint64_t end)
{
    if (data_bytes & 1u)
        slot[end - 1] = 0;
    uint8_t *p = put_tag(slot + end, "JUNK");
    put_u32(p, slot_len - end - 8u);
    memcpy(slot, header, (size_t)len);
}

int luna_wav_format_slot(uint8_t *slot, uint64_t slot_len,
                         const struct luna_wav_spec *spec, uint64_t data_bytes)
{
    uint8_t header[LUNA_WAV_MAX_HEADER];
    uint64_t end;
    if (!slot || slot_len > (uint64_t)SIZE_MAX)
        return -EINVAL;
    int len = plan_slot(header, slot_len, spec, data_bytes, &end);
    if (len >= 0)
        format_planned(slot, slot_len, header, len, data_bytes, end);
    return len;
}

int luna_wav_fill_slot(uint8_t *slot, uint64_t slot_len,
                       const struct luna_wav_spec *spec, const void *data,
                       uint64_t data_bytes)
{
    uint8_t header[LUNA_WAV_MAX_HEADER];
    uint64_t end;
    if (!slot || slot_len > (uint64_t)SIZE_MAX || (!data && data_bytes))
        return -EINVAL;
    /* Every check first: a refused fill leaves the slot exactly as it was. */
    int len = plan_slot(header, slot_len, spec, data_bytes, &end);
    if (len < 0)
        return len;
    memcpy(slot + len, data, (size_t)data_bytes);
    format_planned(slot, slot_len, header, len, data_bytes, end);
    return len;
}
