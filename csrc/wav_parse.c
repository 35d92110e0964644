/* wav_parse.c - reading RIFF/WAVE headers from a buffer or a file.
 *
 * One parser for both sources: it asks a source for byte ranges and never
 * trusts a size field without checking it against the source's length, so
 * whatever the bytes, nothing outside the buffer or file is ever read.
 */
#include "luna_internal.h"

#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

/* Chunks walked before the audio, at most: a file of millions of tiny chunks
 * is an attack on our time, not a WAV. */
#define MAX_CHUNKS 65536

/* The data size sox writes when it cannot seek back to fix the header (its
 * output is a pipe), rounded down to whole blocks: "length unknown". sox and
 * libsndfile then read the data to the end of the file; so do we. */
#define SOX_UNSPECIFIED_SIZE 0x7ffff000u

/* The first buf_len bytes are in buf; the rest, if any, is read from fd. */
struct source {
    const uint8_t *buf;
    uint64_t buf_len;
    int fd;
    uint64_t size;
};

static const uint8_t guid_tail[14] = {0x00, 0x00, 0x00, 0x00, 0x10, 0x00, 0x80,
                                      0x00, 0x00, 0xaa, 0x00, 0x38, 0x9b, 0x71};

/* Why a file ended before the size that fstat gave: procfs and sysfs files
 * say 0 or 4096 bytes whatever they hold, and a file can shrink under us. */
static const char *const ended_early =
    "file ended before its size (a /proc or /sys file, or it shrank while "
    "it was read)";

/* Copy [off, off+n) of the source into dst; the caller has checked the
 * range against src->size. Returns 0, -LUNA_EFORMAT when the file ended
 * first (out->error set), or -errno. */
static int source_read(const struct source *src, uint64_t off, void *dst,
                       size_t n, struct luna_wav_info *out)
{
    if (off <= src->buf_len && n <= src->buf_len - off) {
        memcpy(dst, src->buf + off, n);
        return 0;
    }
    int rc = luna_read_at(src->fd, off, dst, n);
    if (rc == -ENODATA) {
        out->error = ended_early;
        return -LUNA_EFORMAT;
    }
    return rc;
}

static uint32_t get_u16(const uint8_t *p)
{
    return (uint32_t)p[0] | ((uint32_t)p[1] << 8);
}

static uint32_t get_u32(const uint8_t *p)
{
    return (uint32_t)p[0] | ((uint32_t)p[1] << 8) | ((uint32_t)p[2] << 16) |
           ((uint32_t)p[3] << 24);
}

/* True when the 8 bytes at hdr look like a chunk header whose body fits in
 * room bytes: an id of four printable ASCII characters (the first no space).
 * Audio does not start so: silence is zeros, and samples are not text. */
static int is_chunk_header(const uint8_t *hdr, uint64_t room)
{
    for (int i = 0; i < 4; i++)
        if (hdr[i] < 0x20 || hdr[i] > 0x7e || (i == 0 && hdr[i] == ' '))
            return 0;
    return get_u32(hdr + 4) <= room;
}

/* The LUNA_STREAM_* value of a state chunk's four state bytes. */
static int32_t stream_state_of(const uint8_t *tag)
{
    if (memcmp(tag, "live", 4) == 0)
        return LUNA_STREAM_LIVE;
    if (memcmp(tag, "done", 4) == 0)
        return LUNA_STREAM_DONE;
    if (memcmp(tag, "fail", 4) == 0)
        return LUNA_STREAM_FAIL;
    return LUNA_STREAM_NONE;
}

static int fail(struct luna_wav_info *out, const char *why)
{
    out->error = why;
    return -LUNA_EFORMAT;
}

/* Read and check the fmt chunk body (size bytes at off). */
static int parse_fmt(const struct source *src, uint64_t off, uint32_t size,
                     struct luna_wav_info *out)
{
    uint8_t f[40];
    if (size < 16)
        return fail(out, "fmt chunk is shorter than 16 bytes");
    if (size > src->size - off)
        return fail(out, "fmt chunk runs past the end of the file");
    int rc = source_read(src, off, f, size < 40 ? size : 40, out);
    if (rc < 0)
        return rc;

