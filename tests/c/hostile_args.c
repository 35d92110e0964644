/* hostile_args.c - the C layer defends itself, under ASan + UBSan.
 *
 * Build (tests/test_c_sanitizers.py does this, into a temporary directory):
 *
 *   gcc -std=gnu11 -Wall -Wextra -Werror -g -O1 -fno-omit-frame-pointer \
 *       -fsanitize=address,undefined -fsanitize=alignment \
 *       -fno-sanitize-recover=all -Icsrc tests/c/hostile_args.c csrc/[a-z]*.c
 *
 * Usage: hostile_args -t DIR   (DIR: a private, empty, writable directory)
 *
 * Five groups of checks:
 *   1. every converter of convert.c on source and destination pointers at
 *      every misalignment, against the same conversion on aligned buffers
 *      (UBSan's alignment check aborts on a misaligned load or store);
 *   2. every header that wav_format.c writes, for each spec, data size and
 *      tail, parsed back by wav_parse.c, whole and as pool slots;
 *   3. every C function that takes a size or an offset, called with hostile
 *      values (UINT64_MAX, 2^63, 2^63 - 1, 2^32, sums that wrap, ...) on a
 *      real file in DIR: each must return its documented -EFBIG or -EINVAL
 *      and leave the file and the directory as they were;
 *   4. live.c's stream-state headers, parsed back, and its watches;
 *   5. pool.c's pooled write: filled only while its watch is quiet;
 *   6. mapping.c's unnamed locked files: the exact mode, whatever the umask,
 *      and the shared lock held before any name.
 *
 * Prints one line per failed check on stderr and "N passed, M failed" on
 * stdout; exits 0 when M is 0, 1 otherwise, 2 on a usage or setup error.
 */
#include "luna_internal.h"

#include <dirent.h>
#include <errno.h>
#include <inttypes.h>
#include <limits.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <unistd.h>

static int passed, failed;

#define TWO_63 ((uint64_t)1 << 63)
#define TWO_32 ((uint64_t)1 << 32)

static void expect(int ok, const char *what, long long got, long long want)
{
    if (ok) {
        passed++;
        return;
    }
    failed++;
    fprintf(stderr, "FAILED: %s: got %lld, want %lld\n", what, got, want);
}

