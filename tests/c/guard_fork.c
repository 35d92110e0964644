/* guard_fork.c - a child forked while another thread holds one of guard.c's
 * mutexes still registers mappings.
 *
 * Build (tests/test_c_sanitizers.py does this, into a temporary directory):
 *
 *   gcc -std=gnu11 -Wall -Wextra -Werror -g -O1 -pthread \
 *       -fsanitize=address,undefined -Icsrc tests/c/guard_fork.c
 *
 * guard.c is included, not linked: the test reaches its static mutexes. A
 * thread takes one (grow_lock, which a registration takes to add a block of
 * entries; install_lock, which it takes to put the SIGBUS handler back) and
 * keeps it while the main thread forks, as a thread inside grow() or
 * ensure_installed() does at that moment. The child then makes the call that
 * needs that mutex: a registration past the full blocks, or one after SIGBUS
 * was reset to its default. That thread does not exist in the child; a mutex
 * still held there would be held for ever. alarm() ends a hung child.
 *
 * Prints one line per failed check on stderr and "N passed, M failed" on
 * stdout; exits 0 when M is 0, 1 otherwise.
 */
#include "guard.c"

#include <stdio.h>
#include <sys/mman.h>
#include <sys/wait.h>

static int passed, failed;
static int held[2], release_it[2];

static void *hold(void *mutex)
{
    char byte = 0;
    pthread_mutex_lock(mutex);
    if (write(held[1], &byte, 1) != 1 || read(release_it[0], &byte, 1) != 1)
        abort();
    pthread_mutex_unlock(mutex);
    return NULL;
}

/* Fork while a thread holds mutex; the child registers the page at addr after
 * prepare() ran. Returns 1 when the child registered it before its alarm. */
static int child_registers(pthread_mutex_t *mutex, void (*prepare)(void), char *addr,
                           const char *what)
{
    pthread_t holder;
    char byte = 1;
    if (pipe(held) != 0 || pipe(release_it) != 0 ||
        pthread_create(&holder, NULL, hold, mutex) != 0 || read(held[0], &byte, 1) != 1)
        abort();
    pid_t pid = fork();
    if (pid == 0) {
        alarm(20);
        if (prepare != NULL)
            prepare();
        _exit(luna_guard_register(addr, (uint64_t)page_size(), PROT_READ) >= 0 ? 0 : 3);
    }
    if (pid < 0 || write(release_it[1], &byte, 1) != 1 || pthread_join(holder, NULL) != 0)
        abort();
    int status = 0;
    if (waitpid(pid, &status, 0) != pid)
        abort();
    close(held[0]); close(held[1]); close(release_it[0]); close(release_it[1]);
    if (WIFEXITED(status) && WEXITSTATUS(status) == 0) {
        passed++;
        return 1;
    }
    failed++;
    if (WIFSIGNALED(status) && WTERMSIG(status) == SIGALRM)
        fprintf(stderr, "FAIL %s: the child hung in luna_guard_register\n", what);
    else
        fprintf(stderr, "FAIL %s: the child's registration failed (status %#x)\n", what,
                status);
    return 0;
}

static void default_sigbus(void)
{
    signal(SIGBUS, SIG_DFL); /* the next registration reinstalls ours */
}

int main(void)
{
    long page = sysconf(_SC_PAGESIZE);
    char *area = mmap(NULL, (size_t)page * (BLOCK_ENTRIES + 2), PROT_READ,
                      MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (area == MAP_FAILED)
        return 2;
    /* Fill the first block: the child's next registration must add a block. */
    for (unsigned i = 0; i < BLOCK_ENTRIES; i++) {
        if (luna_guard_register(area + (size_t)page * i, (uint64_t)page, PROT_READ) < 0)
            return 2;
    }
    child_registers(&grow_lock, NULL, area + (size_t)page * BLOCK_ENTRIES,
                    "grow_lock held by another thread at the fork");
    child_registers(&install_lock, default_sigbus, area + (size_t)page * (BLOCK_ENTRIES + 1),
                    "install_lock held by another thread at the fork");
    printf("%d passed, %d failed\n", passed, failed);
    return failed == 0 ? 0 : 1;
}