    uint32_t tag = get_u16(f);
    uint32_t channels = get_u16(f + 2);
    uint32_t rate = get_u32(f + 4);
    uint32_t block_align = get_u16(f + 12);
    uint32_t bits = get_u16(f + 14);
    if (tag == LUNA_WAVE_FORMAT_EXTENSIBLE) {
        if (size < 40 || get_u16(f + 16) < 22)
            return fail(out, "WAVE_FORMAT_EXTENSIBLE fmt chunk is too short");
        if (memcmp(f + 26, guid_tail, sizeof guid_tail) != 0)
            return fail(out, "unknown WAVE_FORMAT_EXTENSIBLE subformat GUID");
        tag = get_u16(f + 24);
        out->extensible = 1;
    }
    if (tag != LUNA_WAVE_FORMAT_PCM && tag != LUNA_WAVE_FORMAT_IEEE_FLOAT)
        return fail(out, "unsupported encoding: only PCM and IEEE float WAV "
                         "files are read (not ADPCM, A-law, mu-law, ...)");
    if (channels == 0)
        return fail(out, "fmt chunk says 0 channels");
    if (rate == 0)
        return fail(out, "fmt chunk says a sample rate of 0");
    if (block_align == 0 || block_align % channels != 0)
        return fail(out, "block align is not a whole number of bytes per "
                         "channel");
    uint32_t sample_bytes = block_align / channels;
    if ((bits + 7u) / 8u != sample_bytes && !out->extensible)
        return fail(out, "bits per sample disagree with the block align");
    if (out->extensible && (bits == 0 || bits != sample_bytes * 8u))
        return fail(out, "bits per sample disagree with the block align");
    if (tag == LUNA_WAVE_FORMAT_PCM && (sample_bytes < 1 || sample_bytes > 4))
        return fail(out, "PCM samples must be 1 to 4 bytes wide");
    if (tag == LUNA_WAVE_FORMAT_IEEE_FLOAT && sample_bytes != 4 &&
        sample_bytes != 8)
        return fail(out, "float samples must be 32 or 64 bits wide");

    out->format = (uint16_t)tag;
    out->channels = (uint16_t)channels;
    out->samplerate = rate;
    out->block_align = (uint16_t)block_align;
    out->bits = (uint16_t)(sample_bytes * 8u);
    return 0;
}

