/* The thread pool, the call lock and the scratch workspace.
 *
 * Workers are persistent. A job is published by bumping a generation counter; a waiting worker
 * spins on it for a while (a decode step issues kernels microseconds apart, and a futex wake
 * costs about as much as a small kernel), then sleeps on a condition variable. The caller
 * takes part as thread 0, then spins until every worker has finished.
 *
 * Windows: no pool yet; blob_pool_run runs the whole job on the caller as thread 0 of 1, and
 * blob_threads_set accepts only 1. The kernels' results do not depend on the thread count.
 */
#define _POSIX_C_SOURCE 200809L /* posix_memalign, pthread_atfork under -std=c11 */
#include <stdlib.h>

#include "kernels_impl.h"

/* ---- the scratch workspace (guarded by the call lock) ---- */

static void *workspace = NULL;
static size_t workspace_size = 0;

static void *aligned_alloc64(size_t nbytes) {
#if defined(_WIN32)
    return _aligned_malloc(nbytes, 64);
#else
    void *p = NULL;
    return posix_memalign(&p, 64, nbytes) == 0 ? p : NULL;
#endif
}

static void aligned_free64(void *p) {
#if defined(_WIN32)
    _aligned_free(p);
#else
    free(p);
#endif
}

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

#if defined(_WIN32)

#include <windows.h>

static SRWLOCK call_mutex = SRWLOCK_INIT;
void blob_call_lock(void) { AcquireSRWLockExclusive(&call_mutex); }
void blob_call_unlock(void) { ReleaseSRWLockExclusive(&call_mutex); }

size_t blob_next_item(volatile size_t *counter) {
    return (size_t)InterlockedExchangeAdd64((volatile LONG64 *)counter, 1);
}

int blob_threads_get(void) { return 1; }
int blob_threads_set(int n) { return n == 1 ? BLOB_OK : BLOB_EINVAL; }
void blob_pool_run(blob_task_fn task, void *ctx) { task(ctx, 0, 1); }

#else /* POSIX threads */

#include <pthread.h>
#include <sched.h>

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define cpu_relax() _mm_pause()
#elif defined(__aarch64__)
#define cpu_relax() __asm__ __volatile__("yield")
#else
#define cpu_relax() ((void)0)
#endif

#define SPIN_ROUNDS 20000 /* of cpu_relax(): tens of microseconds before a worker sleeps */

static pthread_mutex_t call_mutex = PTHREAD_MUTEX_INITIALIZER;
void blob_call_lock(void) { pthread_mutex_lock(&call_mutex); }
void blob_call_unlock(void) { pthread_mutex_unlock(&call_mutex); }

size_t blob_next_item(volatile size_t *counter) {
    return __atomic_fetch_add(counter, 1, __ATOMIC_RELAXED);
}

static struct {
    pthread_mutex_t mutex;
    pthread_cond_t wake;
    int nthreads;            /* including the caller */
    int running;             /* workers currently started */
    pthread_t workers[BLOB_MAX_THREADS];
    unsigned generation;     /* bumped to publish a job, or to stop */
    int stop;
    int sleepers;
    int pending;             /* workers still inside the current job */
    blob_task_fn task;
    void *ctx;
} pool = {PTHREAD_MUTEX_INITIALIZER, PTHREAD_COND_INITIALIZER, 1, 0, {0}, 0, 0, 0, 0, 0, 0};

static unsigned load_generation(void) { return __atomic_load_n(&pool.generation, __ATOMIC_ACQUIRE); }

/* Blocks until the generation differs from `seen`: spin first, then sleep. */
static unsigned wait_for_job(unsigned seen) {
    for (int i = 0; i < SPIN_ROUNDS; i++) {
        unsigned g = load_generation();
        if (g != seen) return g;
        cpu_relax();
    }
    pthread_mutex_lock(&pool.mutex);
    __atomic_add_fetch(&pool.sleepers, 1, __ATOMIC_SEQ_CST);
    unsigned g;
    while ((g = __atomic_load_n(&pool.generation, __ATOMIC_SEQ_CST)) == seen)
        pthread_cond_wait(&pool.wake, &pool.mutex);
    __atomic_sub_fetch(&pool.sleepers, 1, __ATOMIC_SEQ_CST);
    pthread_mutex_unlock(&pool.mutex);
    return g;
}

static void *worker_main(void *arg) {
    int ith = (int)(size_t)arg;
    unsigned seen = 0;
    for (;;) {
        seen = wait_for_job(seen);
        if (__atomic_load_n(&pool.stop, __ATOMIC_ACQUIRE)) return NULL;
        pool.task(pool.ctx, ith, pool.nthreads);
        __atomic_sub_fetch(&pool.pending, 1, __ATOMIC_ACQ_REL);
    }
}

/* Wakes every worker after a generation bump; the seq_cst pair (generation, sleepers) makes
 * sure a worker either sees the new generation or is counted as a sleeper and woken. */
static void publish(void) {
    __atomic_add_fetch(&pool.generation, 1, __ATOMIC_SEQ_CST);
    if (__atomic_load_n(&pool.sleepers, __ATOMIC_SEQ_CST) > 0) {
        pthread_mutex_lock(&pool.mutex);
        pthread_cond_broadcast(&pool.wake);
        pthread_mutex_unlock(&pool.mutex);
    }
}

static void wait_for_workers(void) {
    for (unsigned spins = 0; __atomic_load_n(&pool.pending, __ATOMIC_ACQUIRE) > 0; spins++) {
        if (spins < SPIN_ROUNDS) cpu_relax();
        else sched_yield();   /* a worker was descheduled: give it the core */
    }
}

static void stop_workers(void) {
    if (pool.running == 0) return;
    __atomic_store_n(&pool.stop, 1, __ATOMIC_RELEASE);
    publish();
    for (int i = 1; i <= pool.running; i++) pthread_join(pool.workers[i], NULL);
    pool.running = 0;
    pool.stop = 0;
}

static int start_workers(void) {
    pool.generation = 0;
    for (int i = 1; i < pool.nthreads; i++) {
        if (pthread_create(&pool.workers[i], NULL, worker_main, (void *)(size_t)i) != 0) {
            stop_workers();
            pool.nthreads = 1;   /* degrade to single-threaded rather than fail the kernel */
            return BLOB_ENOMEM;
        }
        pool.running = i;
    }
    return BLOB_OK;
}

/* A forked child has no workers: forget them (their memory is the parent's copy). */
static void forget_workers_after_fork(void) {
    pool.running = 0;
    pool.stop = 0;
    pool.sleepers = 0;
    pool.pending = 0;
    pthread_mutex_init(&pool.mutex, NULL);
    pthread_cond_init(&pool.wake, NULL);
    pthread_mutex_init(&call_mutex, NULL);
}

static pthread_once_t fork_handler_once = PTHREAD_ONCE_INIT;
static void install_fork_handler(void) { pthread_atfork(NULL, NULL, forget_workers_after_fork); }

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

void blob_pool_run(blob_task_fn task, void *ctx) {
    if (pool.nthreads > 1 && pool.running != pool.nthreads - 1) {
        pthread_once(&fork_handler_once, install_fork_handler);
        start_workers();
    }
    if (pool.nthreads == 1) {
        task(ctx, 0, 1);
        return;
    }
    pool.task = task;
    pool.ctx = ctx;
    __atomic_store_n(&pool.pending, pool.nthreads - 1, __ATOMIC_RELEASE);
    publish();
    task(ctx, 0, pool.nthreads);
    wait_for_workers();
}

#endif
