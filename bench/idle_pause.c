/* Does this machine run a step slower after an idle pause, with no Python, torch or threads involved? (issue 29:
   a follow-up arrives after the user's pause; the engine's compiled 16-row step took 2.4-3.2 ms back to back and
   5-8 ms after 0.2 s idle, docs/engine.md.) Times, back to back and after pauses of 10, 50, 200 and 1000 ms:
   (a) a register-only multiply-add loop (clock frequency, the virtual CPU itself), (b) one read of a buffer of
   MB megabytes (default 13: the compact preset's weights; what the caches and TLB kept while idle).

       cc -O2 -o /tmp/idle_pause bench/idle_pause.c && /tmp/idle_pause [MB] [repeats]

   Run under the shared lock (flock /tmp/gs/cpu.lock ...): other work sharing the cores changes what is evicted. */
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

static double now(void) { struct timespec t; clock_gettime(CLOCK_MONOTONIC, &t); return t.tv_sec + t.tv_nsec * 1e-9; }
static void pause_for(double s) { struct timespec t = {(time_t)s, (long)((s - (time_t)s) * 1e9)}; nanosleep(&t, 0); }
static int by_value(const void *a, const void *b) { double x = *(const double *)a, y = *(const double *)b; return (x > y) - (x < y); }
volatile double sink;

static double multiply_add(long n) {  /* two dependent chains in registers: no memory traffic */
    double a = 1.0, d = 1.0;
    for (long i = 0; i < n; i++) { a = a * 1.0000001 + 1e-9; d = d * 0.9999999 + 1e-9; }
    return a + d;
}

static double read_buffer(const float *buf, size_t n) {  /* 16 independent sums: bandwidth-bound, vectorised */
    float acc[16] = {0};
    double s = 0;
    for (size_t i = 0; i < n; i += 16)
        for (int k = 0; k < 16; k++) acc[k] += buf[i + k];
    for (int k = 0; k < 16; k++) s += acc[k];
    return s;
}

int main(int argc, char **argv) {
    double mb = argc > 1 ? atof(argv[1]) : 13;
    int repeats = argc > 2 ? atoi(argv[2]) : 15;
    if (repeats < 1 || repeats > 64) repeats = 15;
    size_t n = (size_t)(mb * 1024 * 1024 / 4) / 16 * 16;
    float *buf = aligned_alloc(64, n * 4 + 64);
    for (size_t i = 0; i < n; i++) buf[i] = (float)(i % 7);
    const double pauses[] = {0, 0.01, 0.05, 0.2, 1.0};
    for (int work = 0; work < 2; work++) {
        for (int p = 0; p < 5; p++) {
            double t[64];
            for (int i = 0; i < repeats; i++) {
                if (pauses[p] > 0) pause_for(pauses[p]);
                double start = now();
                sink = work == 0 ? multiply_add(3000000) : read_buffer(buf, n);
                t[i] = now() - start;
            }
            qsort(t, repeats, sizeof(double), by_value);
            printf("%s after %4.0f ms idle: median %.3f ms (%.3f-%.3f)\n",
                   work == 0 ? "multiply-add loop" : "read the buffer  ", pauses[p] * 1e3, t[repeats / 2] * 1e3,
                   t[0] * 1e3, t[repeats - 1] * 1e3);
        }
    }
    free(buf);
    return 0;
}