static int parse(const struct source *src, struct luna_wav_info *out)
{
    uint8_t h[12];
    *out = (struct luna_wav_info){0};
    out->file_size = src->size;
    if (src->size < 12)
        return fail(out, "file is too short for a RIFF/WAVE header");
    int rc = source_read(src, 0, h, 12, out);
    if (rc < 0)
        return rc;
    if (memcmp(h, "RF64", 4) == 0)
        return fail(out, "RF64 files are not supported, whatever their size "
                         "(only RIFF WAV is read)");
    if (memcmp(h, "RIFX", 4) == 0)
        return fail(out, "big-endian RIFX files are not supported");
    if (memcmp(h, "RIFF", 4) != 0)
        return fail(out, "not a RIFF file (no 'RIFF' at offset 0)");
    if (memcmp(h + 8, "WAVE", 4) != 0)
        return fail(out, "RIFF file is not a WAVE file");
    uint32_t riff_size = get_u32(h + 4);
    int unfinished_riff = riff_size == 0 || riff_size == 0xFFFFFFFFu;

    int have_fmt = 0, have_data = 0, data_to_end = 0;
    uint64_t off = 12;
    uint64_t end = 12; /* where the last chunk's body ends, before its pad byte */
    for (int chunks = 0; !(have_fmt && have_data); chunks++) {
        if (chunks == MAX_CHUNKS)
            return fail(out, "too many chunks before the audio data");
        if (off > src->size || src->size - off < 8) {
            if (off < src->size)
                return fail(out, "truncated chunk header");
            /* A file cut inside a chunk (a LIST, a bext) before its audio is a
             * truncated file, not one that never had a data chunk. A last chunk
             * of odd size may lack its pad byte: that is no cut. */
            if (end > src->size)
                return fail(out, have_fmt ? "file ends inside a chunk before the data "
                                            "chunk (truncated WAV)"
                                          : "file ends inside a chunk before the fmt "
                                            "chunk (truncated WAV)");
            return fail(out, have_fmt ? "no data chunk" : "no fmt chunk");
        }
        uint8_t c[8];
        rc = source_read(src, off, c, 8, out);
        if (rc < 0)
            return rc;
        uint32_t size = get_u32(c + 4);
        uint64_t body = off + 8;
        if (memcmp(c, "fmt ", 4) == 0) {
            if (have_fmt)
                return fail(out, "more than one fmt chunk");
            rc = parse_fmt(src, body, size, out);
            if (rc < 0)
                return rc;
            have_fmt = 1;
        } else if (memcmp(c, "JUNK", 4) == 0 && size >= 8 && !have_data &&
                   src->size - body >= 8) {
            uint8_t tag[8];
            rc = source_read(src, body, tag, 8, out);
            if (rc < 0)
                return rc;
            if (memcmp(tag, "lsst", 4) == 0)
                out->stream_state = stream_state_of(tag + 4);
        } else if (memcmp(c, "data", 4) == 0 && !have_data) {
            uint64_t remaining = src->size - body;
            out->data_offset = body;
            have_data = 1;
            int sox_unspecified =
                have_fmt && size > remaining &&
                size == SOX_UNSPECIFIED_SIZE / out->block_align * out->block_align;
            /* A RIFF that ends where the data starts, with data size 0:
             * a streaming writer that has not fixed its header (yet). */
            int riff_ends_here = (uint64_t)riff_size + 8u <= body;
            /* A WavWriter's stream (its state chunk came first) holds exactly the
             * audio its size counts, 0 included: bytes past it are an append whose
             * sizes are still to come, or another process's. */
            int counted = out->stream_state != LUNA_STREAM_NONE;
            /* A data size 0 followed by a chunk (a LIST, an id3 that a tagger
             * added without fixing the RIFF size) is an empty data chunk, as
             * libsndfile and scipy read it: a stream's bytes are audio. */
            if (!counted && size == 0 && remaining >= 8) {
                uint8_t next[8];
                rc = source_read(src, body, next, 8, out);
                if (rc < 0)
                    return rc;
                counted = is_chunk_header(next, remaining - 8);
            }
            /* An unfinished stream: its data runs to the end of the file. */
            if (!counted &&
                (size == 0xFFFFFFFFu ||
                 (size == 0 && (unfinished_riff || riff_ends_here)) ||
                 (size == 0x7FFFFFFFu && size > remaining) || sox_unspecified)) {
                out->data_bytes = remaining;
                data_to_end = 1;
            } else if (size > remaining) {
                return fail(out, "data chunk runs past the end of the file "
                                 "(truncated WAV)");
            } else {
                out->data_bytes = size;
            }
        }
        if (data_to_end)
            break;
        end = body + size;
        off = end + (size & 1u); /* chunks are padded to even */
    }
    if (!have_fmt)
        return fail(out, "data of unknown length comes before the fmt chunk");
    out->frames = out->data_bytes / out->block_align;
    out->data_bytes = out->frames * out->block_align;
    return 0;
}

int luna_wav_parse_buffer(const uint8_t *buf, uint64_t len,
                          struct luna_wav_info *out)
{
    if (!buf && len)
        return -EINVAL;
    struct source src = {buf, len, -1, len};
    return parse(&src, out);
}

/* How much of a file luna_wav_parse_fd reads in its first pread. */
#define FD_PREFIX_BYTES 512

int luna_wav_parse_fd(int fd, uint64_t file_size, struct luna_wav_info *out)
{
    if (file_size > (uint64_t)INT64_MAX)
        return -EFBIG; /* no file is that long: every offset must stay one */
    /* One pread of the first bytes holds nearly every header (44 bytes plain, 68
     * extensible, a stream's state chunk, a short LIST): the parse then asks the
     * file only for chunks past them, where it used to read each field (four
     * preads for a plain WAV). A short read is no error here: what it lacks is
     * read from the file as before, and fails there as before. */
    uint8_t prefix[FD_PREFIX_BYTES];
    size_t want = file_size < sizeof prefix ? (size_t)file_size : sizeof prefix;
    ssize_t got;
    do
        got = want ? pread(fd, prefix, want, 0) : 0;
    while (got < 0 && errno == EINTR);
    if (got < 0)
        return -errno;
    struct source src = {prefix, (uint64_t)got, fd, file_size};
    return parse(&src, out);
}

