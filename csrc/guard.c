/* guard.c - no luna_shm mapping can kill its process with SIGBUS.
 *
 * A shared mapping of a file dies with SIGBUS when the process touches a page
 * that lies wholly past the end of the file: another process truncated it
 * (os.truncate, open(path, "wb"), soundfile.write over the path) or shrank an
 * unsealed memfd. The numpy views we hand out touch those pages in numpy's own
 * loops, where no check of ours can run first; so the fault itself is caught.
 *
 * Every mapping luna_map makes is registered here, and one SIGBUS handler is
 * installed. A kernel fault inside a registered range replaces the WHOLE range
 * with private anonymous zero pages of the same protection
 * (mmap(MAP_FIXED|MAP_PRIVATE|MAP_ANONYMOUS) is async-signal-safe) and marks
 * the entry broken: the faulting access completes, reading zeros or writing
 * into memory no one else sees, and the next luna_shm call on that object asks
 * luna_guard_broken() and raises a clear error. Every other SIGBUS goes on to
 * the handler that was there before us, exactly as if we were not installed.
 *
 * The registry is lock-free for the handler: blocks of entries allocated on
 * demand and published with atomics; each entry's state word carries a
 * generation, so that a handler racing an unregister/register of the same
 * entry can never act on a range it did not check (compare-and-swap on the
 * exact word it read). Registering is a claim by compare-and-swap at a
 * free-hint, O(1) in the usual map/unmap cycle, plus one sigaction() query
 * that reinstalls our handler when someone (faulthandler, signal.signal)
 * replaced it after us. A forked child settles, at the fork, every entry that
 * another thread of the parent was changing (a handler replacing its pages, a
 * registration, a shrink): that thread is not there to finish it.
 *
 * Handlers that run before us and re-raise: Python's faulthandler, enabled
 * after our handler was installed and before the next registration, runs
 * first on a fault, restores its previous handler (ours), dumps a traceback
 * and raise()s SIGBUS again, without the faulting address. Such a signal (not
 * from the kernel, si_code <= 0) makes us probe every registered mapping's
 * last byte with process_vm_readv, which answers EFAULT instead of faulting
 * where a page is gone; broken mappings are replaced as above and the signal
 * is dropped, so the faulting instruction runs again and completes. When no
 * mapping of ours is broken, the signal goes on to the previous handler.
 * The traceback faulthandler printed in that case is the only trace left.
 *
 * Chaining safely: a previous handler is called as a function from ours
 * (SA_NODEFER, so a handler that re-raises is entered at once, nested); a
 * signal that arrives while we are inside the previous handler is that
 * handler passing the fault on, and gets the default action (death by
 * SIGBUS), as it would without us. A kernel fault that comes back at the same
 * address after the previous handler returned also gets the default action:
 * no loop between two handlers that each think the other comes next.
 */
#include "luna_internal.h"

#include <errno.h>
#include <pthread.h>
#include <sched.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <sys/uio.h>
#include <time.h>
#include <unistd.h>

/* A test build only (tests/c/guard_fork.c #includes this file and defines it)
 * holds the calling thread here, at a moment when the entry e is in a passing
 * state only that thread will end: it then forks, for real, to show what a
 * child is left with. The library's build leaves it empty: no code, no symbol. */
#ifndef GUARD_TEST_PAUSE
#define GUARD_TEST_PAUSE(moment, e) ((void)0)
#endif

/* Entry states, in the low bits of the state word; the rest is a generation
 * bumped by every claim. */
enum {
    ST_FREE = 0,    /* unused */
    ST_CLAIMED = 1, /* being filled in by a registration: handlers ignore it */
    ST_LIVE = 2,    /* a registered mapping of a file */
    ST_FIXING = 3,  /* a handler is replacing its pages */
    ST_BROKEN = 4,  /* its pages are anonymous zeros now */
    ST_SHRINKING = 5, /* a LIVE entry getting a shorter len: handlers ignore it */
};
#define ST_MASK 7u
#define GEN_ONE 8u

