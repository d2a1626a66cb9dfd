/* The thread pool, the call lock and the scratch workspace.
 *
 * Workers are persistent. A job is published by bumping a generation counter; a waiting worker
 * spins on it for a while (a decode step issues kernels microseconds apart, and waking a sleeping
 * thread costs about as much as a small kernel), then sleeps on a condition variable. The caller
 * takes part as thread 0, then spins until every worker has finished.
 *
 * One pool for every platform, written over a handful of primitives defined per platform just
 * below: pthreads and GCC/clang atomics on POSIX, Win32 threads, SRW locks, condition variables
 * and Interlocked functions on Windows (MSVC and MinGW). The kernels' results do not depend on
 * the thread count.
 */
#define _POSIX_C_SOURCE 200809L /* posix_memalign, pthread_atfork under -std=c11 */
#include <stdlib.h>

#include "kernels_impl.h"

static void worker_main(int ith);   /* the pool's worker loop, run by thread_start */

/* The workers' stack, set rather than left to the platform: kernels keep a work item's scratch on
 * the stack (the avx512 q4_k / q6_k prefill about 275 KiB), more than some defaults give a new
 * thread (musl 128 KiB, macOS 512 KiB). */
#define WORKER_STACK_BYTES ((size_t)4 << 20)

/* ---- platform primitives ----
 * sync_int: a word the pool's threads share; sync_load, sync_store and sync_add are sequentially
 * consistent. A pool job makes a handful of these accesses, so the strongest ordering costs nothing
 * measurable and keeps the wake-up argument in publish() simple.
 * counter_next: a work-item counter's fetch-and-add; now_seconds: a monotonic clock.
 * cpu_relax: the pause inside a spin loop; yield_thread: give the core to another thread.
 * aligned_alloc64 / aligned_free64: 64-byte aligned memory for the workspace. */

#if defined(_WIN32)

#include <windows.h>
#include <process.h>

typedef LONG sync_int;
/* Aligned 32-bit reads are atomic on Windows; the full barrier after one makes it a sequentially
 * consistent load on every Windows architecture (ARM64 included), as the Interlocked functions
 * (full barriers) are for stores and additions. */
static sync_int sync_load(sync_int *p) {
    sync_int v = *(volatile sync_int *)p;
    MemoryBarrier();
    return v;
}
static void sync_store(sync_int *p, sync_int v) { InterlockedExchange(p, v); }
static void sync_add(sync_int *p, sync_int delta) { InterlockedExchangeAdd(p, delta); }

static size_t counter_next(volatile size_t *counter) {
    return (size_t)InterlockedExchangeAdd64((volatile LONG64 *)counter, 1);
}

static double now_seconds(void) {
    LARGE_INTEGER t, f;
    QueryPerformanceCounter(&t);
    QueryPerformanceFrequency(&f);
    return (double)t.QuadPart / (double)f.QuadPart;
}

static void *aligned_alloc64(size_t nbytes) { return _aligned_malloc(nbytes, 64); }
static void aligned_free64(void *p) { _aligned_free(p); }

#define cpu_relax() YieldProcessor()
static void yield_thread(void) { SwitchToThread(); }

typedef SRWLOCK os_lock;
#define LOCK_INIT SRWLOCK_INIT
static void lock_init(os_lock *m) { InitializeSRWLock(m); }
static void lock_acquire(os_lock *m) { AcquireSRWLockExclusive(m); }
static void lock_release(os_lock *m) { ReleaseSRWLockExclusive(m); }

typedef CONDITION_VARIABLE os_cond;
#define COND_INIT CONDITION_VARIABLE_INIT
static void cond_init(os_cond *c) { InitializeConditionVariable(c); }
static void cond_wait(os_cond *c, os_lock *m) { SleepConditionVariableSRW(c, m, INFINITE, 0); }
static void cond_broadcast(os_cond *c) { WakeAllConditionVariable(c); }

/* _beginthreadex rather than CreateThread: the C runtime sets up its per-thread state. */
typedef HANDLE os_thread;
static unsigned __stdcall thread_entry(void *arg) {
    worker_main((int)(size_t)arg);
    return 0;
}
static int thread_start(os_thread *t, int ith) {
    *t = (HANDLE)_beginthreadex(NULL, WORKER_STACK_BYTES, thread_entry, (void *)(size_t)ith, 0, NULL);
    return *t != NULL;
}
static void thread_join(os_thread t) {
    WaitForSingleObject(t, INFINITE);
    CloseHandle(t);
}

/* Windows has no fork(). */
static void on_fork_child(void (*handler)(void)) { (void)handler; }

#else /* POSIX */

#include <pthread.h>
#include <sched.h>