/* luna_wav_open, with the file's first *held bytes left in prefix
 * (LUNA_WAV_PREFIX_BYTES long), the fd stored into cell (NULL: none). Only the
 * open and the store are made while forks wait (luna_open_regular): the reads
 * of the header come after, with the fd in its cell already (a child forked
 * meanwhile closes its copy), so that a fork never waits for a slow file (a
 * FUSE or NFS mount reading over the network, a stalled disk) in another
 * thread: it held the GIL, and so every thread of the process, as it waited. */
static int open_into(const char *path, struct luna_wav_info *out,
                     uint8_t *prefix, uint64_t *held, int *cell)
{
    uint64_t size = 0;
    *held = 0;
    int fd = luna_open_regular(path, &size, cell);
    if (fd == -LUNA_EFORMAT) {
        *out = (struct luna_wav_info){0};
        out->error = "not a regular file";
        return fd;
    }
    if (fd < 0)
        return fd;
    uint64_t want = size < LUNA_WAV_PREFIX_BYTES ? size : LUNA_WAV_PREFIX_BYTES;
    int rc = luna_read_at(fd, 0, prefix, want);
    if (rc == -ENODATA) {
        *out = (struct luna_wav_info){0};
        out->error = ended_early;
        rc = -LUNA_EFORMAT;
    }
    if (rc == 0) {
        struct source src = {prefix, want, fd, size};
        rc = parse(&src, out);
    }
    if (rc < 0) {
        luna_drop_fd(cell, fd);
        return rc;
    }
    *held = want;
    return fd;
}

int luna_wav_open(const char *path, struct luna_wav_info *out, int *cell)
{
    if (!luna_cell_is_empty(cell))
        return -EINVAL;
    uint8_t prefix[LUNA_WAV_PREFIX_BYTES];
    uint64_t held;
    return open_into(path, out, prefix, &held, cell);
}

void *luna_wav_file_new(size_t size)
{
    if (size < sizeof(struct luna_wav_file))
        return NULL;
    struct luna_wav_file *f = malloc(size);
    if (f)
        f->fd = -1; /* the rest is filled by luna_wav_open_held */
    return f;
}

void luna_wav_file_free(void *p)
{
    struct luna_wav_file *f = p;
    if (f)
        (void)luna_fd_release(&f->fd);
    free(f);
}

int luna_wav_open_held(const char *path, struct luna_wav_file *f)
{
    if (!f || f->fd >= 0)
        return -EINVAL;
    return open_into(path, &f->info, f->prefix, &f->held, &f->fd);
}

int luna_wav_read_held(struct luna_wav_file *f, void *dst, uint64_t n)
{
    if (!f)
        return -EINVAL;
    if (f->held > sizeof f->prefix) {
        (void)luna_fd_release(&f->fd);
        return -EINVAL;
    }
    uint64_t off = f->info.data_offset;
    int rc = 0;
    if (off > f->held || n > f->held - off) {
        rc = luna_read_at(f->fd, off, dst, n);
    } else if (n > 0) {
        /* A short file's samples came with its header: the floor's one read, and
         * a copy of the bytes that read saw (a later shrink or rewrite of the
         * file does not reach them, as it would not reach a read that had
         * finished). */
        memcpy(dst, f->prefix + off, (size_t)n);
    }
    int closed = luna_fd_release(&f->fd);
    return rc < 0 ? rc : closed;
}

int luna_wav_map(const char *path, struct luna_wav_info *out, struct luna_mapping *m)
{
    if (!m || m->addr)
        return -EINVAL;
    int cell = -1; /* a child forked before the mapping is made closes its copy */
    int fd = luna_wav_open(path, out, &cell);
    if (fd < 0)
        return fd;
    uint64_t len = out->data_offset + out->data_bytes;
    int rc = luna_map(fd, len, 0, 0, m);
    (void)luna_fd_release(&cell); /* the mapping keeps the file */
    return rc;
}

int luna_wav_map_fd(int fd, uint64_t file_size, struct luna_wav_info *out,
                    struct luna_mapping *m)
{
    if (!out || !m || m->addr)
        return -EINVAL;
    int rc = luna_wav_parse_fd(fd, file_size, out);
    if (rc < 0)
        return rc;
    return luna_map(fd, out->data_offset + out->data_bytes, 0, 0, m);
}
