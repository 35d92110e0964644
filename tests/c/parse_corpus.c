/* parse_corpus.c - run the C WAV parser over files, for a sanitizer build.
 *
 * Build (tests/test_wav_parser.py does this, into a temporary directory):
 *
 *   gcc -std=gnu11 -Wall -Wextra -Werror -g -O1 -fno-omit-frame-pointer \
 *       -fsanitize=address,undefined -fsanitize=alignment -fno-sanitize-recover=all \
 *       -Icsrc tests/c/parse_corpus.c csrc/[a-z]*.c -o parse_corpus
 *
 * Usage: parse_corpus [-t DIR] FILE...
 *
 * Each FILE is parsed three ways, which must agree:
 *   1. luna_wav_parse_buffer on a heap block of exactly the file's size, so
 *      that AddressSanitizer reports any read past its end;
 *   2. luna_wav_parse_fd on a scratch copy (a file made in DIR and unlinked at
 *      once; DIR defaults to $TMPDIR, then ".");
 *   3. luna_wav_open on FILE itself.
 * An accepted file must satisfy the parser's promises: the data range lies in
 * the file, frames * block_align == data_bytes, channels >= 1, rate >= 1, and
 * the format fields are consistent. A rejected file must carry a reason.
 *
 * Prints one tab-separated line per file on stdout:
 *   FILE OK samplerate channels format bits block_align extensible
 *           data_offset data_bytes frames
 *   FILE ERR reason
 * Exits 0 when every file passed, 1 when a promise was broken or the parses
 * disagree (details on stderr), 2 on a usage or I/O error. A sanitizer
 * finding aborts the program with its report on stderr.
 */
#include "luna_shm.h"

#include <errno.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

static int failures;

static void broken(const char *path, const char *what)
{
    fprintf(stderr, "parse_corpus: %s: %s\n", path, what);
    failures++;
}

/* Read all of path into a malloc'd block of exactly its size (1 byte for an
 * empty file, which is never read). Returns NULL on an I/O error. */
static uint8_t *slurp(const char *path, uint64_t *len)
{
    FILE *f = fopen(path, "rb");
    if (!f)
        return NULL;
    struct stat st;
    if (fstat(fileno(f), &st) != 0 || st.st_size < 0) {
        fclose(f);
        return NULL;
    }
    size_t n = (size_t)st.st_size;
    uint8_t *buf = malloc(n ? n : 1);
    if (buf && n && fread(buf, 1, n, f) != n) {
        free(buf);
        buf = NULL;
    }
    fclose(f);
    *len = n;
    return buf;
}

static int write_all_at0(int fd, const uint8_t *buf, uint64_t len)
{
    if (ftruncate(fd, 0) != 0)
        return -errno;
    /* luna_write_at(fd, 0, buf, 0) fails with -EIO (pwritev returns 0): skip. */
    return len ? luna_write_at(fd, 0, buf, len) : 0;
}

/* The promises of an accepted parse (rc == 0) or of a rejection. */
static void check_result(const char *path, const char *how, int rc,
                         const struct luna_wav_info *in, uint64_t len)
{
    char what[160];
    if (rc == -LUNA_EFORMAT) {
        if (in->error == NULL || in->error[0] == '\0') {
            snprintf(what, sizeof what, "%s: rejected without a reason", how);
            broken(path, what);
        }
        return;
    }
    if (rc != 0) {
        snprintf(what, sizeof what, "%s: unexpected result %d", how, rc);
        broken(path, what);
        return;
    }
    const char *bad = NULL;
    if (in->channels < 1)
        bad = "channels < 1";
    else if (in->samplerate < 1)
        bad = "samplerate < 1";
    else if (in->format != LUNA_WAVE_FORMAT_PCM &&
             in->format != LUNA_WAVE_FORMAT_IEEE_FLOAT)
        bad = "format is neither PCM nor IEEE float";
    else if (in->bits != 8 && in->bits != 16 && in->bits != 24 &&
             in->bits != 32 && in->bits != 64)
        bad = "container bits not 8, 16, 24, 32 or 64";
    else if ((uint64_t)in->block_align != (uint64_t)in->channels * in->bits / 8)
        bad = "block_align != channels * bits / 8";
    else if (in->frames * in->block_align != in->data_bytes)
        bad = "frames * block_align != data_bytes";
    else if (in->data_offset < 20 || in->data_offset > len)
        bad = "data_offset outside the file";
    else if (in->data_bytes > len - in->data_offset)
        bad = "data runs past the end of the input";
    else if (in->file_size != len)
        bad = "file_size != input length";
    if (bad) {
        snprintf(what, sizeof what, "%s: accepted, but %s", how, bad);
        broken(path, what);
    }
}

