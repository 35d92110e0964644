/* guard_fork.c - a child forked while another thread was inside guard.c keeps
 * a registry it can use: no mutex held for ever, no entry left half changed.
 *
 * Build (tests/test_c_sanitizers.py does this, into a temporary directory):
 *
 *   gcc -std=gnu11 -Wall -Wextra -Werror -g -O1 -pthread \
 *       -fsanitize=address,undefined -Icsrc tests/c/guard_fork.c
 *
 * guard.c is included, not linked: the test reaches its static state, and
 * defines guard.c's GUARD_TEST_PAUSE hook (empty in the library's build).
 *
 * 1. The mutexes. A thread takes one (grow_lock, which a registration takes to
 *    add a block of entries; install_lock, which it takes to put the SIGBUS
 *    handler back) and keeps it while the main thread forks, as a thread
 *    inside grow() or ensure_installed() does at that moment. The child then
 *    makes the call that needs that mutex: a registration past the full
 *    blocks, or one after SIGBUS was reset to its default.
 *
 * 2. The entries. A thread is held by GUARD_TEST_PAUSE just after it moved an
 *    entry into a state that only it ends, and the main thread forks:
 *    - ST_FIXING: a real SIGBUS (a page of a memfd cut under its mapping,
 *      read by the thread), held in guard.c's handler after it claimed the
 *      entry and before it maps the zero pages, as a fork from another thread
 *      of a daemon (a TTS worker pool) can catch it;
 *    - a luna_guard_shrink (luna_mapping_cut) after its claim, before the new
 *      length is stored;
 *    - a luna_guard_register after its claim, before the range is stored.
 *    The hook rather than timing: the window is a few instructions wide and a
 *    fork lands in it once in millions; holding the thread there with a pipe
 *    makes each case exact, and everything else is real (the kernel's fault,
 *    guard.c's handler, fork()). The hook is only compiled here: the shipped
 *    library has no such code and exports no symbol for it.
 *    The child then does what a child that inherited that object does: closes
 *    it (unregister), checks it (break, the EFAULT absorb, luna_guard_broken),
 *    reads it. A child left with the entry in that state spun for ever in
 *    settled_state(), or looped on the fault it retried, or was refused with
 *    -EINVAL and unguarded.
 *
 * That thread does not exist in the child; alarm() ends a hung child. Runs
 * group 1 ("mutexes"), group 2 ("entries"), or both (no argument). Prints one
 * line per failed check on stderr and "N passed, M failed" on stdout; exits 0
 * when M is 0, 1 otherwise.
 */
static void pause_at(int moment, void *e);
#define GUARD_TEST_PAUSE(moment, e) pause_at(MOMENT_##moment, e)
enum { MOMENT_NONE, MOMENT_claim, MOMENT_shrink, MOMENT_fix };

#include "guard.c"

#include <stdio.h>
#include <sys/mman.h>
#include <sys/wait.h>

static int passed, failed;
static int held[2], release_it[2];

/* ---- 1. a mutex held by another thread at the fork ------------------------ */

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

/* ---- 2. an entry another thread was changing at the fork ------------------ */

/* The moment the next thread to reach it is held at (MOMENT_NONE: none), and
 * the entry it held it on. pause_at runs inside the SIGBUS handler too: only
 * atomics, write() and read(). */
static _Atomic int armed;
static void *_Atomic paused_entry;

static void pause_at(int moment, void *e)
{
    int expected = moment;
    if (!atomic_compare_exchange_strong(&armed, &expected, MOMENT_NONE))
        return;
    char byte = 0;
    atomic_store(&paused_entry, e);
    if (write(held[1], &byte, 1) != 1 || read(release_it[0], &byte, 1) != 1)
        abort();
}

/* The case at hand: a memfd of two pages mapped shared and registered. */
static int case_fd = -1, case_id = -1, thread_rc;
static char *case_addr;
static uint64_t case_len;