/* How long a mapping another thread broke may explain a re-raised SIGBUS: the
 * handler that re-raises (faulthandler) ran between the fault and the raise,
 * and printing a traceback takes milliseconds. Past it, a raise() is not taken
 * for an old fault. */
#define RECENT_NS 2000000000LL

#define BLOCK_ENTRIES 256u
#define MAX_BLOCKS 4096u /* a million mappings */

struct entry {
    _Atomic uint64_t state;
    _Atomic uintptr_t start;
    _Atomic uint64_t len;  /* the mapping's length, as mapped */
    _Atomic int prot;
    _Atomic long breaker;     /* the thread that broke it (its fault, a re-raised
                               * signal or a call's EFAULT) */
    _Atomic int64_t broken_at; /* when, in CLOCK_MONOTONIC nanoseconds */
    _Atomic uint64_t shrink_to; /* the len a luna_guard_shrink is setting */
};

struct block {
    struct entry entries[BLOCK_ENTRIES];
    _Atomic uint32_t used;
};

static _Atomic(struct block *) blocks[MAX_BLOCKS];
static _Atomic uint32_t nblocks;
static _Atomic uint32_t free_hint;
static pthread_mutex_t grow_lock = PTHREAD_MUTEX_INITIALIZER;

/* The disposition that was there before us, double-buffered so that a
 * reinstall never rewrites the copy a running handler reads. */
static struct sigaction prev_actions[2];
static _Atomic(struct sigaction *) prev_action;
static pthread_mutex_t install_lock = PTHREAD_MUTEX_INITIALIZER;

static void settle_in_child(void);

/* In a forked child: another thread of the parent may have held either mutex at
 * the fork (inside grow() or ensure_installed()); that thread does not exist
 * here, and the child's next registration that needs the mutex would wait for
 * it for ever. Both start unlocked. Whatever that thread left half done stays
 * consistent for the child: a block stored but not counted is allocated again
 * (the first one leaks), a half-made reinstall is made again. An entry that
 * thread had in a passing state is settled (settle_in_child). */
static void unlock_in_child(void)
{
    pthread_mutex_init(&grow_lock, NULL);
    pthread_mutex_init(&install_lock, NULL);
    settle_in_child();
}

/* Registered when the library is loaded, before any thread can call us. */
__attribute__((constructor)) static void register_fork_hook(void)
{
    pthread_atfork(NULL, NULL, unlock_in_child);
}

/* Per thread: inside a call to the previous handler; the address of the last
 * kernel fault we passed on. initial-exec: no allocation on first use inside
 * a signal handler. */
static __thread int in_previous __attribute__((tls_model("initial-exec")));
static __thread uintptr_t passed_on __attribute__((tls_model("initial-exec")));

static uint64_t page_size(void)
{
    static _Atomic uint64_t cached;
    uint64_t page = atomic_load_explicit(&cached, memory_order_relaxed);
    if (page == 0) {
        page = (uint64_t)sysconf(_SC_PAGESIZE);
        atomic_store_explicit(&cached, page, memory_order_relaxed);
    }
    return page;
}

/* CLOCK_MONOTONIC in nanoseconds (clock_gettime is async-signal-safe). */
static int64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

static uint64_t round_to_pages(uint64_t len)
{
    uint64_t page = page_size();
    return (len + page - 1) / page * page;
}

/* The entry for index, or NULL when no block holds it (an id never handed
 * out: past the last block there could ever be, or in one not made yet). */
static struct entry *entry_at(uint32_t index)
{
    if (index / BLOCK_ENTRIES >= MAX_BLOCKS)
        return NULL;
    struct block *b = atomic_load_explicit(&blocks[index / BLOCK_ENTRIES],
                                           memory_order_acquire);
    return b == NULL ? NULL : &b->entries[index % BLOCK_ENTRIES];
}

/* ---- the handler ---------------------------------------------------------- */

/* The second half of a break: e is ST_FIXING (the word fixing), by this
 * thread. Its pages become anonymous zeros, this thread is recorded as the one
 * that broke it, and it is ST_BROKEN; ST_LIVE again when the zero pages cannot
 * be mapped. Returns 1 or -1 as break_entry. Async-signal-safe. */
