/* cells_fork.c - the table of fd cells (files.c) while threads fill, keep and empty
 * cells and the main thread forks: run under AddressSanitizer by
 * tests/test_c_sanitizers.py.
 *
 * Usage: cells_fork DIR [freed]
 *
 * Three threads churn cells without pause: heap cells filled by luna_dup of a marker
 * file (one in seven kept with luna_fd_keep_in_child by the first thread), released
 * and freed; a stack cell filled and released; a WAV written with
 * luna_write_wav_path (a stack cell of its own) and opened into a heap cell by
 * luna_wav_open. The main thread forks 400 children; each lists its fds and counts
 * the copies of the marker file and of the WAV beside the marker's own fd: at most
 * one (a kept cell's, of the first thread), never the WAV. Exit status 0 and
 * "children N, with a kept copy K" on success; 1 and the child that failed else.
 *
 * "freed": the first thread frees one cell in a thousand while it still holds its
 * fd (a misuse: the cell is still noted), which AddressSanitizer must report in a
 * child (the at-fork handler reads the freed cell): the test's own check that
 * this harness sees a cell's memory used after it is gone.
 */
#include "luna_internal.h"

#include <dirent.h>
#include <errno.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#define CHILDREN 400

static int marker = -1;
static struct stat marker_st;
static char wav_path[4200];
static char dir_path[4096];
static atomic_int stop;
static int freed_mode;

static void fail(const char *what, int rc)
{
    fprintf(stderr, "%s: %s\n", what, strerror(rc < 0 ? -rc : rc));
    exit(1);
}

static void *churn_dups(void *arg)
{
    long id = (long)arg;
    for (unsigned n = 0; !atomic_load(&stop); n++) {
        int *cell = malloc(sizeof *cell);
        if (!cell)
            fail("malloc", ENOMEM);
        *cell = -1;
        int rc = luna_dup(marker, cell);
        if (rc < 0)
            fail("luna_dup", rc);
        if (id == 0 && n % 7 == 0)
            luna_fd_keep_in_child(cell);
        if (id == 0 && freed_mode && n % 1000 == 999) {
            free(cell); /* the misuse: still noted */
            continue;
        }
        rc = luna_fd_release(cell);
        if (rc < 0)
            fail("luna_fd_release", rc);
        free(cell);
        int stack_cell = -1;
        rc = luna_dup(marker, &stack_cell);
        if (rc < 0)
            fail("luna_dup (stack cell)", rc);
        luna_fd_release(&stack_cell);
    }
    return NULL;
}

static void *churn_wavs(void *arg)
{
    (void)arg;
    struct luna_wav_spec spec = {8000, 1, LUNA_WAVE_FORMAT_PCM, 16};
    int16_t samples[64] = {0};
    char tmp_path[4200];
    snprintf(tmp_path, sizeof tmp_path, "%s/replacement.wav", dir_path);
    while (!atomic_load(&stop)) {
        int rc = luna_write_wav_path(dir_path, wav_path, tmp_path, &spec, samples,
                                     sizeof samples);
        if (rc < 0)
            fail("luna_write_wav_path", rc);
        struct luna_wav_info info;
        int *cell = malloc(sizeof *cell);
        if (!cell)
            fail("malloc", ENOMEM);
        *cell = -1;
        rc = luna_wav_open(wav_path, &info, cell);
        if (rc < 0)
            fail("luna_wav_open", rc);
        luna_fd_release(cell);
        free(cell);
    }
    return NULL;
}

/* In a child: how many fds other than the marker's own are a copy of the marker;
 * any other file in the churn's directory (a WAV) counts 100: never to be held. */
static int copies_held(void)
{
    DIR *d = opendir("/proc/self/fd");
    if (!d)
        return 1000;
    int copies = 0;
    size_t dir_len = strlen(dir_path);
    struct dirent *e;
    while ((e = readdir(d)) != NULL) {
        int fd = atoi(e->d_name);
        struct stat st;
        if (e->d_name[0] == '.' || fd == marker || fd == dirfd(d) || fstat(fd, &st) != 0)
            continue;
        char link[64], target[4200];
        snprintf(link, sizeof link, "/proc/self/fd/%d", fd);
        ssize_t n = readlink(link, target, sizeof target - 1);
        target[n < 0 ? 0 : n] = '\0';
        if (st.st_dev == marker_st.st_dev && st.st_ino == marker_st.st_ino)
            copies++;
        else if (strncmp(target, dir_path, dir_len) == 0 && target[dir_len] == '/')
            copies += 100;
    }
    closedir(d);
    return copies;
}

int main(int argc, char **argv)
{
    if (argc < 2) {
        fprintf(stderr, "usage: cells_fork DIR [freed]\n");
        return 2;
    }
    freed_mode = argc > 2 && strcmp(argv[2], "freed") == 0;
    snprintf(dir_path, sizeof dir_path, "%s", argv[1]);
    char marker_path[4200];
    snprintf(marker_path, sizeof marker_path, "%s/marker", dir_path);
    snprintf(wav_path, sizeof wav_path, "%s/churn.wav", dir_path);
    marker = open(marker_path, O_RDWR | O_CREAT | O_CLOEXEC, 0600);
    if (marker < 0 || fstat(marker, &marker_st) != 0)
        fail("marker", errno);
    pthread_t threads[3];
    for (long i = 0; i < 2; i++)
        pthread_create(&threads[i], NULL, churn_dups, (void *)i);
    pthread_create(&threads[2], NULL, churn_wavs, NULL);
    int kept = 0, bad = 0;
    for (int k = 0; k < CHILDREN && !bad; k++) {
        pid_t pid = fork();
        if (pid < 0)
            fail("fork", errno);
        if (pid == 0) {
            int copies = copies_held();
            _exit(copies > 1 ? 3 : copies);
        }
        int status;
        while (waitpid(pid, &status, 0) < 0)
            ;
        if (!WIFEXITED(status) || WEXITSTATUS(status) > 1) {
            fprintf(stderr, "child %d: status %#x (3: it held a file of the churn)\n", k,
                    (unsigned)status);
            bad = 1;
        }
        kept += WIFEXITED(status) && WEXITSTATUS(status) == 1;
    }
    atomic_store(&stop, 1);
    for (int i = 0; i < 3; i++)
        pthread_join(threads[i], NULL);
    close(marker);
    unlink(marker_path);
    unlink(wav_path);
    if (bad)
        return 1;
    printf("children %d, with a kept copy %d\n", CHILDREN, kept);
    return 0;
}
