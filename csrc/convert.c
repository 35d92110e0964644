/* convert.c - sample conversions done in one pass in C. */
#include "luna_shm.h"

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
