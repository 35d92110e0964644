"""cffi build script (API mode): compiles csrc/*.c into luna_shm._native."""

from pathlib import Path

from cffi import FFI

HERE = Path(__file__).resolve().parent
SOURCES = sorted(str(p.relative_to(HERE.parent)) for p in HERE.glob("*.c"))

CDEF = """
#define LUNA_HAS_MEMFD ...
#define LUNA_HAS_O_TMPFILE ...
#define LUNA_EFORMAT ...
#define LUNA_WAVE_FORMAT_PCM ...
#define LUNA_WAVE_FORMAT_IEEE_FLOAT ...
#define LUNA_WAV_MAX_HEADER ...

int luna_create_excl(const char *path, unsigned int mode);
int luna_touch_excl(const char *path, unsigned int mode);
int luna_open_for_write(const char *path, unsigned int mode, int *created,
                        uint64_t *old_size);
int luna_create_locked(const char *dir, const char *path, unsigned int mode);
int luna_open_regular(const char *path, uint64_t *size);
int luna_lock(int fd, int exclusive, int wait);
int luna_close(int fd);

struct luna_fs_info {
    uint64_t fs_type;
    uint64_t dev_major;
    uint64_t dev_minor;
    uint64_t bytes_free;
    uint64_t bytes_total;
    uint32_t mode;
    uint32_t uid;
    int32_t is_symlink;
    int32_t is_dir;
    int32_t is_ram_fs;
    int32_t is_mount_point;
    int32_t writable;
    int32_t write_errno;
};
int luna_fs_probe(const char *path, struct luna_fs_info *out);

int luna_reserve(int fd, uint64_t offset, uint64_t len);
int luna_set_length(int fd, uint64_t len);
int luna_map(int fd, uint64_t len, int writable, int populate, void **out);
int luna_unmap(void *addr, uint64_t len, int guard);
int luna_memfd(const char *name);
int luna_seal_shrink(int fd);
int luna_open_unnamed(const char *dir);
int luna_link_unnamed(int fd, const char *path);

int luna_guard_register(void *addr, uint64_t len, int prot);
int luna_guard_unregister(int guard);
int luna_guard_broken(int guard);
int luna_guard_installed(void);

struct luna_wav_spec {
    uint32_t samplerate;
    uint16_t channels;
    uint16_t format;
    uint16_t bits;
};
int luna_wav_header(uint8_t *out, const struct luna_wav_spec *spec,
                    uint64_t data_bytes, uint64_t tail_bytes);

struct luna_wav_info {
    uint32_t samplerate;
    uint16_t channels;
    uint16_t format;
    uint16_t bits;
    uint16_t block_align;
    int32_t extensible;
    uint64_t data_offset;
    uint64_t data_bytes;
    uint64_t frames;
    uint64_t file_size;
    const char *error;
};
int luna_wav_parse_buffer(const uint8_t *buf, uint64_t len,
                          struct luna_wav_info *out);
int luna_wav_parse_fd(int fd, uint64_t file_size, struct luna_wav_info *out);
int luna_wav_open(const char *path, struct luna_wav_info *out);
int luna_wav_map(const char *path, struct luna_wav_info *out, void **addr);
int luna_wav_format_slot(uint8_t *slot, uint64_t slot_len,
                         const struct luna_wav_spec *spec, uint64_t data_bytes);
int luna_wav_fill_slot(uint8_t *slot, uint64_t slot_len,
                       const struct luna_wav_spec *spec, const void *data,
                       uint64_t data_bytes);

int luna_write_wav_fd(int fd, const struct luna_wav_spec *spec,
                      const void *data, uint64_t data_bytes);
int luna_write_wav_path(const char *dir, const char *path, const char *tmp_path,
                        const struct luna_wav_spec *spec,
                        const void *data, uint64_t data_bytes);
int luna_write_wav_atomic(const char *dir, const char *path,
                          const char *tmp_path,
                          const struct luna_wav_spec *spec,
                          const void *data, uint64_t data_bytes);
int luna_read_at(int fd, uint64_t offset, void *dst, uint64_t n);
int luna_read_close(int fd, uint64_t offset, void *dst, uint64_t n);
int luna_write_at(int fd, uint64_t offset, const void *src, uint64_t n);
int luna_stream_append(int fd, uint8_t *header_map,
                       const struct luna_wav_spec *spec, uint64_t data_offset,
                       uint64_t *data_bytes, const void *data, uint64_t n);

void luna_pack_s24(const int32_t *src, uint8_t *dst, uint64_t count);
void luna_unpack_s24(const uint8_t *src, int32_t *dst, uint64_t count);
int luna_float_to_pcm(const void *src, int src_is_double, void *dst,
                      int dst_bits, uint64_t count);

int luna_floor_write(const char *path, const void *header, uint64_t header_len,
                     const void *data, uint64_t data_len);
int luna_floor_read(const char *path, uint64_t offset, void *dst, uint64_t len);
"""

ffibuilder = FFI()
ffibuilder.cdef(CDEF)
ffibuilder.set_source(
    "luna_shm._native",
    '#include "luna_shm.h"',
    sources=SOURCES,
    include_dirs=[str(HERE.relative_to(HERE.parent))],
    # -O3 -fno-trapping-math: the sample conversion loops vectorize (convert.c).
    extra_compile_args=["-std=gnu11", "-O3", "-fno-trapping-math", "-Wall", "-Wextra"],
)

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