static int same(int rc_a, const struct luna_wav_info *a, int rc_b,
                const struct luna_wav_info *b)
{
    if (rc_a != rc_b)
        return 0;
    if (rc_a != 0)
        return a->error && b->error && strcmp(a->error, b->error) == 0;
    return a->samplerate == b->samplerate && a->channels == b->channels &&
           a->format == b->format && a->bits == b->bits &&
           a->block_align == b->block_align && a->extensible == b->extensible &&
           a->data_offset == b->data_offset && a->data_bytes == b->data_bytes &&
           a->frames == b->frames && a->file_size == b->file_size;
}

static int scratch_file(const char *dir)
{
    char name[4096];
    int n = snprintf(name, sizeof name, "%s/parse_corpus_XXXXXX", dir);
    if (n < 0 || (size_t)n >= sizeof name)
        return -ENAMETOOLONG;
    int fd = mkstemp(name);
    if (fd < 0)
        return -errno;
    unlink(name); /* nothing is left behind, whatever happens next */
    return fd;
}

int main(int argc, char **argv)
{
    const char *dir = getenv("TMPDIR");
    int first = 1;
    if (argc > 2 && strcmp(argv[1], "-t") == 0) {
        dir = argv[2];
        first = 3;
    }
    if (dir == NULL || dir[0] == '\0')
        dir = ".";
    if (first >= argc) {
        fprintf(stderr, "usage: %s [-t DIR] FILE...\n", argv[0]);
        return 2;
    }
    int scratch = scratch_file(dir);
    if (scratch < 0) {
        fprintf(stderr, "parse_corpus: scratch file in %s: %s\n", dir,
                strerror(-scratch));
        return 2;
    }

    for (int i = first; i < argc; i++) {
        const char *path = argv[i];
        uint64_t len = 0;
        uint8_t *buf = slurp(path, &len);
        if (!buf) {
            fprintf(stderr, "parse_corpus: cannot read %s: %s\n", path,
                    strerror(errno));
            close(scratch);
            return 2;
        }

        struct luna_wav_info from_buf, from_fd, from_open;
        int rc_buf = luna_wav_parse_buffer(buf, len, &from_buf);
        check_result(path, "luna_wav_parse_buffer", rc_buf, &from_buf, len);

        int rc = write_all_at0(scratch, buf, len);
        if (rc < 0) {
            fprintf(stderr, "parse_corpus: scratch copy of %s: %s\n", path,
                    strerror(-rc));
            free(buf);
            close(scratch);
            return 2;
        }
        int rc_fd = luna_wav_parse_fd(scratch, len, &from_fd);
        check_result(path, "luna_wav_parse_fd", rc_fd, &from_fd, len);
        if (!same(rc_buf, &from_buf, rc_fd, &from_fd))
            broken(path, "luna_wav_parse_fd disagrees with luna_wav_parse_buffer");

        int fd = luna_wav_open(path, &from_open, NULL);
        if (fd >= 0) {
            close(fd);
            fd = 0;
        }
        check_result(path, "luna_wav_open", fd, &from_open, len);
        if (!same(rc_buf, &from_buf, fd, &from_open))
            broken(path, "luna_wav_open disagrees with luna_wav_parse_buffer");

        if (rc_buf == 0)
            printf("%s\tOK\t%" PRIu32 "\t%u\t%u\t%u\t%u\t%d\t%" PRIu64 "\t%" PRIu64
                   "\t%" PRIu64 "\n",
                   path, from_buf.samplerate, from_buf.channels, from_buf.format,
                   from_buf.bits, from_buf.block_align, (int)from_buf.extensible,
                   from_buf.data_offset, from_buf.data_bytes, from_buf.frames);
        else
            printf("%s\tERR\t%s\n", path,
                   from_buf.error ? from_buf.error : "(no reason)");
        free(buf);
    }
    close(scratch);
    return failures ? 1 : 0;
}