typedef int sync_int;
static sync_int sync_load(sync_int *p) { return __atomic_load_n(p, __ATOMIC_SEQ_CST); }
static void sync_store(sync_int *p, sync_int v) { __atomic_store_n(p, v, __ATOMIC_SEQ_CST); }
static void sync_add(sync_int *p, sync_int delta) { __atomic_add_fetch(p, delta, __ATOMIC_SEQ_CST); }

static size_t counter_next(volatile size_t *counter) {
    return __atomic_fetch_add(counter, 1, __ATOMIC_RELAXED);
}

#include <time.h>
static double now_seconds(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec + 1e-9 * (double)t.tv_nsec;
}

static void *aligned_alloc64(size_t nbytes) {
    void *p = NULL;
    return posix_memalign(&p, 64, nbytes) == 0 ? p : NULL;
}
static void aligned_free64(void *p) { free(p); }

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define cpu_relax() _mm_pause()
#elif defined(__aarch64__)
#define cpu_relax() __asm__ __volatile__("yield")
#else
#define cpu_relax() ((void)0)
#endif
static void yield_thread(void) { sched_yield(); }

typedef pthread_mutex_t os_lock;
#define LOCK_INIT PTHREAD_MUTEX_INITIALIZER
static void lock_init(os_lock *m) { pthread_mutex_init(m, NULL); }
static void lock_acquire(os_lock *m) { pthread_mutex_lock(m); }
static void lock_release(os_lock *m) { pthread_mutex_unlock(m); }

typedef pthread_cond_t os_cond;
#define COND_INIT PTHREAD_COND_INITIALIZER
static void cond_init(os_cond *c) { pthread_cond_init(c, NULL); }
static void cond_wait(os_cond *c, os_lock *m) { pthread_cond_wait(c, m); }
static void cond_broadcast(os_cond *c) { pthread_cond_broadcast(c); }

typedef pthread_t os_thread;
static void *thread_entry(void *arg) {
    worker_main((int)(size_t)arg);
    return NULL;
}
static int thread_start(os_thread *t, int ith) {
    pthread_attr_t attr;
    if (pthread_attr_init(&attr) != 0) return 0;
    const int started = pthread_attr_setstacksize(&attr, WORKER_STACK_BYTES) == 0 &&
                        pthread_create(t, &attr, thread_entry, (void *)(size_t)ith) == 0;
    pthread_attr_destroy(&attr);
    return started;
}
static void thread_join(os_thread t) { pthread_join(t, NULL); }

/* Runs `handler` in the child after every fork(); installed once. */
static void (*fork_child_handler)(void);
static pthread_once_t fork_handler_once = PTHREAD_ONCE_INIT;
static void install_fork_handler(void) { pthread_atfork(NULL, NULL, fork_child_handler); }
static void on_fork_child(void (*handler)(void)) {
    fork_child_handler = handler;
    pthread_once(&fork_handler_once, install_fork_handler);
}

#endif

/* ---- the scratch workspace (guarded by the call lock) ---- */

static void *workspace = NULL;
static size_t workspace_size = 0;

void *blob_workspace(size_t nbytes) {
    if (nbytes <= workspace_size) return workspace;
    size_t grown = nbytes + nbytes / 2 + 4096;   /* geometric growth: few reallocations */
    void *p = aligned_alloc64(grown);
    if (!p) return NULL;
    aligned_free64(workspace);
    workspace = p;
    workspace_size = grown;
    return p;
}

/* ---- the pool ---- */

/* Rounds of cpu_relax() before a worker sleeps (or the caller starts yielding): about 100 us on
 * Zen 4, where a pause takes ~25 ns (it varies between CPUs). That spans the gaps between a
 * token's kernels (microseconds) and most gaps between tokens; a longer spin burns a core that
 * other programs, or the caller's own thread on a busy machine, need (at 0.5 ms, a pool job
 * cost ~1 ms with another program busy on the second core). */
#define SPIN_ROUNDS 4000

static os_lock call_mutex = LOCK_INIT;
void blob_call_lock(void) { lock_acquire(&call_mutex); }
void blob_call_unlock(void) { lock_release(&call_mutex); }

static struct {
    os_lock mutex;
    os_cond wake;
    int nthreads;            /* including the caller */
    int running;             /* workers currently started */
    os_thread workers[BLOB_MAX_THREADS];
    sync_int generation;     /* bumped to publish a job, or to stop */
    sync_int stop;
    sync_int sleepers;
    sync_int pending;        /* workers still inside the current job */
    blob_task_fn task;
    void *ctx;
} pool = {.mutex = LOCK_INIT, .wake = COND_INIT, .nthreads = 1};

/* Blocks until the generation differs from `seen`: spin first, then sleep. */
static sync_int wait_for_job(sync_int seen) {
    for (int i = 0; i < SPIN_ROUNDS; i++) {
        sync_int g = sync_load(&pool.generation);
        if (g != seen) return g;
        cpu_relax();
    }
    lock_acquire(&pool.mutex);
    sync_add(&pool.sleepers, 1);
    sync_int g;
    while ((g = sync_load(&pool.generation)) == seen) cond_wait(&pool.wake, &pool.mutex);
    sync_add(&pool.sleepers, -1);
    lock_release(&pool.mutex);
    return g;
}