static void make_mapping(int register_it)
{
    case_len = 2 * page_size();
    case_fd = memfd_create("guard_fork", MFD_CLOEXEC);
    if (case_fd < 0 || ftruncate(case_fd, (off_t)case_len) != 0)
        abort();
    case_addr = mmap(NULL, (size_t)case_len, PROT_READ | PROT_WRITE, MAP_SHARED, case_fd, 0);
    if (case_addr == MAP_FAILED)
        abort();
    memset(case_addr, 0x5a, (size_t)case_len);
    case_id = register_it ? luna_guard_register(case_addr, case_len, PROT_READ | PROT_WRITE)
                          : -1;
    if (register_it && case_id < 0)
        abort();
}

static void drop_mapping(void)
{
    if (case_id >= 0 && luna_guard_unregister(case_id) != 0)
        abort();
    if (munmap(case_addr, (size_t)case_len) != 0 || close(case_fd) != 0)
        abort();
    case_id = -1;
}

/* The held threads: a read of the cut page (a SIGBUS), a shrink, a registration. */
static void *read_cut_page(void *unused)
{
    (void)unused;
    thread_rc = ((volatile char *)case_addr)[0];
    return NULL;
}

static void *shrink_to_one_page(void *unused)
{
    (void)unused;
    thread_rc = luna_guard_shrink(case_id, page_size());
    return NULL;
}

static void *register_it(void *unused)
{
    (void)unused;
    thread_rc = luna_guard_register(case_addr, case_len, PROT_READ | PROT_WRITE);
    return NULL;
}

static unsigned state_of(struct entry *e)
{
    return (unsigned)(atomic_load(&e->state) & ST_MASK);
}

/* What the child checks: 0 when all is well, else the number of the check that
 * failed (its exit code). */
static int child_unregisters(void)
{
    return luna_guard_unregister(case_id) == 0 ? 0 : 1;
}

static int child_breaks(void)
{
    if (luna_guard_break(case_id) != 0)
        return 1;
    return luna_guard_broken(case_id) == 1 ? 0 : 2;
}

static int child_absorbs(void)
{
    /* the EFAULT path: counts the broken mapping once the fix is done */
    return luna_guard_absorb_range(case_addr, case_len) == 1 ? 0 : 1;
}

static int child_reads_zeros(void)
{
    /* The child's pages were still the cut file's: a fault there must find
     * zeros mapped, not a "being fixed" entry to retry for ever. */
    if (((volatile char *)case_addr)[0] != 0 || ((volatile char *)case_addr)[case_len - 1] != 0)
        return 1;
    if (luna_guard_broken(case_id) != 1)
        return 2;
    return luna_guard_unregister(case_id) == 0 ? 0 : 3;
}

static int child_has_the_shrunk_mapping(void)
{
    struct entry *e = paused_entry;
    if (luna_guard_broken(case_id) != 0)
        return 1; /* intact, and registered */
    if (state_of(e) != ST_LIVE || atomic_load(&e->len) != page_size())
        return 2; /* the shrink the parent's thread made, whole */
    /* Guarded still: the file cut (a memfd shared with the parent, which does
     * not touch it again), a read of the cut page gives zeros, not death. */
    if (ftruncate(case_fd, 0) != 0 || ((volatile char *)case_addr)[0] != 0)
        return 3;
    if (luna_guard_broken(case_id) != 1)
        return 4;
    return luna_guard_unregister(case_id) == 0 ? 0 : 5;
}

static int child_freed_the_claim(void)
{
    /* The registration never returns here: no object of the child knows its
     * id, and the entry it claimed must be free, not taken for ever. */
    return state_of(paused_entry) == ST_FREE ? 0 : 1;
}

/* Hold a thread running run() at moment, fork, and have the child run check()
 * under an alarm; then let the thread go on. Counts one check. */