#define EXPECT_RC(call, want)                                                  \
    do {                                                                       \
        long long got_ = (long long)(call);                                    \
        expect(got_ == (long long)(want), #call, got_, (long long)(want));     \
    } while (0)

#define EXPECT_TRUE(cond) expect((cond) != 0, #cond, 0, 1)

/* ---- 1. converters at every misalignment ------------------------------- */

#define COUNT 37 /* not a multiple of 8: the SIMD body and the scalar tail */

static void fill_floats(float *f, double *d)
{
    for (int i = 0; i < COUNT; i++) {
        double x = (i * 0.0577) - 1.05; /* past both ends: clipped too */
        d[i] = x;
        f[i] = (float)x;
    }
    d[3] = 0.0 / 0.0; /* NaN becomes silence */
    f[3] = (float)d[3];
}

static void check_converters(void)
{
    float f32[COUNT];
    double f64[COUNT];
    fill_floats(f32, f64);
    static const int widths[] = {8, 16, 24, 32};
    uint8_t reference[COUNT * 4];
    uint8_t src_block[COUNT * 8 + 16];
    uint8_t dst_block[COUNT * 4 + 16];

    for (int is_double = 0; is_double <= 1; is_double++) {
        const void *aligned = is_double ? (const void *)f64 : (const void *)f32;
        size_t src_bytes = COUNT * (is_double ? 8u : 4u);
        for (size_t w = 0; w < sizeof widths / sizeof widths[0]; w++) {
            int bits = widths[w];
            size_t dst_bytes = COUNT * (size_t)bits / 8u;
            EXPECT_RC(luna_float_to_pcm(aligned, is_double, reference, bits, COUNT), 0);
            for (size_t so = 0; so < 8; so++) {
                for (size_t d_off = 0; d_off < 4; d_off++) {
                    memcpy(src_block + so, aligned, src_bytes);
                    memset(dst_block, 0xA5, sizeof dst_block);
                    int rc = luna_float_to_pcm(src_block + so, is_double,
                                               dst_block + d_off, bits, COUNT);
                    char what[96];
                    snprintf(what, sizeof what,
                             "float%d -> PCM %d, src +%zu, dst +%zu: same bytes",
                             is_double ? 64 : 32, bits, so, d_off);
                    expect(rc == 0 && memcmp(dst_block + d_off, reference, dst_bytes) == 0,
                           what, rc, 0);
                    /* Not one byte written outside the destination. */
                    expect(dst_block[d_off + dst_bytes] == 0xA5 &&
                               (d_off == 0 || dst_block[d_off - 1] == 0xA5),
                           "converter stays inside its destination", 0, 1);
                }
            }
        }
    }

    int32_t ints[COUNT];
    for (int i = 0; i < COUNT; i++)
        ints[i] = (int32_t)((uint32_t)i * 2654435761u);
    uint8_t packed_ref[COUNT * 3];
    EXPECT_RC(luna_pack_s24(ints, packed_ref, COUNT), 0);
    for (size_t so = 0; so < 4; so++) {
        for (size_t d_off = 0; d_off < 4; d_off++) {
            uint8_t packed[COUNT * 3 + 8];
            memcpy(src_block + so, ints, sizeof ints);
            EXPECT_RC(luna_pack_s24(src_block + so, packed + d_off, COUNT), 0);
            EXPECT_TRUE(memcmp(packed + d_off, packed_ref, sizeof packed_ref) == 0);
            /* Unpack into a misaligned int32 destination: the top 24 bits
             * come back, the low byte is 0. */
            EXPECT_RC(luna_unpack_s24(packed + d_off, dst_block + so, COUNT), 0);
            int ok = 1;
            for (int i = 0; i < COUNT; i++) {
                int32_t v;
                memcpy(&v, dst_block + so + 4 * (size_t)i, sizeof v);
                ok &= (uint32_t)v == ((uint32_t)ints[i] & 0xFFFFFF00u);
            }
            expect(ok, "pack_s24 + unpack_s24 at misaligned pointers round-trip", ok, 1);
        }
    }

    /* decode.c: every conversion it makes, at every misalignment of source and
     * destination, gives the bytes of the aligned conversion and writes nothing
     * outside the destination. */
    static const struct { int format, bits; } sources[] = {
        {LUNA_WAVE_FORMAT_PCM, 8}, {LUNA_WAVE_FORMAT_PCM, 16}, {LUNA_WAVE_FORMAT_PCM, 24},
        {LUNA_WAVE_FORMAT_PCM, 32}, {LUNA_WAVE_FORMAT_IEEE_FLOAT, 32},
        {LUNA_WAVE_FORMAT_IEEE_FLOAT, 64},
    };
    static const int targets[] = {LUNA_DECODE_INT16, LUNA_DECODE_INT32, LUNA_DECODE_FLOAT32,
                                  LUNA_DECODE_FLOAT64};
    static const size_t target_bytes[] = {2, 4, 4, 8};
    uint8_t samples[COUNT * 8];
    for (size_t i = 0; i < sizeof samples; i++)
        samples[i] = (uint8_t)(i * 37u + 11u);
    memcpy(samples, f64, sizeof f64); /* real floats for the float sources */
    for (size_t src = 0; src < sizeof sources / sizeof sources[0]; src++) {
        if (sources[src].format == LUNA_WAVE_FORMAT_IEEE_FLOAT && sources[src].bits == 32)
            memcpy(samples, f32, sizeof f32);
        size_t src_bytes = COUNT * (size_t)sources[src].bits / 8u;
        for (size_t t = 0; t < sizeof targets / sizeof targets[0]; t++) {
            uint8_t decoded[COUNT * 8];
            int want = luna_decode(samples, sources[src].format, sources[src].bits, decoded,
                                   targets[t], COUNT);
            if (want == -EINVAL)
                continue; /* float to int: not made, at any alignment */
            EXPECT_RC(want, 0);
            size_t out_bytes = COUNT * target_bytes[t];
            uint8_t out_block[COUNT * 8 + 16];
            for (size_t so = 0; so < 8; so++) {
                for (size_t d_off = 0; d_off < 8; d_off++) {
                    memcpy(src_block + so, samples, src_bytes);
                    memset(out_block, 0xA5, sizeof out_block);
                    int rc = luna_decode(src_block + so, sources[src].format,
                                         sources[src].bits, out_block + d_off, targets[t],
                                         COUNT);
                    expect(rc == 0 && memcmp(out_block + d_off, decoded, out_bytes) == 0,
                           "decode at misaligned pointers: the same values", rc, 0);
                    expect(out_block[d_off + out_bytes] == 0xA5 &&
                               (d_off == 0 || out_block[d_off - 1] == 0xA5),
                           "decode stays inside its destination", 0, 1);
                }
            }
        }
    }

    /* 24-bit sources of every length up to 40 in heap blocks of exactly their size
     * (AddressSanitizer sees a read past them): the SIMD body loads 16 bytes for 12,
     * and must stop where that would leave the source. Each sample as the scalar
     * formula says. */
    for (uint64_t n = 1; n <= 40; n++) {
        uint8_t *src = malloc(3 * n);
        int32_t *high = malloc(4 * n);
        float *f = malloc(4 * n);
        if (!src || !high || !f) {
            free(src), free(high), free(f);
            expect(0, "malloc", 0, 1);
            return;
        }
        for (uint64_t i = 0; i < 3 * n; i++)
            src[i] = (uint8_t)(i * 53u + n);
        EXPECT_RC(luna_decode(src, LUNA_WAVE_FORMAT_PCM, 24, high, LUNA_DECODE_INT32, n), 0);
        EXPECT_RC(luna_decode(src, LUNA_WAVE_FORMAT_PCM, 24, f, LUNA_DECODE_FLOAT32, n), 0);
        /* A target type it does not make: refused at every length, SIMD body included. */
        EXPECT_RC(luna_decode(src, LUNA_WAVE_FORMAT_PCM, 24, f, 0, n), -EINVAL);
        EXPECT_RC(luna_decode(src, LUNA_WAVE_FORMAT_PCM, 24, f, 99, n), -EINVAL);
        int ok = 1;
        for (uint64_t i = 0; i < n; i++) {
            uint32_t u = (uint32_t)src[3 * i] << 8 | (uint32_t)src[3 * i + 1] << 16 |
                         (uint32_t)src[3 * i + 2] << 24;
            ok &= (uint32_t)high[i] == u && f[i] == (float)((int32_t)u >> 8) / 8388608.0f;
        }
        expect(ok, "24-bit decode of an exact-size source: every sample", ok, 1);
        free(src), free(high), free(f);
    }
}

/* ---- 2. headers written, then parsed back -------------------------------- */

static void check_headers(void)
{
    static const struct {
        uint16_t format, bits;
    } kinds[] = {{LUNA_WAVE_FORMAT_PCM, 8},         {LUNA_WAVE_FORMAT_PCM, 16},
                 {LUNA_WAVE_FORMAT_PCM, 24},        {LUNA_WAVE_FORMAT_PCM, 32},
                 {LUNA_WAVE_FORMAT_IEEE_FLOAT, 32}, {LUNA_WAVE_FORMAT_IEEE_FLOAT, 64}};
    static const uint16_t channel_counts[] = {1, 2, 3, 8};
    static const uint64_t frame_counts[] = {0, 1, 7};
    static const uint64_t tails[] = {0, 8, 10, 64};
    enum { SLOT = 1024 };

    for (size_t k = 0; k < sizeof kinds / sizeof kinds[0]; k++) {
        for (size_t c = 0; c < sizeof channel_counts / sizeof channel_counts[0]; c++) {
            struct luna_wav_spec spec = {16000, channel_counts[c], kinds[k].format,
                                         kinds[k].bits};
            uint64_t block = (uint64_t)spec.channels * spec.bits / 8u;
            for (size_t fr = 0; fr < sizeof frame_counts / sizeof frame_counts[0]; fr++) {
                uint64_t data = frame_counts[fr] * block;
                for (size_t t = 0; t < sizeof tails / sizeof tails[0]; t++) {
                    uint8_t header[LUNA_WAV_MAX_HEADER];
                    int len = luna_wav_header(header, &spec, data, tails[t]);
                    EXPECT_TRUE(len > 0 && len <= LUNA_WAV_MAX_HEADER);
                    if (len <= 0)
                        continue;
                    EXPECT_TRUE(spec.bits == 24 || (uint64_t)len % (spec.bits / 8u) == 0);
                    /* A heap block of exactly the file's size: ASan sees any
                     * read past its end. The tail is a JUNK chunk. */
                    uint64_t size = (uint64_t)len + data + (data & 1u) + tails[t];
                    uint8_t *file = calloc(1, (size_t)size);
                    if (!file)
                        abort();
                    memcpy(file, header, (size_t)len);
                    if (tails[t]) {
                        uint8_t *junk = file + len + data + (data & 1u);
                        memcpy(junk, "JUNK", 4);
                        uint32_t body = (uint32_t)(tails[t] - 8u);
                        for (int b = 0; b < 4; b++)
                            junk[4 + b] = (uint8_t)(body >> (8 * b));
                    }
                    struct luna_wav_info info;
                    EXPECT_RC(luna_wav_parse_buffer(file, size, &info), 0);
                    EXPECT_TRUE(info.data_offset == (uint64_t)len &&
                                info.data_bytes == data && info.channels == spec.channels &&
                                info.bits == spec.bits && info.format == spec.format &&
                                info.samplerate == spec.samplerate);
                    free(file);
                }
                /* The same audio as a pool slot, filled from misaligned
                 * data at a misaligned slot address. */
                uint8_t *slot_block = malloc(SLOT + 1);
                uint8_t samples[8 * 8 * 7 + 1];
                if (!slot_block)
                    abort();
                memset(samples, 0x5A, sizeof samples);
                int len = luna_wav_fill_slot(slot_block + 1, SLOT, &spec, samples + 1, data);
                EXPECT_TRUE(len > 0);
                struct luna_wav_info info;
                EXPECT_RC(luna_wav_parse_buffer(slot_block + 1, SLOT, &info), 0);
                EXPECT_TRUE(info.data_bytes == data &&
                            (data == 0 || slot_block[1 + len] == 0x5A));
                free(slot_block);
            }
        }
    }
}

/* ---- 3. hostile sizes and offsets ------------------------------------- */

static char dir_path[2048];

/* A new file called name in the test's directory, its path in path; -errno (counted as
 * a failure) when it cannot be made. */
static int create_in_dir(char *path, size_t size, const char *name)
{
    snprintf(path, size, "%s/%s", dir_path, name);
    int fd = luna_create_excl(path, 0600, NULL);
    EXPECT_TRUE(fd >= 0);
    return fd;
}

static int directory_is_empty(void)
{
    DIR *d = opendir(dir_path);
    if (!d)
        return 0;
    int names = 0;
    struct dirent *e;
    while ((e = readdir(d)) != NULL)
        names += strcmp(e->d_name, ".") != 0 && strcmp(e->d_name, "..") != 0;
    closedir(d);
    return names == 0;
}

static uint64_t file_size(int fd)
{
    struct stat st;
    return fstat(fd, &st) == 0 ? (uint64_t)st.st_size : UINT64_MAX;
}

static void check_hostile_sizes(void)
{
    char path[4096], tmp_path[4096];
    snprintf(path, sizeof path, "%s/victim.wav", dir_path);
    snprintf(tmp_path, sizeof tmp_path, "%s/.victim.wav.partial", dir_path);
    const struct luna_wav_spec spec = {16000, 1, LUNA_WAVE_FORMAT_PCM, 16};
    static uint8_t data[256];
    uint8_t buf[64] = {0};

    /* files.c: permission bits only. */
    EXPECT_RC(luna_create_excl(path, 0x10000u | 0600u, NULL), -EINVAL);
    EXPECT_RC(luna_create_locked(dir_path, path, 0xFFFFFFFFu, NULL), -EINVAL);
    EXPECT_RC(luna_create_unnamed_locked(dir_path, 0xFFFFFFFFu, NULL), -EINVAL);
    EXPECT_TRUE(directory_is_empty());

    /* prefault.c: a size no file can have, or nothing to make. A prepared file
     * is exactly its size, all zeros, and never has a name. */
    EXPECT_RC(luna_prepare_file(dir_path, NULL, 0, NULL), -EINVAL);
    EXPECT_RC(luna_prepare_file(dir_path, NULL, TWO_63, NULL), -EFBIG);
    EXPECT_RC(luna_prepare_file(dir_path, NULL, UINT64_MAX, NULL), -EFBIG);
    EXPECT_RC(luna_prepare_file(NULL, NULL, 4096, NULL), -EINVAL);
    int prepared_cell = -1;
    int prepared = luna_prepare_file(dir_path, NULL, 5000, &prepared_cell);
    EXPECT_TRUE(prepared >= 0 || prepared == -EOPNOTSUPP); /* LUNA_NO_O_TMPFILE */
    if (prepared >= 0) {
        uint8_t tail[8] = {1, 1, 1, 1, 1, 1, 1, 1};
        EXPECT_TRUE(prepared_cell == prepared); /* owned from the moment it exists */
        EXPECT_RC(luna_prepare_file(dir_path, NULL, 5000, &prepared_cell), -EINVAL);
        EXPECT_TRUE(prepared_cell == prepared);
        EXPECT_TRUE(file_size(prepared) == 5000);
        EXPECT_RC(luna_read_at(prepared, 4992, tail, 8), 0);
        EXPECT_TRUE(memcmp(tail, (uint8_t[8]){0}, 8) == 0);
        EXPECT_RC(luna_fd_release(&prepared_cell), 0);
        EXPECT_TRUE(prepared_cell == -1);
    } else {
        EXPECT_TRUE(prepared_cell == -1);
    }
    int memfd_prepared = luna_prepare_file(NULL, "luna-test", 4096, &prepared_cell);
    EXPECT_TRUE(LUNA_HAS_MEMFD ? memfd_prepared >= 0 : memfd_prepared == -ENOSYS);
    EXPECT_TRUE(prepared_cell == (memfd_prepared >= 0 ? memfd_prepared : -1));
    EXPECT_RC(luna_fd_release(&prepared_cell), 0);
    EXPECT_TRUE(directory_is_empty());

    /* Fd cells: filled by the call that makes the fd, never overwritten, released once. */
    int cell = -1;
    int made = luna_create_locked(dir_path, path, 0600, &cell);
    EXPECT_TRUE(made >= 0 && cell == made);
    EXPECT_RC(luna_create_excl(tmp_path, 0600, &cell), -EINVAL);
    EXPECT_RC(luna_open_for_write(path, 0600, &(int){0}, &(uint64_t){0}, &cell), -EINVAL);
    EXPECT_RC(luna_memfd("cell", &cell), -EINVAL);
    EXPECT_RC(luna_create_unnamed_locked(dir_path, 0600, &cell), -EINVAL);
    EXPECT_TRUE(cell == made);
    EXPECT_RC(luna_fd_release(&cell), 0);
    EXPECT_TRUE(cell == -1 && fcntl(made, F_GETFD) == -1 && errno == EBADF);
    EXPECT_RC(luna_fd_release(&cell), 0);
    EXPECT_RC(luna_fd_release(NULL), -EINVAL);
    int rflags = 0;
    EXPECT_RC(luna_recv_fd(-1, NULL, 8, &cell, &rflags), -EINVAL);
    EXPECT_RC(luna_recv_fd(-1, buf, 8, NULL, &rflags), -EINVAL);
    EXPECT_RC(luna_recv_fd(-1, buf, 8, &cell, NULL), -EINVAL);
    EXPECT_RC(luna_recv_fd(-1, buf, UINT64_MAX, &cell, &rflags), -EINVAL);
    EXPECT_RC(luna_recv_fd(-1, buf, 8, &(int){3}, &rflags), -EINVAL); /* holds an fd */
    EXPECT_RC(luna_recv_fd(-1, buf, 8, &cell, &rflags), -EBADF);
    EXPECT_TRUE(cell == -1);
    EXPECT_RC(luna_dup(-1, &cell), -EBADF);
    EXPECT_RC(luna_dup(0, NULL), -EINVAL);
    EXPECT_RC(luna_dup(0, &(int){3}), -EINVAL);
    EXPECT_TRUE(cell == -1);
    made = luna_open_for_write(path, 0600, &(int){0}, &(uint64_t){0}, &cell);
    EXPECT_TRUE(made >= 0 && cell == made);
    EXPECT_RC(luna_fd_release(&cell), 0);
    unlink(path);
    EXPECT_TRUE(directory_is_empty());

    int fd = luna_create_excl(path, 0600, &cell);
    EXPECT_TRUE(fd >= 0 && cell == fd);
    if (fd < 0)
        return;
    cell = -1; /* fd is closed with luna_close below */
    EXPECT_RC(luna_write_at(fd, 0, "0123456789", 10), 0);

    /* mapping.c: space and lengths. */
    EXPECT_RC(luna_reserve(fd, TWO_63, 1), -EINVAL);
    EXPECT_RC(luna_reserve(fd, UINT64_MAX, 0), -EINVAL);
    EXPECT_RC(luna_reserve(fd, TWO_63 - 1, 1), -EFBIG);
    EXPECT_RC(luna_reserve(fd, 1, TWO_63 - 1), -EFBIG);
    EXPECT_RC(luna_reserve(fd, 0, UINT64_MAX), -EFBIG);
    EXPECT_RC(luna_set_length(fd, TWO_63), -EFBIG);
    EXPECT_RC(luna_set_length(fd, UINT64_MAX), -EFBIG);
    struct luna_mapping m = {0};
    EXPECT_RC(luna_map(fd, 0, 0, 0, &m), -EINVAL);
    EXPECT_TRUE(luna_map(fd, TWO_63, 0, 0, &m) < 0);
    EXPECT_RC(luna_map(fd, 10, 0, 0, NULL), -EINVAL);
    EXPECT_TRUE(m.addr == NULL && luna_mapping_release(&m) == 0); /* nothing mapped */
    EXPECT_RC(luna_mapping_release(NULL), -EINVAL);
    /* A struct that owns a mapping is never overwritten (the first would leak), and
     * is released once however many times it is asked. */
    EXPECT_TRUE(luna_map(fd, 10, 0, 0, &m) >= 0);
    void *first = m.addr;
    EXPECT_RC(luna_map(fd, 10, 0, 0, &m), -EINVAL);
    EXPECT_RC(luna_wav_map(path, &(struct luna_wav_info){0}, &m), -EINVAL);
    EXPECT_TRUE(m.addr == first);
    EXPECT_RC(luna_mapping_release_view(&m, first), 0);
    EXPECT_TRUE(m.addr == NULL);
    EXPECT_RC(luna_mapping_release(&m), 0);
    EXPECT_TRUE(file_size(fd) == 10);

    /* wav_io.c: offsets past off_t and ranges that pass it. */
    EXPECT_RC(luna_read_at(fd, TWO_63, buf, 1), -EINVAL);
    EXPECT_RC(luna_read_at(fd, UINT64_MAX, buf, 1), -EINVAL);
    EXPECT_RC(luna_read_at(fd, TWO_63 - 1, buf, 1), -EFBIG);
    EXPECT_RC(luna_read_at(fd, 0, buf, TWO_63), -EFBIG);
    EXPECT_RC(luna_read_at(fd, 0, buf, UINT64_MAX), -EFBIG);
    EXPECT_RC(luna_read_at(fd, 4, buf, 6), 0);
    EXPECT_RC(luna_read_at(fd, 4, buf, 7), -ENODATA);
    EXPECT_RC(luna_write_at(fd, TWO_63, buf, 1), -EINVAL);
    EXPECT_RC(luna_write_at(fd, UINT64_MAX, buf, 1), -EINVAL);
    EXPECT_RC(luna_write_at(fd, TWO_63 - 1, buf, 1), -EFBIG);
    EXPECT_RC(luna_write_at(fd, TWO_63 - 1, buf, 0), 0);
    EXPECT_RC(luna_write_at(fd, 0, buf, UINT64_MAX), -EFBIG);
    EXPECT_TRUE(file_size(fd) == 10);
    /* A struct luna_wav_file owns its fd: made empty, filled by luna_wav_open_held
     * only when empty, emptied by luna_wav_read_held whatever happened. */
    struct luna_wav_file *wf = luna_wav_file_new(sizeof *wf);
    EXPECT_TRUE(wf && wf->fd == -1 && luna_wav_file_new(8) == NULL);
    if (wf) {
        EXPECT_RC(luna_wav_open_held(path, wf), -LUNA_EFORMAT); /* "0123456789" */
        EXPECT_TRUE(wf->fd == -1);
        int dup_fd = dup(fd);
        wf->fd = dup_fd; /* as if a WAV of 10 bytes of data were open */
        wf->held = 0;
        wf->info.data_offset = 0;
        EXPECT_RC(luna_wav_open_held(path, wf), -EINVAL);
        EXPECT_RC(luna_wav_read_held(wf, buf, 11), -ENODATA);
        EXPECT_TRUE(wf->fd == -1 && fcntl(dup_fd, F_GETFD) == -1 && errno == EBADF);
        luna_wav_file_free(wf);
    }
    luna_wav_file_free(NULL);
    EXPECT_RC(luna_wav_read_held(NULL, buf, 1), -EINVAL);

    /* Whole-WAV writes: past 4 GiB, or a size no buffer can have. Nothing
     * is written, nothing is left behind. */
    EXPECT_RC(luna_set_length(fd, 0), 0);
    EXPECT_RC(luna_write_wav_fd(fd, &spec, data, TWO_32), -EFBIG);
    EXPECT_RC(luna_write_wav_fd(fd, &spec, data, TWO_63), -EFBIG);
    EXPECT_RC(luna_write_wav_fd(fd, &spec, data, UINT64_MAX), -EFBIG);
    EXPECT_TRUE(file_size(fd) == 0);
    EXPECT_RC(luna_wav_parse_fd(fd, UINT64_MAX, &(struct luna_wav_info){0}), -EFBIG);
    EXPECT_RC(luna_wav_parse_fd(fd, TWO_63, &(struct luna_wav_info){0}), -EFBIG);
    struct luna_wav_info info;
    EXPECT_RC(luna_wav_parse_fd(fd, TWO_63 - 1, &info), -LUNA_EFORMAT);
    EXPECT_TRUE(info.error && strstr(info.error, "ended before its size"));
    EXPECT_RC(luna_wav_parse_buffer(NULL, 12, &info), -EINVAL);
    luna_close(fd);
    unlink(path);
    EXPECT_RC(luna_write_wav_path(dir_path, path, tmp_path, &spec, data, UINT64_MAX),
              -EFBIG);
    EXPECT_RC(luna_write_wav_path(dir_path, path, tmp_path, &spec, data, TWO_32), -EFBIG);
    /* A replacement needs its directory: refused before anything is opened. */
    EXPECT_RC(luna_write_wav_path(NULL, path, tmp_path, &spec, data, 2), -EINVAL);
    EXPECT_RC(luna_write_wav_atomic(dir_path, path, tmp_path, &spec, data, UINT64_MAX),
              -EFBIG);
    EXPECT_TRUE(directory_is_empty());

    /* Streaming: *data_bytes + n must not wrap to a small size. */
    fd = luna_create_excl(path, 0600, NULL);
    EXPECT_TRUE(fd >= 0);
    if (fd < 0)
        return;
    uint8_t header[LUNA_WAV_MAX_HEADER];
    int hlen = luna_wav_header(header, &spec, 0, 0);
    EXPECT_TRUE(hlen > 0);
    EXPECT_RC(luna_write_at(fd, 0, header, (uint64_t)hlen), 0);
    uint64_t have = 0;
    EXPECT_RC(luna_stream_append(fd, NULL, -1, &spec, (uint64_t)hlen, &have, data, 100), 0);
    EXPECT_TRUE(have == 100);
    EXPECT_RC(luna_stream_append(fd, NULL, -1, &spec, (uint64_t)hlen, &have, data,
                                 UINT64_MAX - 50), -EFBIG); /* wraps to 49 */
    EXPECT_RC(luna_stream_append(fd, NULL, -1, &spec, (uint64_t)hlen, &have, data, TWO_32),
              -EFBIG);
    EXPECT_RC(luna_stream_append(fd, NULL, -1, &spec, (uint64_t)hlen + 2, &have, data, 2),
              -EINVAL);
    uint64_t huge = UINT64_MAX;
    EXPECT_RC(luna_stream_append(fd, NULL, -1, &spec, (uint64_t)hlen, &huge, data, 1), -EFBIG);
    EXPECT_TRUE(have == 100 && file_size(fd) == (uint64_t)hlen + 100);
    EXPECT_RC(luna_wav_parse_fd(fd, file_size(fd), &info), 0);
    EXPECT_TRUE(info.data_bytes == 100);

    /* decode.c: offsets past off_t, counts past any buffer, conversions not made,
     * and a file that ends first. */
    EXPECT_RC(luna_read_decode(fd, TWO_63, LUNA_WAVE_FORMAT_PCM, 16, buf,
                               LUNA_DECODE_FLOAT32, 1), -EINVAL);
    EXPECT_RC(luna_read_decode(fd, 0, LUNA_WAVE_FORMAT_PCM, 16, buf,
                               LUNA_DECODE_FLOAT32, UINT64_MAX), -EFBIG);
    EXPECT_RC(luna_read_decode(fd, TWO_63 - 2, LUNA_WAVE_FORMAT_PCM, 16, buf,
                               LUNA_DECODE_FLOAT32, 2), -EFBIG);
    EXPECT_RC(luna_read_decode(fd, 0, LUNA_WAVE_FORMAT_IEEE_FLOAT, 32, buf,
                               LUNA_DECODE_INT16, 1), -EINVAL);
    EXPECT_RC(luna_read_decode(fd, 0, LUNA_WAVE_FORMAT_PCM, 12, buf,
                               LUNA_DECODE_INT16, 1), -EINVAL);
    EXPECT_RC(luna_read_decode(fd, 0, LUNA_WAVE_FORMAT_PCM, 16, buf, 0, 1), -EINVAL);
    EXPECT_RC(luna_read_decode(fd, file_size(fd) - 2, LUNA_WAVE_FORMAT_PCM, 16, buf,
                               LUNA_DECODE_FLOAT32, 2), -ENODATA);
    luna_close(fd);
    unlink(path);

    /* wav_format.c: sizes that would wrap riff_size. */
    EXPECT_RC(luna_wav_header(header, &spec, 0, UINT64_MAX - 31), -EFBIG);
    EXPECT_RC(luna_wav_header(header, &spec, 0, TWO_63), -EFBIG);
    EXPECT_RC(luna_wav_header(header, &spec, 0, TWO_32), -EFBIG);
    EXPECT_RC(luna_wav_header(header, &spec, UINT64_MAX, 0), -EFBIG);
    EXPECT_RC(luna_wav_header(header, &spec, TWO_32, 0), -EFBIG);
    EXPECT_RC(luna_wav_header(header, &spec, 0xFFFFFFFFu, 0), -EFBIG);
    EXPECT_RC(luna_wav_header(header, &spec, 0, 3), -EINVAL);
    EXPECT_RC(luna_wav_header(header, &spec, 0, 9), -EINVAL);
    EXPECT_RC(luna_wav_header(header, NULL, 0, 0), -EINVAL);
    struct luna_wav_spec bad = {16000, 1, LUNA_WAVE_FORMAT_PCM, 12};
    EXPECT_RC(luna_wav_header(header, &bad, 0, 0), -EINVAL);
    uint8_t slot[512];
    EXPECT_RC(luna_wav_format_slot(slot, sizeof slot, &spec, UINT64_MAX), -EFBIG);
    EXPECT_RC(luna_wav_format_slot(slot, sizeof slot, &spec, sizeof slot), -EFBIG);
    EXPECT_RC(luna_wav_format_slot(slot, UINT64_MAX - 1, &spec, 100), -EFBIG);
    EXPECT_RC(luna_wav_format_slot(slot, UINT64_MAX, &spec, 100), -EINVAL);
    EXPECT_RC(luna_wav_fill_slot(slot, sizeof slot, &spec, data, UINT64_MAX), -EFBIG);
    EXPECT_RC(luna_wav_fill_slot(slot, sizeof slot, &spec, data, UINT64_MAX - 40), -EFBIG);
    EXPECT_RC(luna_wav_fill_slot(slot, sizeof slot, &spec, data, sizeof slot), -EFBIG);
    EXPECT_RC(luna_wav_fill_slot(slot, sizeof slot, &spec, NULL, 100), -EINVAL);
    /* A refused fill copies nothing: an odd rest of the slot (no chunk ends there), a
     * rest past 4 GiB (no JUNK chunk covers it; slot_len is only a number here). */
    memset(slot, 0xA5, sizeof slot);
    memset(data, 0x3C, 100);
    EXPECT_RC(luna_wav_fill_slot(slot, sizeof slot - 1, &spec, data, 100), -EINVAL);
    EXPECT_RC(luna_wav_fill_slot(slot, TWO_32 + 4096, &spec, data, 100), -EFBIG);
    EXPECT_RC(luna_wav_format_slot(slot, sizeof slot - 1, &spec, 100), -EINVAL);
    EXPECT_RC(luna_wav_format_slot(slot, TWO_32 + 4096, &spec, 100), -EFBIG);
    int slot_untouched = 1;
    for (size_t i = 0; i < sizeof slot; i++)
        slot_untouched &= slot[i] == 0xA5;
    EXPECT_TRUE(slot_untouched);
    EXPECT_RC(luna_wav_fill_slot(slot, sizeof slot, &spec, data, 100), 44);
    EXPECT_TRUE(slot[44] == 0x3C && slot[143] == 0x3C && slot[144] == 'J');

    /* convert.c: counts whose buffers cannot exist (3 * count wraps too). */
    EXPECT_RC(luna_float_to_pcm(data, 0, buf, 16, UINT64_MAX), -EFBIG);
    EXPECT_RC(luna_float_to_pcm(data, 1, buf, 24, UINT64_MAX / 3 + 1), -EFBIG);
    EXPECT_RC(luna_float_to_pcm(data, 1, buf, 32, TWO_63), -EFBIG);
    EXPECT_RC(luna_float_to_pcm(data, 0, buf, 12, 1), -EINVAL);
    EXPECT_RC(luna_pack_s24(data, buf, UINT64_MAX / 3 + 1), -EFBIG);
    EXPECT_RC(luna_pack_s24(data, buf, TWO_63), -EFBIG);
    EXPECT_RC(luna_unpack_s24(data, buf, UINT64_MAX), -EFBIG);
    EXPECT_RC(luna_unpack_s24(data, buf, TWO_63 / 2), -EFBIG);
    EXPECT_RC(luna_decode(data, LUNA_WAVE_FORMAT_PCM, 16, buf, LUNA_DECODE_FLOAT64,
                          UINT64_MAX), -EFBIG);
    EXPECT_RC(luna_decode(data, LUNA_WAVE_FORMAT_IEEE_FLOAT, 64, buf, LUNA_DECODE_INT32, 1),
              -EINVAL);
    EXPECT_RC(luna_decode(data, 2, 16, buf, LUNA_DECODE_FLOAT32, 1), -EINVAL);
    EXPECT_TRUE(directory_is_empty());
}

/* ---- 4. live.c: stream-state headers, parsed back; hostile arguments ---- */

static void check_live(void)
{
    static const struct luna_wav_spec kinds[] = {
        {8000, 1, LUNA_WAVE_FORMAT_PCM, 8},         {24000, 1, LUNA_WAVE_FORMAT_PCM, 16},
        {44100, 1, LUNA_WAVE_FORMAT_PCM, 24},       {48000, 1, LUNA_WAVE_FORMAT_PCM, 32},
        {16000, 1, LUNA_WAVE_FORMAT_IEEE_FLOAT, 32}, {16000, 1, LUNA_WAVE_FORMAT_IEEE_FLOAT, 64},
    };
    static const uint16_t channel_counts[] = {1, 2, 3, 7};
    static const uint64_t frame_counts[] = {0, 1, 1001};
    static uint8_t file[LUNA_WAV_MAX_HEADER + 1001 * 7 * 8 + 1];
    for (size_t k = 0; k < sizeof kinds / sizeof kinds[0]; k++) {
        for (size_t c = 0; c < sizeof channel_counts / sizeof channel_counts[0]; c++) {
            struct luna_wav_spec spec = kinds[k];
            spec.channels = channel_counts[c];
            uint64_t frame = (uint64_t)spec.channels * (spec.bits / 8u);
            uint32_t align = spec.bits == 24 ? 1u : spec.bits / 8u;
            for (size_t f = 0; f < sizeof frame_counts / sizeof frame_counts[0]; f++) {
                uint64_t bytes = frame_counts[f] * frame;
                int len = luna_live_header(file, &spec, bytes, LUNA_STREAM_LIVE);
                EXPECT_TRUE(len > 0 && len <= LUNA_WAV_MAX_HEADER && len % (int)align == 0);
                if (len <= 0)
                    continue;
                memset(file + len, 0, (size_t)(bytes + (bytes & 1u)));
                uint64_t total = (uint64_t)len + bytes + (bytes & 1u);
                struct luna_wav_info info;
                EXPECT_RC(luna_wav_parse_buffer(file, total, &info), 0);
                EXPECT_TRUE(info.stream_state == LUNA_STREAM_LIVE);
                EXPECT_TRUE(info.data_offset == (uint64_t)len && info.data_bytes == bytes);
                EXPECT_RC(luna_live_set_state(file, (uint64_t)len, LUNA_STREAM_DONE), 0);
                EXPECT_RC(luna_wav_parse_buffer(file, total, &info), 0);
                EXPECT_TRUE(info.stream_state == LUNA_STREAM_DONE);
                EXPECT_RC(luna_live_set_state(file, (uint64_t)len, LUNA_STREAM_FAIL), 0);
                EXPECT_RC(luna_wav_parse_buffer(file, total, &info), 0);
                EXPECT_TRUE(info.stream_state == LUNA_STREAM_FAIL);
            }
        }
    }
    const struct luna_wav_spec spec = {24000, 1, LUNA_WAVE_FORMAT_PCM, 16};
    uint8_t header[LUNA_WAV_MAX_HEADER];
    EXPECT_RC(luna_live_header(header, &spec, UINT64_MAX, LUNA_STREAM_LIVE), -EFBIG);
    EXPECT_RC(luna_live_header(header, &spec, 0xFFFFFFFFu, LUNA_STREAM_LIVE), -EFBIG);
    EXPECT_RC(luna_live_header(header, &spec, 0, LUNA_STREAM_NONE), -EINVAL);
    EXPECT_RC(luna_live_header(header, &spec, 0, 99), -EINVAL);
    EXPECT_RC(luna_live_header(NULL, &spec, 0, LUNA_STREAM_LIVE), -EINVAL);
    EXPECT_RC(luna_live_header(header, NULL, 0, LUNA_STREAM_LIVE), -EINVAL);
    int plain = luna_wav_header(header, &spec, 0, 0);
    EXPECT_RC(luna_live_set_state(header, (uint64_t)plain, LUNA_STREAM_DONE), -EINVAL);
    EXPECT_RC(luna_live_set_state(header, UINT64_MAX, LUNA_STREAM_DONE), -EINVAL);
    EXPECT_RC(luna_live_set_state(NULL, 60, LUNA_STREAM_DONE), -EINVAL);
    EXPECT_RC(luna_watch_open(NULL, 0, NULL), -EINVAL);
    uint64_t size = 0, counted = 0, got = 0;
    uint8_t buf[16];
    EXPECT_RC(luna_watch_read(-1, 0, -1, 44, 44, 0, buf, sizeof buf, &size, &counted, &got),
              -EINVAL);
    EXPECT_RC(luna_watch_read(-1, 0, -1, 44, 44, 2, NULL, 16, &size, &counted, &got), -EINVAL);
    EXPECT_RC(luna_watch_read(-1, 0, -1, 44, 44, 2, buf, sizeof buf, NULL, &counted, &got),
              -EINVAL);
    EXPECT_RC(luna_watch_read(-1, 0, -1, 44, 44, 2, buf, sizeof buf, &size, NULL, &got),
              -EINVAL);
    EXPECT_RC(luna_watch_read(-1, 0, -1, 8, 44, 2, buf, sizeof buf, &size, &counted, &got),
              -EINVAL); /* a data offset inside the RIFF header */
    EXPECT_RC(luna_watch_read(-1, 0, -1, 130, 200, 2, buf, sizeof buf, &size, &counted, &got),
              -EINVAL); /* past the longest header */
    EXPECT_RC(luna_watch_read(-1, 0, -1, 44, 40, 2, buf, sizeof buf, &size, &counted, &got),
              -EINVAL); /* an offset before the data */

    /* A live stream appended to through wav_io.c keeps its state chunk. */
    char path[4096];
    int fd = create_in_dir(path, sizeof path, "live.wav");
    if (fd < 0)
        return;
    int len = luna_live_header(header, &spec, 0, LUNA_STREAM_LIVE);
    EXPECT_RC(luna_write_at(fd, 0, header, (uint64_t)len), 0);
    static const uint8_t data[100];
    uint64_t have = 0;
    EXPECT_RC(luna_stream_append(fd, NULL, -1, &spec, (uint64_t)len, &have, data, 100), 0);
    struct luna_wav_info info;
    EXPECT_RC(luna_wav_parse_fd(fd, (uint64_t)len + 100, &info), 0);
    EXPECT_TRUE(info.stream_state == LUNA_STREAM_LIVE && info.data_bytes == 100);
    /* A follower reads what the header counts, never the bytes past it (here 10
     * bytes written by someone else), however much room it gives. */
    int watch = luna_watch_open(path, 0, NULL);
    EXPECT_TRUE(watch >= 0);
    EXPECT_RC(luna_write_at(fd, (uint64_t)len + 100, data, 10), 0);
    uint8_t got_bytes[64];
    EXPECT_RC(luna_watch_read(watch, 1000, fd, (uint64_t)len, (uint64_t)len, 4, got_bytes,
                              sizeof got_bytes, &size, &counted, &got), LUNA_WATCH_CHANGED);
    EXPECT_TRUE(size == (uint64_t)len + 110 && counted == 100 && got == 64);
    EXPECT_RC(luna_write_at(fd, (uint64_t)len + 110, data, 10), 0);
    EXPECT_RC(luna_watch_read(watch, 1000, fd, (uint64_t)len, (uint64_t)len + 64, 8, got_bytes,
                              sizeof got_bytes, &size, &counted, &got), LUNA_WATCH_CHANGED);
    EXPECT_TRUE(size == (uint64_t)len + 120 && counted == 100 && got == 32); /* whole blocks */
    EXPECT_RC(luna_write_at(fd, (uint64_t)len + 120, data, 10), 0);
    EXPECT_RC(luna_watch_read(watch, 1000, fd, (uint64_t)len, (uint64_t)len + 100, 4, got_bytes,
                              sizeof got_bytes, &size, &counted, &got), LUNA_WATCH_CHANGED);
    EXPECT_TRUE(size == (uint64_t)len + 130 && counted == 100 && got == 0);
    EXPECT_RC(luna_watch_wait(watch, 0), 0);
    luna_close(watch);
    EXPECT_RC(luna_set_length(fd, (uint64_t)len + 100), 0);

    /* Appending with the header mapped: the sizes are stored into the mapping. A file
     * cut below the samples appended so far (above the header page, or under it: a
     * read of the cut page is a SIGBUS the guard turns into zeros) is refused with
     * -ESTALE before anything is written: a write would extend it over a hole. */
    struct luna_mapping hm = {0};
    int hguard = luna_map(fd, (uint64_t)len, 1, 1, &hm);
    uint8_t *hmap = hm.addr;
    EXPECT_TRUE(hguard >= 0);
    if (hguard >= 0) {
        uint64_t before = have;
        EXPECT_RC(luna_stream_append(fd, hmap, hguard, &spec, (uint64_t)len, &have, data, 10),
                  0);
        EXPECT_TRUE(have == before + 10);
        EXPECT_RC(luna_wav_parse_fd(fd, (uint64_t)len + have, &info), 0);
        EXPECT_TRUE(info.data_bytes == have);
        EXPECT_RC(luna_set_length(fd, (uint64_t)len + have - 2), 0);
        EXPECT_RC(luna_stream_append(fd, hmap, hguard, &spec, (uint64_t)len, &have, data, 10),
                  -ESTALE);
        EXPECT_TRUE(have == before + 10 && file_size(fd) == (uint64_t)len + have - 2);
        EXPECT_RC(luna_guard_broken(hguard), 0);
        EXPECT_RC(luna_set_length(fd, 0), 0);
        EXPECT_TRUE(((volatile uint8_t *)hmap)[0] == 0);
        EXPECT_RC(luna_guard_broken(hguard), 1);
        EXPECT_RC(luna_stream_append(fd, hmap, hguard, &spec, (uint64_t)len, &have, data, 10),
                  -ESTALE);
        EXPECT_TRUE(have == before + 10 && file_size(fd) == 0);
        EXPECT_RC(luna_mapping_release(&hm), 0);
    }

    /* A pool-style watch: quiet through our own writes' absence, woken by an unlink. */
    EXPECT_RC(luna_watch_add(-1, path), -EBADF);
    int pool_watch = luna_watch_new(NULL);
    EXPECT_TRUE(pool_watch >= 0);
    EXPECT_RC(luna_watch_add(pool_watch, NULL), -EINVAL);
    char missing[4200];
    snprintf(missing, sizeof missing, "%s/missing", dir_path);
    EXPECT_RC(luna_watch_add(pool_watch, missing), -ENOENT);
    EXPECT_TRUE(luna_watch_add(pool_watch, path) >= 0);
    EXPECT_RC(luna_watch_wait(pool_watch, 0), 0);
    unlink(path);
    EXPECT_RC(luna_watch_wait(pool_watch, 0), LUNA_WATCH_CHANGED);
    luna_close(pool_watch);
    luna_close(fd);
    EXPECT_TRUE(directory_is_empty());
}

/* ---- 5. pool.c: a pooled write checks its slot before it copies -------- */

static void check_pool_fill(void)
{
    enum { SLOT = 8192 };
    const struct luna_wav_spec spec = {16000, 1, LUNA_WAVE_FORMAT_PCM, 16};
    uint8_t samples[32];
    memset(samples, 0x5A, sizeof samples);
    char path[4096];
    int fd = create_in_dir(path, sizeof path, "slot.wav");
    if (fd < 0)
        return;
    EXPECT_RC(luna_set_length(fd, SLOT), 0);
    struct luna_mapping m = {0};
    int guard = luna_map(fd, SLOT, 1, 1, &m);
    EXPECT_TRUE(guard >= 0);
    int watch = luna_watch_new(NULL);
    EXPECT_TRUE(watch >= 0);
    EXPECT_TRUE(luna_watch_add(watch, path) >= 0);
    if (guard < 0 || watch < 0) {
        unlink(path);
        return;
    }
    uint8_t *slot = m.addr;
    struct luna_wav_info info;

    /* A quiet watch: the slot is filled, a WAV of the samples. */
    int len = luna_pool_fill(guard, watch, slot, SLOT, &spec, samples, sizeof samples);
    EXPECT_TRUE(len > 0);
    EXPECT_RC(luna_wav_parse_buffer(slot, SLOT, &info), 0);
    EXPECT_TRUE(info.data_bytes == sizeof samples && len > 0 &&
                memcmp(slot + len, samples, sizeof samples) == 0);

    /* An event queued (another process changed the file's attributes): nothing is
     * written, the event is drained, and the next call fills. */
    memset(slot, 0xEE, SLOT);
    EXPECT_RC(fchmod(fd, 0640), 0);
    EXPECT_RC(luna_pool_fill(guard, watch, slot, SLOT, &spec, samples, sizeof samples), 0);
    int untouched = 1;
    for (size_t i = 0; i < SLOT; i++)
        untouched &= slot[i] == 0xEE;
    EXPECT_TRUE(untouched);
    EXPECT_RC(luna_watch_wait(watch, 0), 0);
    EXPECT_RC(luna_pool_fill(guard, watch, slot, SLOT, &spec, samples, sizeof samples), len);

    /* No watch (-1): filled without asking one; a watch that cannot be read counts as
     * an event. */
    EXPECT_RC(luna_pool_fill(guard, -1, slot, SLOT, &spec, samples, 2), len);
    EXPECT_RC(luna_wav_parse_buffer(slot, SLOT, &info), 0);
    EXPECT_TRUE(info.data_bytes == 2);
    int closed = dup(fd);
    EXPECT_TRUE(closed >= 0 && close(closed) == 0);
    EXPECT_RC(luna_pool_fill(guard, closed, slot, SLOT, &spec, samples, 2), 0);

    /* Hostile arguments: an unknown guard, audio that does not fit, NULLs. */
    EXPECT_RC(luna_pool_fill(-1, -1, slot, SLOT, &spec, samples, 2), -EINVAL);
    EXPECT_RC(luna_pool_fill(guard, -1, slot, SLOT, &spec, samples, SLOT), -EFBIG);
    EXPECT_RC(luna_pool_fill(guard, -1, slot, SLOT, &spec, samples, UINT64_MAX), -EFBIG);
    EXPECT_RC(luna_pool_fill(guard, -1, NULL, SLOT, &spec, samples, 2), -EINVAL);
    EXPECT_RC(luna_pool_fill(guard, -1, slot, SLOT, &spec, NULL, 2), -EINVAL);
    EXPECT_RC(luna_pool_fill(guard, -1, slot, UINT64_MAX, &spec, samples, 2), -EINVAL);

    /* The file cut under the mapping: a read of the cut page is a SIGBUS that the guard
     * turns into zeros, and from then on every call refuses the slot, before it asks
     * the watch (whose event stays queued) and before it copies. */
    EXPECT_RC(luna_set_length(fd, 0), 0);
    EXPECT_TRUE(((volatile uint8_t *)slot)[100] == 0);
    EXPECT_RC(luna_guard_broken(guard), 1);
    EXPECT_RC(luna_pool_fill(guard, watch, slot, SLOT, &spec, samples, sizeof samples),
              -ESTALE);
    EXPECT_RC(luna_pool_fill(guard, -1, slot, SLOT, &spec, samples, sizeof samples), -ESTALE);
    EXPECT_TRUE(slot[len] == 0);
    EXPECT_RC(luna_watch_wait(watch, 0), LUNA_WATCH_CHANGED);

    EXPECT_RC(luna_mapping_release(&m), 0);
    static uint8_t slot_copy[SLOT];
    memset(slot_copy, 0x5a, sizeof slot_copy);
    /* An id that names no registered mapping is unknown, never "intact": the one just
     * released, one never handed out in a block that exists, ids past the last block
     * the registry can ever have (once read out of bounds) and negative ones. */
    int unknown[] = {guard, guard + 1, 255, 256 * 4095 + 7, 1 << 20, INT_MAX, -1, INT_MIN};
    for (size_t i = 0; i < sizeof unknown / sizeof unknown[0]; i++) {
        EXPECT_RC(luna_guard_broken(unknown[i]), -EINVAL);
        EXPECT_RC(luna_guard_unregister(unknown[i]), -EINVAL);
        EXPECT_RC(luna_pool_fill(unknown[i], -1, slot_copy, SLOT, &spec, samples, 2), -EINVAL);
    }
    EXPECT_TRUE(slot_copy[0] == 0x5a && slot_copy[SLOT - 1] == 0x5a);
    /* An fd that is no inotify fd and reads 0 bytes (a file at its end): an error,
     * not a drain loop that never ends. */
    int not_a_watch = open("/dev/null", O_RDONLY | O_CLOEXEC);
    EXPECT_TRUE(not_a_watch >= 0);
    EXPECT_RC(luna_watch_wait(not_a_watch, 0), -EINVAL);
    EXPECT_RC(luna_watch_wait(not_a_watch, 100), -EINVAL);
    close(not_a_watch);
    luna_close(watch);
    luna_close(fd);
    unlink(path);
    EXPECT_TRUE(directory_is_empty());
}

/* ---- 6. mapping.c: an unnamed file, its mode exact and its lock held ----- */

static void check_unnamed_locked(void)
{
    EXPECT_RC(luna_open_unnamed_locked(dir_path, 0x10000u | 0600u), -EINVAL);
    mode_t old_umask = umask(077);
    int fd = luna_open_unnamed_locked(dir_path, 0640);
    umask(old_umask);
    if (fd == -EOPNOTSUPP)
        return; /* no O_TMPFILE here: luna_create_locked takes its named path */
    EXPECT_TRUE(fd >= 0);
    if (fd < 0)
        return;
    struct stat st;
    EXPECT_RC(fstat(fd, &st), 0);
    EXPECT_TRUE((st.st_mode & 07777) == 0640);
    /* Another open file description of it cannot take an exclusive lock: ours is held. */
    char proc_path[64];
    snprintf(proc_path, sizeof proc_path, "/proc/self/fd/%d", fd);
    int other = open(proc_path, O_RDONLY | O_CLOEXEC);
    EXPECT_TRUE(other >= 0);
    if (other >= 0) {
        EXPECT_TRUE(flock(other, LOCK_EX | LOCK_NB) != 0 && errno == EWOULDBLOCK);
        EXPECT_RC(flock(other, LOCK_SH | LOCK_NB), 0);
        close(other);
    }
    luna_close(fd);
    EXPECT_TRUE(directory_is_empty()); /* it never had a name */
}

/* ---- 7. mapping.c: a mapping cut to a shorter file ------------------------- */

static void check_mapping_cut(void)
{
    char path[4096];
    int fd = create_in_dir(path, sizeof path, "cut.wav");
    if (fd < 0)
        return;
    EXPECT_RC(luna_set_length(fd, 3 * 4096), 0);
    struct luna_mapping m = {0};
    int guard = luna_map(fd, 3 * 4096, 1, 1, &m);
    EXPECT_TRUE(guard >= 0);
    EXPECT_RC(luna_mapping_cut(NULL, 100), -EINVAL);
    EXPECT_RC(luna_mapping_cut(&m, 0), -EINVAL);
    EXPECT_RC(luna_mapping_cut(&m, 3 * 4096 + 1), -EINVAL);
    EXPECT_RC(luna_mapping_cut(&m, 5000), 0);
    EXPECT_TRUE(m.len == 3 * 4096); /* still mapped whole, for the release */
    EXPECT_RC(luna_set_length(fd, 5000), 0);
    /* The kept pages are whole and guarded, and the guard sees nothing lost. */
    ((volatile uint8_t *)m.addr)[4999] = 7;
    EXPECT_RC(luna_guard_broken(guard), 0);
    EXPECT_RC(luna_mapping_cut(&m, 6000), -EINVAL); /* never longer again */
    EXPECT_RC(luna_mapping_cut(&m, 4500), 0);
    /* A cut of the guarded part is still absorbed: zeros, and broken. */
    EXPECT_RC(luna_set_length(fd, 0), 0);
    EXPECT_TRUE(((volatile uint8_t *)m.addr)[4499] == 0);
    EXPECT_RC(luna_guard_broken(guard), 1);
    EXPECT_RC(luna_mapping_cut(&m, 100), -EINVAL); /* broken: left as it is */
    EXPECT_RC(luna_mapping_release(&m), 0);
    EXPECT_RC(luna_mapping_cut(&m, 100), -EINVAL); /* released */
    luna_close(fd);
    unlink(path);
    EXPECT_TRUE(directory_is_empty());
}

/* ---- 7b. mapping.c: a file rewritten to another length under its mapping -- */

static void check_mapping_check_size(void)
{
    char path[4096];
    int fd = create_in_dir(path, sizeof path, "resized.wav");
    if (fd < 0)
        return;
    EXPECT_RC(luna_set_length(fd, 3 * 4096), 0);
    struct luna_mapping m = {0};
    EXPECT_RC(luna_mapping_check_size(NULL, fd, 3 * 4096), -EINVAL);
    EXPECT_RC(luna_mapping_check_size(&m, fd, 3 * 4096), -EINVAL); /* nothing mapped */
    int guard = luna_map(fd, 3 * 4096, 1, 1, &m);
    EXPECT_TRUE(guard >= 0);
    ((volatile uint8_t *)m.addr)[0] = 7;
    EXPECT_RC(luna_mapping_check_size(&m, fd, 3 * 4096), 0);
    EXPECT_RC(luna_mapping_check_size(&m, -1, 3 * 4096), -EBADF);
    EXPECT_RC(luna_guard_broken(guard), 0);
    /* Cut to one page: nothing we touch is lost, yet the file is not ours any more. */
    EXPECT_RC(luna_set_length(fd, 4096), 0);
    EXPECT_RC(luna_mapping_check_size(&m, fd, 3 * 4096), 1);
    EXPECT_RC(luna_guard_broken(guard), 1);
    EXPECT_TRUE(((volatile uint8_t *)m.addr)[0] == 0); /* zeros, as after a fault */
    ((volatile uint8_t *)m.addr)[5] = 9;              /* reaching no file */
    uint8_t byte = 1;
    EXPECT_TRUE(pread(fd, &byte, 1, 5) == 1 && byte == 0);
    EXPECT_RC(luna_mapping_check_size(&m, fd, 4096), 1); /* broken stays broken */
    EXPECT_RC(luna_mapping_release(&m), 0);
    EXPECT_RC(luna_mapping_check_size(&m, fd, 4096), -EINVAL); /* released */
    luna_close(fd);
    unlink(path);
    EXPECT_TRUE(directory_is_empty());
}

/* ---- 7c. wav_io.c: system calls on a mapping whose file was cut ------------ */

static void check_efault_from_a_cut_mapping(void)
{
    char path[4096], other_path[4096];
    int fd = create_in_dir(path, sizeof path, "cut_source.wav");
    int other = create_in_dir(other_path, sizeof other_path, "other.raw");
    if (fd < 0 || other < 0)
        return;
    const uint64_t len = 3 * 4096;
    EXPECT_RC(luna_set_length(fd, len), 0);
    struct luna_mapping m = {0};
    int guard = luna_map(fd, len, 1, 1, &m);
    EXPECT_TRUE(guard >= 0);
    memset(m.addr, 5, (size_t)len);
    /* The kernel's copy finds the pages gone (EFAULT, no SIGBUS): the guard breaks the
     * mapping, and the write goes on with zeros, as numpy would read them. */
    EXPECT_RC(luna_set_length(fd, 0), 0);
    EXPECT_RC(luna_write_at(other, 0, m.addr, len), 0);
    EXPECT_RC(luna_guard_broken(guard), 1);
    EXPECT_TRUE(file_size(other) == len);
    uint8_t back[3 * 4096];
    EXPECT_RC(luna_read_at(other, 0, back, len), 0);
    int zeros = 1;
    for (size_t i = 0; i < sizeof back; i++)
        zeros &= back[i] == 0;
    EXPECT_TRUE(zeros);
    EXPECT_RC(luna_mapping_release(&m), 0);
    /* Read into a mapping whose file was cut: read whole, into zero pages. */
    EXPECT_RC(luna_set_length(fd, len), 0);
    guard = luna_map(fd, len, 1, 1, &m);
    EXPECT_TRUE(guard >= 0);
    EXPECT_RC(luna_set_length(fd, 100), 0);
    memset(back, 9, sizeof back);
    EXPECT_RC(luna_write_at(other, 0, back, len), 0);
    EXPECT_RC(luna_read_at(other, 0, m.addr, len), 0);
    EXPECT_RC(luna_guard_broken(guard), 1);
    EXPECT_TRUE(((uint8_t *)m.addr)[0] == 9 && ((uint8_t *)m.addr)[len - 1] == 9);
    EXPECT_TRUE(file_size(fd) == 100);
    EXPECT_RC(luna_mapping_release(&m), 0);
    /* A mapping that is not ours stays not ours: EFAULT, nothing touched. */
    EXPECT_RC(luna_set_length(fd, len), 0);
    void *theirs = mmap(NULL, (size_t)len, PROT_READ, MAP_SHARED, fd, 0);
    EXPECT_TRUE(theirs != MAP_FAILED);
    if (theirs != MAP_FAILED) {
        EXPECT_RC(luna_set_length(fd, 0), 0);
        EXPECT_RC(luna_write_at(other, 0, theirs, len), -EFAULT);
        EXPECT_RC(luna_read_at(other, 0, theirs, 0), 0);
        munmap(theirs, (size_t)len);
    }
    luna_close(fd);
    luna_close(other);
    unlink(path);
    unlink(other_path);
    EXPECT_TRUE(directory_is_empty());
}

/* ---- 8. files.c: what luna_create_excl says of a path ending in "/" ------ */

static void check_create_excl_trailing_slash(void)
{
    char path[4096];
    snprintf(path, sizeof path, "%s/sub", dir_path);
    EXPECT_RC(mkdir(path, 0700), 0);
    EXPECT_RC(luna_create_excl(path, 0600, NULL), -EEXIST);
    snprintf(path, sizeof path, "%s/sub/", dir_path);
    EXPECT_RC(luna_create_excl(path, 0600, NULL), -EISDIR);
    snprintf(path, sizeof path, "%s/none/", dir_path);
    EXPECT_RC(luna_create_excl(path, 0600, NULL), -EISDIR);
    snprintf(path, sizeof path, "%s/sub", dir_path);
    EXPECT_RC(rmdir(path), 0);
    EXPECT_TRUE(directory_is_empty());
}

/* luna_wav_parse_fd reads a file's first 512 bytes in one pread: a header past them is
 * read from the file, a file shorter than the size it is told is no error as long as
 * the header is there, and what it parses agrees with luna_wav_parse_buffer. */
static void check_parse_fd_prefix(void)
{
    char path[4096];
    int fd = create_in_dir(path, sizeof path, "prefix.wav");
    if (fd < 0)
        return;
    const struct luna_wav_spec spec = {22050, 2, LUNA_WAVE_FORMAT_PCM, 16};
    uint8_t header[LUNA_WAV_MAX_HEADER];
    int hlen = luna_wav_header(header, &spec, 100, 0);
    EXPECT_TRUE(hlen == 44);
    static uint8_t file[44 + 8 + 1000 + 100]; /* the LIST case below */
    memcpy(file, header, 44);
    EXPECT_RC(luna_write_at(fd, 0, file, 44 + 100), 0);
    struct luna_wav_info info, from_buffer;
    /* The file is 144 bytes; the caller says 1,144 (it shrank since its fstat). */
    EXPECT_RC(luna_wav_parse_fd(fd, 44 + 100 + 1000, &info), 0);
    EXPECT_TRUE(info.data_offset == 44 && info.data_bytes == 100 && info.samplerate == 22050);

    /* A 1,000-byte LIST chunk first: the fmt and data chunks lie past the prefix. */
    memcpy(file, header, 12);
    memcpy(file + 12, "LIST", 4);
    file[16] = 1000 & 0xff, file[17] = 1000 >> 8, file[18] = 0, file[19] = 0;
    memset(file + 20, 'x', 1000);
    memcpy(file + 1020, header + 12, 32); /* fmt (24 bytes) and the data chunk's header */
    uint32_t riff = (uint32_t)sizeof file - 8;
    for (int i = 0; i < 4; i++)
        file[4 + i] = (uint8_t)(riff >> (8 * i));
    EXPECT_RC(luna_set_length(fd, 0), 0);
    EXPECT_RC(luna_write_at(fd, 0, file, sizeof file), 0);
    EXPECT_RC(luna_wav_parse_fd(fd, sizeof file, &info), 0);
    EXPECT_RC(luna_wav_parse_buffer(file, sizeof file, &from_buffer), 0);
    EXPECT_TRUE(info.data_offset == 1052 && info.data_bytes == 100 &&
                info.channels == 2 && info.samplerate == 22050);
    EXPECT_TRUE(from_buffer.data_offset == info.data_offset &&
                from_buffer.data_bytes == info.data_bytes);
    /* Cut inside the fmt chunk, past the prefix: the file ended before its size. */
    EXPECT_RC(luna_set_length(fd, 1030), 0);
    EXPECT_RC(luna_wav_parse_fd(fd, sizeof file, &info), -LUNA_EFORMAT);
    EXPECT_TRUE(info.error && strstr(info.error, "ended before its size"));
    luna_close(fd);
    unlink(path);

    /* Not a file that pread can read: its errno. */
    int dir = open(dir_path, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    EXPECT_TRUE(dir >= 0);
    if (dir >= 0) {
        EXPECT_RC(luna_wav_parse_fd(dir, 4096, &info), -EISDIR);
        close(dir);
    }
}

/* luna_pin_shared: a regular file is opened and flocked shared into its cell; a busy lock
 * leaves it opened and unlocked (the caller waits); a symlink, FIFO or directory is never
 * an entry, and its cell stays empty. luna_wav_map_fd maps through the pinned fd. */
static void check_pin_shared(void)
{
    char path[4096], other[4096];
    int fd = create_in_dir(path, sizeof path, "entry.wav");
    if (fd < 0)
        return;
    const struct luna_wav_spec spec = {16000, 1, LUNA_WAVE_FORMAT_PCM, 16};
    uint8_t header[LUNA_WAV_MAX_HEADER];
    EXPECT_TRUE(luna_wav_header(header, &spec, 32, 0) == 44);
    EXPECT_RC(luna_write_at(fd, 0, header, 44 + 32), 0);
    struct luna_pinned pinned;
    int cell = -1;
    EXPECT_RC(luna_pin_shared(NULL, &cell, &pinned), -EINVAL);
    EXPECT_RC(luna_pin_shared(path, NULL, &pinned), -EINVAL);
    EXPECT_RC(luna_pin_shared(path, &cell, NULL), -EINVAL);
    EXPECT_TRUE(cell == -1);

    int got = luna_pin_shared(path, &cell, &pinned);
    EXPECT_TRUE(got >= 0 && cell == got && pinned.locked == 1 && pinned.nlink == 1 &&
                pinned.size == 76 && S_ISREG(pinned.mode) && pinned.mtime_ns > 0);
    EXPECT_RC(luna_pin_shared(path, &cell, &pinned), -EINVAL); /* the cell holds an fd */
    EXPECT_RC(flock(fd, LOCK_EX | LOCK_NB), -1);               /* our shared lock holds */
    struct luna_wav_info info;
    struct luna_mapping m = {0};
    EXPECT_RC(luna_wav_map_fd(got, 76, NULL, &m), -EINVAL);
    EXPECT_TRUE(luna_wav_map_fd(got, 76, &info, &m) >= 0);
    EXPECT_TRUE(info.data_offset == 44 && info.data_bytes == 32 && m.addr != NULL);
    EXPECT_RC(luna_wav_map_fd(got, 76, &info, &m), -EINVAL); /* m in use */
    EXPECT_RC(luna_mapping_release(&m), 0);
    EXPECT_RC(luna_fd_release(&cell), 0);

    /* Another open file holds it exclusively: opened, not locked, the cell holds it. */
    EXPECT_RC(flock(fd, LOCK_EX | LOCK_NB), 0);
    got = luna_pin_shared(path, &cell, &pinned);
    EXPECT_TRUE(got >= 0 && cell == got && pinned.locked == 0 && pinned.nlink == 1);
    EXPECT_RC(luna_fd_release(&cell), 0);
    EXPECT_RC(flock(fd, LOCK_UN), 0);
    luna_close(fd);

    /* Removed: ENOENT; a symlink to it: ELOOP; a FIFO, a directory: not a regular file. */
    EXPECT_RC(unlink(path), 0);
    EXPECT_RC(luna_pin_shared(path, &cell, &pinned), -ENOENT);
    snprintf(other, sizeof other, "%s/elsewhere", dir_path);
    EXPECT_RC(symlink(other, path), 0);
    EXPECT_RC(luna_pin_shared(path, &cell, &pinned), -ELOOP);
    EXPECT_RC(unlink(path), 0);
    EXPECT_RC(mkfifo(path, 0600), 0);
    EXPECT_RC(luna_pin_shared(path, &cell, &pinned), -LUNA_EFORMAT);
    EXPECT_RC(unlink(path), 0);
    EXPECT_RC(mkdir(path, 0700), 0);
    EXPECT_RC(luna_pin_shared(path, &cell, &pinned), -LUNA_EFORMAT);
    EXPECT_RC(rmdir(path), 0);
    EXPECT_TRUE(cell == -1);
    EXPECT_TRUE(directory_is_empty());
}

int main(int argc, char **argv)
{
    if (argc != 3 || strcmp(argv[1], "-t") != 0) {
        fprintf(stderr, "usage: %s -t DIR\n", argv[0]);
        return 2;
    }
    int n = snprintf(dir_path, sizeof dir_path, "%s", argv[2]);
    if (n < 0 || (size_t)n >= sizeof dir_path || !directory_is_empty()) {
        fprintf(stderr, "hostile_args: %s must be an empty directory\n", argv[2]);
        return 2;
    }
    check_converters();
    check_headers();
    check_hostile_sizes();
    check_live();
    check_pool_fill();
    check_unnamed_locked();
    check_mapping_cut();
    check_mapping_check_size();
    check_efault_from_a_cut_mapping();
    check_create_excl_trailing_slash();
    check_parse_fd_prefix();
    check_pin_shared();
    printf("%d passed, %d failed\n", passed, failed);
    return failed ? 1 : 0;
}