static int replace_pages(struct entry *e, uint64_t fixing)
{
    void *start = (void *)atomic_load(&e->start);
    uint64_t len = round_to_pages(atomic_load(&e->len));
    atomic_store(&e->breaker, (long)syscall(SYS_gettid));
    atomic_store(&e->broken_at, now_ns());
    void *zeros = mmap(start, (size_t)len, atomic_load(&e->prot),
                       MAP_FIXED | MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    unsigned now = zeros == MAP_FAILED ? ST_LIVE : ST_BROKEN;
    atomic_store(&e->state, (fixing & ~(uint64_t)ST_MASK) | now);
    return zeros == MAP_FAILED ? -1 : 1;
}

/* Replace e's pages with anonymous zeros if its state is still exactly s
 * (LIVE), and record this thread as the one that broke it (see
 * absorb_lost_mappings). Returns 1 when e is broken now (by us or another
 * thread), 0 when the entry changed under us, -1 when the pages could not be
 * replaced (no memory for them: the process then dies as it would have
 * without us). Async-signal-safe. */
static int break_entry(struct entry *e, uint64_t s)
{
    uint64_t fixing = (s & ~(uint64_t)ST_MASK) | ST_FIXING;
    if (!atomic_compare_exchange_strong(&e->state, &s, fixing))
        return (s & ST_MASK) == ST_FIXING || (s & ST_MASK) == ST_BROKEN;
    GUARD_TEST_PAUSE(fix, e);
    return replace_pages(e, fixing);
}

/* A kernel fault at addr: if it lies in a registered mapping, make that
 * mapping harmless and return 1; else 0. */
static int absorb_fault(uintptr_t addr)
{
    uint32_t n = atomic_load_explicit(&nblocks, memory_order_acquire);
    for (uint32_t i = 0; i < n * BLOCK_ENTRIES; i++) {
        struct entry *e = entry_at(i);
        if (e == NULL)
            break;
        for (;;) {
            uint64_t s = atomic_load(&e->state);
            unsigned st = (unsigned)(s & ST_MASK);
            if (st != ST_LIVE && st != ST_FIXING && st != ST_BROKEN)
                break;
            uintptr_t start = atomic_load(&e->start);
            uint64_t len = round_to_pages(atomic_load(&e->len));
            if (atomic_load(&e->state) != s)
                continue; /* changed while we read it: read again */
            if (addr < start || addr - start >= len)
                break;
            if (st != ST_LIVE)
                return 1; /* being fixed, or fixed: the access is retried */
            int broke = break_entry(e, s);
            if (broke != 0)
                return broke > 0;
        }
    }
    return 0;
}

/* Whether the last byte of [start, start+len) can no longer be read: its page
 * is gone with its file's end (process_vm_readv answers EFAULT there instead of
 * faulting). Async-signal-safe. */
static int last_byte_lost(pid_t self, uintptr_t start, uint64_t len)
{
    char byte;
    struct iovec local = {&byte, 1};
    struct iovec remote = {(void *)(start + len - 1), 1};
    return process_vm_readv(self, &local, 1, &remote, 1, 0) < 0 && errno == EFAULT;
}

/* A SIGBUS raise()d inside this process (si_code SI_TKILL, our pid), without
 * an address: maybe a handler that ran before us (faulthandler) passing on a
 * fault in one of our mappings. Break every registered mapping whose last
 * byte can no longer be read (process_vm_readv answers EFAULT there instead
 * of faulting). Returns 1 when the fault that handler saw may be in one of
 * ours, so the access is worth retrying: a mapping broken now, one being
 * broken, or one that another thread broke in the last RECENT_NS (its fault,
 * its re-raised signal or its call's EFAULT): while that handler ran, before
 * it re-raised, a fault in another thread came to us with its address and
 * broke the very mapping this one hit. One this thread broke cannot be it: its
 * pages were zeros before this thread's fault. A retry that faults again comes
 * to us with its address: no loop. */
static int absorb_lost_mappings(void)
{
    int found = 0;
    pid_t self = getpid();
    long thread = (long)syscall(SYS_gettid);
    int64_t now = now_ns();
    uint32_t n = atomic_load_explicit(&nblocks, memory_order_acquire);
    for (uint32_t i = 0; i < n * BLOCK_ENTRIES; i++) {
        struct entry *e = entry_at(i);
        if (e == NULL)
            break;
        for (;;) {
            uint64_t s = atomic_load(&e->state);
            unsigned st = (unsigned)(s & ST_MASK);
            if (st == ST_FIXING) {
                found = 1;
                break;
            }
            if (st == ST_BROKEN) {
                if (atomic_load(&e->breaker) != thread &&
                    now - atomic_load(&e->broken_at) < RECENT_NS)
                    found = 1;
                break;
            }
            if (st != ST_LIVE)
                break;
            uintptr_t start = atomic_load(&e->start);
            uint64_t len = atomic_load(&e->len);
            if (atomic_load(&e->state) != s)
                continue; /* changed while we read it: read again */
            if (len == 0)
                break;
            if (!last_byte_lost(self, start, len)) {
                if (atomic_load(&e->state) != s)
                    continue; /* another thread put zeros there meanwhile */
                break;        /* its file still holds all of it */
            }
            int broke = break_entry(e, s);
            if (broke != 0) {
                found |= broke > 0;
                break;
            }
        }
    }
    return found;
}

static int raised_in_this_process(const siginfo_t *info)
{
    return info != NULL && info->si_code == SI_TKILL && info->si_pid == getpid();
}

/* What the kernel does when no handler is there: SIG_DFL for SIGBUS ends the
 * process. A kernel fault just returns, so the access faults again. */
static void default_action(int kernel)
{
    struct sigaction dfl;
    memset(&dfl, 0, sizeof dfl);
    dfl.sa_handler = SIG_DFL;
    sigemptyset(&dfl.sa_mask);
    sigaction(SIGBUS, &dfl, NULL);
    if (!kernel) {
        sigset_t bus;
        sigemptyset(&bus);
        sigaddset(&bus, SIGBUS);
        pthread_sigmask(SIG_UNBLOCK, &bus, NULL);
        raise(SIGBUS);
    }
}

static void pass_on(int sig, siginfo_t *info, void *ctx, int kernel)
{
    const struct sigaction *prev = atomic_load(&prev_action);
    if (prev == NULL || (!(prev->sa_flags & SA_SIGINFO) && prev->sa_handler == SIG_DFL)) {
        default_action(kernel);
        return;
    }
    if (!(prev->sa_flags & SA_SIGINFO) && prev->sa_handler == SIG_IGN) {
        if (kernel) /* the kernel never lets a fault be ignored */
            default_action(kernel);
        return;
    }
    if (prev->sa_flags & SA_RESETHAND)
        default_action(1);
    in_previous = 1;
    if (prev->sa_flags & SA_SIGINFO)
        prev->sa_sigaction(sig, info, ctx);
    else
        prev->sa_handler(sig);
    in_previous = 0;
}

static void guard_handler(int sig, siginfo_t *info, void *ctx)
{
    int saved_errno = errno;
    int kernel = info != NULL && info->si_code > 0;
    if (kernel) {
        uintptr_t addr = (uintptr_t)info->si_addr;
        if (absorb_fault(addr)) {
            passed_on = 0;
        } else if (passed_on == addr) {
            /* The previous handler returned and the fault came back. */
            passed_on = 0;
            default_action(1);
        } else {
            passed_on = addr;
            pass_on(sig, info, ctx, 1);
        }
    } else if (in_previous) {
        /* The handler we called passes the signal on: the end of the chain. */
        default_action(0);
    } else if (!(raised_in_this_process(info) && absorb_lost_mappings())) {
        pass_on(sig, info, ctx, 0);
    }
    errno = saved_errno;
}

/* ---- installation ----------------------------------------------------------- */

static int is_ours(const struct sigaction *sa)
{
    return (sa->sa_flags & SA_SIGINFO) && sa->sa_sigaction == guard_handler;
}

/* Make our handler the one the kernel calls for SIGBUS, in front of whatever
 * is there now. Returns 0 or -errno. */
static int ensure_installed(void)
{
    struct sigaction cur;
    if (sigaction(SIGBUS, NULL, &cur) != 0)
        return -errno;
    if (is_ours(&cur))
        return 0;
    pthread_mutex_lock(&install_lock);
    int rc = 0;
    if (sigaction(SIGBUS, NULL, &cur) != 0) {
        rc = -errno;
    } else if (!is_ours(&cur)) {
        struct sigaction *spare = atomic_load(&prev_action) == &prev_actions[0]
                                      ? &prev_actions[1]
                                      : &prev_actions[0];
        struct sigaction ours;
        memset(&ours, 0, sizeof ours);
        ours.sa_sigaction = guard_handler;
        /* SA_NODEFER: a handler we chain to that re-raises enters ours at
         * once, nested (in_previous). */
        ours.sa_flags = SA_SIGINFO | SA_NODEFER | SA_ONSTACK | SA_RESTART;
        sigemptyset(&ours.sa_mask);
        /* Publish what we chain to before the kernel can call us with it. */
        *spare = cur;
        atomic_store(&prev_action, spare);
        if (sigaction(SIGBUS, &ours, &cur) != 0)
            rc = -errno;
        else if (!is_ours(&cur))
            *spare = cur; /* changed between the two calls: keep the newest */
    }
    pthread_mutex_unlock(&install_lock);
    return rc;
}

/* ---- registry ----------------------------------------------------------------- */

static int claim(struct entry *e, uintptr_t start, uint64_t len, int prot)
{
    uint64_t s = atomic_load_explicit(&e->state, memory_order_relaxed);
    if ((s & ST_MASK) != ST_FREE)
        return 0;
    uint64_t claimed = (s & ~(uint64_t)ST_MASK) + GEN_ONE + ST_CLAIMED;
    if (!atomic_compare_exchange_strong(&e->state, &s, claimed))
        return 0;
    GUARD_TEST_PAUSE(claim, e);
    atomic_store_explicit(&e->start, start, memory_order_relaxed);
    atomic_store_explicit(&e->len, len, memory_order_relaxed);
    atomic_store_explicit(&e->prot, prot, memory_order_relaxed);
    atomic_store_explicit(&e->state, (claimed & ~(uint64_t)ST_MASK) | ST_LIVE,
                          memory_order_release);
    return 1;
}

static int grow(void)
{
    pthread_mutex_lock(&grow_lock);
    uint32_t n = atomic_load(&nblocks);
    int rc = 0;
    if (n >= MAX_BLOCKS) {
        rc = -ENOMEM;
    } else {
        struct block *b = calloc(1, sizeof *b);
        if (b == NULL) {
            rc = -ENOMEM;
        } else {
            atomic_store_explicit(&blocks[n], b, memory_order_release);
            atomic_store_explicit(&nblocks, n + 1, memory_order_release);
        }
    }
    pthread_mutex_unlock(&grow_lock);
    return rc;
}

int luna_guard_register(void *addr, uint64_t len, int prot)
{
    int rc = ensure_installed();
    if (rc < 0)
        return rc;
    for (;;) {
        uint32_t n = atomic_load_explicit(&nblocks, memory_order_acquire);
        uint32_t total = n * BLOCK_ENTRIES;
        uint32_t hint = atomic_load_explicit(&free_hint, memory_order_relaxed);
        for (uint32_t k = 0; k < total; k++) {
            uint32_t i = (hint + k) % total;
            struct block *b = atomic_load_explicit(&blocks[i / BLOCK_ENTRIES],
                                                   memory_order_acquire);
            if (i % BLOCK_ENTRIES == 0 &&
                atomic_load_explicit(&b->used, memory_order_relaxed) >= BLOCK_ENTRIES) {
                k += BLOCK_ENTRIES - 1; /* a full block: skip it */
                continue;
            }
            if (claim(&b->entries[i % BLOCK_ENTRIES], (uintptr_t)addr, len, prot)) {
                atomic_fetch_add_explicit(&b->used, 1, memory_order_relaxed);
                atomic_store_explicit(&free_hint, (i + 1) % total, memory_order_relaxed);
                return (int)i;
            }
        }
        /* Every entry taken (or none yet): one more block, unless another
         * thread added one meanwhile. */
        if (atomic_load(&nblocks) == n && (rc = grow()) < 0)
            return rc;
    }
}

int luna_guard_shrink(int id, uint64_t len)
{
    struct entry *e = id < 0 ? NULL : entry_at((uint32_t)id);
    if (e == NULL)
        return -EINVAL;
    uint64_t s = atomic_load(&e->state);
    if ((s & ST_MASK) != ST_LIVE || len == 0 || len > atomic_load(&e->len))
        return -EINVAL; /* broken (zeros already) or not ours: leave it as it is */
    /* Where a child forked in the middle finds the length (settle_in_child). */
    atomic_store(&e->shrink_to, len);
    /* A new generation: a handler that read the old length can no longer act. */
    uint64_t shrinking = (s & ~(uint64_t)ST_MASK) + GEN_ONE + ST_SHRINKING;
    if (!atomic_compare_exchange_strong(&e->state, &s, shrinking))
        return -EINVAL; /* a handler broke it just now */
    GUARD_TEST_PAUSE(shrink, e);
    atomic_store(&e->len, len);
    atomic_store(&e->state, (shrinking & ~(uint64_t)ST_MASK) | ST_LIVE);
    return 0;
}

/* e's state once no handler is replacing its pages: one that is takes a
 * moment, and we yield to it meanwhile. Never from a handler (it waits). */
static uint64_t settled_state(struct entry *e)
{
    for (;;) {
        uint64_t s = atomic_load(&e->state);
        if ((s & ST_MASK) != ST_FIXING)
            return s;
        sched_yield();
    }
}

int luna_guard_break(int id)
{
    struct entry *e = id < 0 ? NULL : entry_at((uint32_t)id);
    if (e == NULL)
        return -EINVAL;
    for (;;) {
        uint64_t s = settled_state(e);
        unsigned st = (unsigned)(s & ST_MASK);
        if (st == ST_BROKEN)
            return 0;
        if (st != ST_LIVE)
            return -EINVAL;
        int broke = break_entry(e, s);
        if (broke != 0)
            return broke > 0 ? 0 : -ENOMEM;
    }
}

/* Whether [start, start+len) and [lo, hi) overlap. */
static int overlaps(uintptr_t start, uint64_t len, uintptr_t lo, uintptr_t hi)
{
    return len > 0 && start < hi && (lo < start || lo - start < len);
}

int luna_guard_absorb_range(const void *addr, uint64_t len)
{
    uintptr_t lo = (uintptr_t)addr;
    uintptr_t hi = len > UINTPTR_MAX - lo ? UINTPTR_MAX : lo + (uintptr_t)len;
    pid_t self = getpid();
    int broken = 0;
    uint32_t n = atomic_load_explicit(&nblocks, memory_order_acquire);
    for (uint32_t i = 0; i < n * BLOCK_ENTRIES; i++) {
        struct entry *e = entry_at(i);
        if (e == NULL)
            break;
        for (;;) {
            uint64_t s = settled_state(e);
            unsigned st = (unsigned)(s & ST_MASK);
            if (st != ST_LIVE && st != ST_BROKEN)
                break;
            uintptr_t start = atomic_load(&e->start);
            uint64_t elen = atomic_load(&e->len);
            if (atomic_load(&e->state) != s)
                continue; /* changed while we read it: read again */
            if (!overlaps(start, elen, lo, hi))
                break;
            if (st == ST_BROKEN) { /* by a fault in another thread, maybe just now */
                broken++;
                break;
            }
            if (!last_byte_lost(self, start, elen)) {
                if (atomic_load(&e->state) != s)
                    continue; /* a handler put zeros there meanwhile: count it */
                break;        /* its file still holds all of it */
            }
            /* Broken by us, or being broken by a handler: read it again, to wait
             * for the handler and count it once it is done. */
            if (break_entry(e, s) < 0)
                break; /* no memory for the zero pages: left as it was */
        }
    }
    return broken;
}

int luna_guard_unregister(int id)
{
    struct entry *e = id < 0 ? NULL : entry_at((uint32_t)id);
    if (e == NULL)
        return -EINVAL;
    for (;;) {
        uint64_t s = settled_state(e);
        unsigned st = (unsigned)(s & ST_MASK);
        if (st != ST_LIVE && st != ST_BROKEN)
            return -EINVAL;
        if (atomic_compare_exchange_strong(&e->state, &s,
                                           (s & ~(uint64_t)ST_MASK) | ST_FREE))
            break;
    }
    struct block *b = atomic_load_explicit(&blocks[(uint32_t)id / BLOCK_ENTRIES],
                                           memory_order_acquire);
    atomic_fetch_sub_explicit(&b->used, 1, memory_order_relaxed);
    atomic_store_explicit(&free_hint, (uint32_t)id, memory_order_relaxed);
    return 0;
}

/* In a forked child, before it runs anything else: an entry another thread of
 * the parent had in a passing state (ST_FIXING, ST_CLAIMED, ST_SHRINKING) at the
 * fork would stay in it for ever, since only that thread ends it and it does
 * not exist here; unregister, break and the EFAULT absorb would wait for it in
 * settled_state() without end, a fault in the range would be retried without
 * end, and a shrinking entry could be neither checked nor freed, nor guarded.
 * Each is ended as that thread would have ended it:
 * - ST_FIXING (a SIGBUS handler replacing the pages): its file lost pages, so
 *   the range becomes zeros here and the entry ST_BROKEN (replace_pages). The
 *   child's pages are the file's or zeros already, depending on whether the
 *   fork came before or after that thread's mmap (fork and mmap exclude each
 *   other); mapping zeros again is right either way.
 * - ST_SHRINKING (luna_guard_shrink): the new length it was given
 *   (shrink_to, stored before its claim), then ST_LIVE.
 * - ST_CLAIMED (luna_guard_register before it returned): the id never reached
 *   any caller here, so nothing can ever unregister it: ST_FREE (the block's
 *   used count was not raised yet). Its mapping stays, unguarded and unknown
 *   to any object of the child, as any allocation of a thread lost in a fork.
 * Same generation in each case. Async-signal-safe (atomics, mmap, gettid,
 * clock_gettime), as a child of a threaded process needs. Cost: one load of
 * each entry's state, and no write (no page of the registry is copied) unless
 * one is settled; about 30 us with 10,000 mappings registered, against
 * milliseconds for the fork itself (docs/reliability.md). */
static void settle_in_child(void)
{
    uint32_t n = atomic_load_explicit(&nblocks, memory_order_acquire);
    for (uint32_t i = 0; i < n * BLOCK_ENTRIES; i++) {
        struct entry *e = entry_at(i);
        if (e == NULL)
            break;
        uint64_t s = atomic_load_explicit(&e->state, memory_order_relaxed);
        uint64_t gen = s & ~(uint64_t)ST_MASK;
        switch ((unsigned)(s & ST_MASK)) {
        case ST_FIXING:
            replace_pages(e, s);
            break;
        case ST_SHRINKING: {
            uint64_t len = atomic_load(&e->shrink_to);
            if (len > 0 && len <= atomic_load(&e->len))
                atomic_store(&e->len, len);
            atomic_store(&e->state, gen | ST_LIVE);
            break;
        }
        case ST_CLAIMED:
            atomic_store(&e->state, gen | ST_FREE);
            break;
        default:
            break;
        }
    }
}

int luna_guard_broken(int id)
{
    struct entry *e = id < 0 ? NULL : entry_at((uint32_t)id);
    if (e == NULL)
        return -EINVAL;
    unsigned st = (unsigned)(atomic_load(&e->state) & ST_MASK);
    if (st == ST_FREE || st == ST_CLAIMED || st == ST_SHRINKING)
        return -EINVAL; /* not a registered mapping (or one being cut): never "intact" */
    return st == ST_FIXING || st == ST_BROKEN;
}
