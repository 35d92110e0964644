/* fuzz_wav_parser.c - libFuzzer harness for the C WAV parser.
 *
 * Build and run (the Makefile's `fuzz` target does this):
 *
 *   clang -std=gnu11 -g -O1 -fsanitize=fuzzer,address,undefined \
 *         -fno-sanitize-recover=all -Icsrc tests/c/fuzz_wav_parser.c \
 *         csrc/[a-z]*.c -o fuzz_wav_parser
 *   ./fuzz_wav_parser -max_total_time=60 -max_len=8192 CORPUS_DIR
 *
 * Each input is parsed three ways: with luna_wav_parse_buffer straight from
 * libFuzzer's buffer (allocated to the input's exact size, so
 * AddressSanitizer catches a read past its end); with luna_wav_parse_fd from
 * an anonymous memory file holding the same bytes (pread only); and with
 * luna_wav_open on that file's /proc/self/fd path (a 4 KiB prefix in memory,
 * the rest with pread: inputs over 4 KiB, -max_len=8192, cross that border).
 * The harness aborts, and libFuzzer saves the input, when a promise of the
 * parser is broken:
 *   - an accepted input has channels >= 1, samplerate >= 1, a PCM or float
 *     format of 8/16/24/32/64-bit containers, block_align == channels *
 *     bits / 8, frames * block_align == data_bytes, and
 *     data_offset + data_bytes <= len;
 *   - a rejected input carries a reason (-LUNA_EFORMAT and a non-empty error);
 *   - all three give the same answer.
 */
#include "luna_shm.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

static int memfd = -1;
static char memfd_path[64];

static void broken(const char *what)
{
    fprintf(stderr, "fuzz_wav_parser: %s\n", what);
    abort();
}

static void check(int rc, const struct luna_wav_info *in, uint64_t len)
{
    if (rc == -LUNA_EFORMAT) {
        if (in->error == NULL || in->error[0] == '\0')
            broken("rejected without a reason");
        return;
    }
    if (rc != 0)
        broken("a result that is neither 0 nor -LUNA_EFORMAT");
    if (in->channels < 1)
        broken("accepted with channels < 1");
    if (in->samplerate < 1)
        broken("accepted with samplerate < 1");
    if (in->format != LUNA_WAVE_FORMAT_PCM &&
        in->format != LUNA_WAVE_FORMAT_IEEE_FLOAT)
        broken("accepted a format that is neither PCM nor IEEE float");
    if (in->bits != 8 && in->bits != 16 && in->bits != 24 && in->bits != 32 &&
        in->bits != 64)
        broken("accepted container bits not 8, 16, 24, 32 or 64");
    if ((uint64_t)in->block_align != (uint64_t)in->channels * in->bits / 8)
        broken("accepted with block_align != channels * bits / 8");
    if (in->frames * in->block_align != in->data_bytes)
        broken("accepted with frames * block_align != data_bytes");
    if (in->data_offset > len || in->data_bytes > len - in->data_offset)
        broken("accepted a data range that is not inside the input");
    if (in->file_size != len)
        broken("file_size is not the input's length");
}

static int same(int rc_a, const struct luna_wav_info *a, int rc_b,
                const struct luna_wav_info *b)
{
    if (rc_a != rc_b)
        return 0;
    if (rc_a != 0)
        return strcmp(a->error, b->error) == 0;
    return a->samplerate == b->samplerate && a->channels == b->channels &&
           a->format == b->format && a->bits == b->bits &&
           a->block_align == b->block_align && a->extensible == b->extensible &&
           a->data_offset == b->data_offset && a->data_bytes == b->data_bytes &&
           a->frames == b->frames && a->file_size == b->file_size;
}

int LLVMFuzzerInitialize(int *argc, char ***argv)
{
    (void)argc;
    (void)argv;
    memfd = memfd_create("fuzz_wav_parser", MFD_CLOEXEC);
    if (memfd < 0) {
        perror("memfd_create");
        abort();
    }
    snprintf(memfd_path, sizeof memfd_path, "/proc/self/fd/%d", memfd);
    return 0;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    struct luna_wav_info from_buf, from_fd, from_open;
    int rc_buf = luna_wav_parse_buffer(data, size, &from_buf);
    check(rc_buf, &from_buf, size);

    if (ftruncate(memfd, 0) != 0 ||
        (size && luna_write_at(memfd, 0, data, size) != 0))
        broken("cannot fill the memory file");
    int rc_fd = luna_wav_parse_fd(memfd, size, &from_fd);
    check(rc_fd, &from_fd, size);

    if (!same(rc_buf, &from_buf, rc_fd, &from_fd))
        broken("luna_wav_parse_fd and luna_wav_parse_buffer disagree");

    int fd = luna_wav_open(memfd_path, &from_open, NULL);
    if (fd >= 0) {
        close(fd);
        fd = 0;
    }
    check(fd, &from_open, size);
    if (!same(rc_buf, &from_buf, fd, &from_open))
        broken("luna_wav_open and luna_wav_parse_buffer disagree");
    return 0;
}