static void worker_main(int ith) {
    sync_int seen = 0;
    for (;;) {
        seen = wait_for_job(seen);
        if (sync_load(&pool.stop)) return;
        pool.task(pool.ctx, ith, pool.nthreads);
        sync_add(&pool.pending, -1);
    }
}

/* Wakes every worker after a generation bump; the sequentially consistent pair (generation,
 * sleepers) makes sure a worker either sees the new generation or is counted as a sleeper and
 * woken. */
static void publish(void) {
    sync_add(&pool.generation, 1);
    if (sync_load(&pool.sleepers) > 0) {
        lock_acquire(&pool.mutex);
        cond_broadcast(&pool.wake);
        lock_release(&pool.mutex);
    }
}

static void wait_for_workers(void) {
    for (unsigned spins = 0; sync_load(&pool.pending) > 0; spins++) {
        if (spins < SPIN_ROUNDS) cpu_relax();
        else yield_thread();   /* a worker was descheduled: give it the core */
    }
}

static void stop_workers(void) {
    if (pool.running == 0) return;
    sync_store(&pool.stop, 1);
    publish();
    for (int i = 1; i <= pool.running; i++) thread_join(pool.workers[i]);
    pool.running = 0;
    pool.stop = 0;
}

/* A forked child has no workers: forget them (their memory is the parent's copy). */
static void forget_workers_after_fork(void) {
    pool.running = 0;
    pool.stop = 0;
    pool.sleepers = 0;
    pool.pending = 0;
    lock_init(&pool.mutex);
    cond_init(&pool.wake);
    lock_init(&call_mutex);
}

static void start_workers(void) {
    on_fork_child(forget_workers_after_fork);
    pool.generation = 0;
    for (int i = 1; i < pool.nthreads; i++) {
        if (!thread_start(&pool.workers[i], i)) {
            stop_workers();
            pool.nthreads = 1;   /* degrade to single-threaded rather than fail the kernel */
            return;
        }
        pool.running = i;
    }
}

int blob_threads_get(void) { return pool.nthreads; }

int blob_threads_set(int n) {
    if (n < 1 || n > BLOB_MAX_THREADS) return BLOB_EINVAL;
    blob_call_lock();
    if (n != pool.nthreads) {
        stop_workers();
        pool.nthreads = n;
    }
    blob_call_unlock();
    return BLOB_OK;
}

/* ---- the work-split trace ----
 * While on, every pool job runs on the caller alone and each blob_next_item call is timestamped:
 * the gaps between one job's calls are its work items as planned for pool.nthreads threads, which
 * bench/simulate_threads.py replays on any number of threads. The planned split, not this
 * machine's core count, decides how evenly 8 or 16 threads share a step. */
static struct {
    double *at;          /* [capacity] event times, seconds */
    uint32_t *job;       /* [capacity] the job of each event; a job's first event is its start */
    size_t capacity, length;
    uint32_t jobs;
    int on, overflow;
    int in_job;          /* the caller is inside a traced pool job: the serial work outside is not items */
} trace;

static void trace_event(void) {
    if (trace.length == trace.capacity) {
        trace.overflow = 1;
        return;
    }
    trace.at[trace.length] = now_seconds();
    trace.job[trace.length++] = trace.jobs - 1;
}

size_t blob_next_item(volatile size_t *counter) {
    if (trace.in_job) trace_event();
    return counter_next(counter);
}

void blob_trace_begin(double *at, uint32_t *job, size_t capacity) {
    blob_call_lock();
    trace.at = at;
    trace.job = job;
    trace.capacity = capacity;
    trace.length = trace.overflow = 0;
    trace.jobs = 0;
    trace.on = 1;
    blob_call_unlock();
}

size_t blob_trace_end(void) {
    blob_call_lock();
    trace.on = 0;
    blob_call_unlock();
    return trace.overflow ? (size_t)-1 : trace.length;
}

void blob_pool_run(blob_task_fn task, void *ctx) {
    if (trace.on) {
        trace.jobs++;
        trace_event();
        trace.in_job = 1;
        task(ctx, 0, 1);
        trace.in_job = 0;
        return;
    }
    if (pool.nthreads > 1 && pool.running != pool.nthreads - 1) start_workers();
    if (pool.nthreads == 1) {
        task(ctx, 0, 1);
        return;
    }
    pool.task = task;
    pool.ctx = ctx;
    sync_store(&pool.pending, pool.nthreads - 1);
    publish();
    task(ctx, 0, pool.nthreads);
    wait_for_workers();
}