static void fork_while_held(int moment, void *(*run)(void *), int (*check)(void),
                            const char *what)
{
    pthread_t thread;
    char byte = 1;
    if (pipe(held) != 0 || pipe(release_it) != 0)
        abort();
    atomic_store(&armed, moment);
    if (pthread_create(&thread, NULL, run, NULL) != 0 || read(held[0], &byte, 1) != 1)
        abort();
    pid_t pid = fork();
    if (pid == 0) {
        alarm(10);
        _exit(check());
    }
    if (pid < 0 || write(release_it[1], &byte, 1) != 1 || pthread_join(thread, NULL) != 0)
        abort();
    int status = 0;
    if (waitpid(pid, &status, 0) != pid)
        abort();
    close(held[0]); close(held[1]); close(release_it[0]); close(release_it[1]);
    if (WIFEXITED(status) && WEXITSTATUS(status) == 0) {
        passed++;
        return;
    }
    failed++;
    if (WIFSIGNALED(status) && WTERMSIG(status) == SIGALRM)
        fprintf(stderr, "FAIL %s: the child hung\n", what);
    else if (WIFSIGNALED(status))
        fprintf(stderr, "FAIL %s: the child died of signal %d\n", what, WTERMSIG(status));
    else
        fprintf(stderr, "FAIL %s: the child's check %d failed\n", what, WEXITSTATUS(status));
}

/* A thread reads a page of a mapping whose file was cut, and is held in the
 * SIGBUS handler with the entry ST_FIXING; the child runs check. */
static void fork_while_fixing(int (*check)(void), const char *what)
{
    make_mapping(1);
    if (ftruncate(case_fd, 0) != 0)
        abort();
    fork_while_held(MOMENT_fix, read_cut_page, check, what);
    /* The parent's thread finished: zeros read, the mapping broken. */
    if (thread_rc != 0 || luna_guard_broken(case_id) != 1)
        abort();
    drop_mapping();
}

static void check_mutexes(void)
{
    long page = sysconf(_SC_PAGESIZE);
    char *area = mmap(NULL, (size_t)page * (BLOCK_ENTRIES + 2), PROT_READ,
                      MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (area == MAP_FAILED)
        abort();
    /* Fill the first block: the child's next registration must add a block. */
    for (unsigned i = 0; i < BLOCK_ENTRIES; i++) {
        if (luna_guard_register(area + (size_t)page * i, (uint64_t)page, PROT_READ) < 0)
            abort();
    }
    child_registers(&grow_lock, NULL, area + (size_t)page * BLOCK_ENTRIES,
                    "grow_lock held by another thread at the fork");
    child_registers(&install_lock, default_sigbus, area + (size_t)page * (BLOCK_ENTRIES + 1),
                    "install_lock held by another thread at the fork");
}

static void check_entries(void)
{
    fork_while_fixing(child_unregisters,
                      "a SIGBUS handler held fixing the entry at the fork: the child's unregister");
    fork_while_fixing(child_breaks,
                      "a SIGBUS handler held fixing the entry at the fork: the child's break");
    fork_while_fixing(child_absorbs,
                      "a SIGBUS handler held fixing the entry at the fork: the child's absorb");
    fork_while_fixing(child_reads_zeros,
                      "a SIGBUS handler held fixing the entry at the fork: the child's read");

    make_mapping(1);
    fork_while_held(MOMENT_shrink, shrink_to_one_page, child_has_the_shrunk_mapping,
                    "a shrink held at the fork: the child's mapping");
    if (thread_rc != 0)
        abort();
    drop_mapping();

    make_mapping(0);
    fork_while_held(MOMENT_claim, register_it, child_freed_the_claim,
                    "a registration held at the fork: the child's entry");
    if (thread_rc < 0)
        abort();
    case_id = thread_rc;
    drop_mapping();
}

int main(int argc, char **argv)
{
    const char *group = argc > 1 ? argv[1] : "";
    int all = *group == '\0';
    if (!all && strcmp(group, "mutexes") != 0 && strcmp(group, "entries") != 0) {
        fprintf(stderr, "usage: %s [mutexes|entries]\n", argv[0]);
        return 2;
    }
    if (all || strcmp(group, "mutexes") == 0)
        check_mutexes();
    if (all || strcmp(group, "entries") == 0)
        check_entries();
    printf("%d passed, %d failed\n", passed, failed);
    return failed == 0 ? 0 : 1;
}
