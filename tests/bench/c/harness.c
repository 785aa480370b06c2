/* Timing and evaluation harness for the C -O2 references of the firmware kernels.
 *
 *   harness bench MIN_MS REPEATS   one JSON line per kernel: raw ns/call, empty-call
 *                                  baseline ns/call, and their difference
 *   harness eval                   reads "kernel ints..." lines on stdin and prints the
 *                                  outputs, so the smoke test can compare with viper
 *
 * Built with plain gcc -O2 for timing (and with UBSan for the smoke test's eval runs).
 * Kernels and the empty baselines are noipa: gcc may neither inline them nor reason
 * about their bodies across the call, so every timed call really happens, like a viper
 * call.
 * Outputs are folded into a volatile sink so the work cannot be dropped either.
 */
#define _POSIX_C_SOURCE 199309L
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#define KERNEL __attribute__((noipa))

static volatile int64_t sink;

static int64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

/* Best-of-`repeats` ns per call, with n grown until one run lasts >= min_ns. */
static double measure(void (*loop)(long), int64_t min_ns, int repeats)
{
    long n = 64;
    int64_t t;
    for (;;) {
        t = now_ns();
        loop(n);
        t = now_ns() - t;
        if (t >= min_ns)
            break;
        n *= (t > 0 && t < min_ns / 8) ? 8 : 2;
    }
    double best = (double)t / n;
    for (int r = 1; r < repeats; r++) {
        t = now_ns();
        loop(n);
        t = now_ns() - t;
        if ((double)t / n < best)
            best = (double)t / n;
    }
    return best;
}

#include "bme280_ref.c"

/* ---- BME280 compensation -------------------------------------------------------- */

/* The datasheet's example calibration (the same bytes as tests/bench/mpy/cases.py) and a
 * data burst for about 27 degC, 101 kPa, 46 %RH. */
static const uint8_t BME_CAL_A[26] = {
    0x70, 0x6B, 0x43, 0x67, 0x18, 0xFC, 0x7D, 0x8E, 0x43, 0xD6, 0xD0, 0x0B, 0x27, 0x0B,
    0x8C, 0x00, 0xF9, 0xFF, 0x8C, 0x3C, 0xF8, 0xC6, 0x70, 0x17, 0x00, 0x4B};
static const uint8_t BME_CAL_B[7] = {0x6E, 0x01, 0x00, 0x13, 0x2D, 0x03, 0x1E};
static uint8_t bme_data[8] = {0x65, 0x80, 0x00, 0x80, 0x79, 0x00, 0x6F, 0x9A};
static bme280_calib bme_cal;
static int32_t bme_out[3];

KERNEL static int32_t bme_empty(const uint8_t *d, const bme280_calib *c, int32_t *out)
{
    (void)d; (void)c; (void)out;
    return 0;
}
KERNEL static int32_t bme_kernel(const uint8_t *d, const bme280_calib *c, int32_t *out)
{
    return bme280_compensate(d, c, out);
}
static void bme_loop(long n)
{
    int64_t acc = 0;
    for (long i = 0; i < n; i++)
        acc += bme_kernel(bme_data, &bme_cal, bme_out) + bme_out[2];
    sink = acc;
}
static void bme_loop_empty(long n)
{
    int64_t acc = 0;
    for (long i = 0; i < n; i++)
        acc += bme_empty(bme_data, &bme_cal, bme_out) + bme_out[2];
    sink = acc;
}

static void bme_setup(void) { bme280_parse_calib(BME_CAL_A, BME_CAL_B, &bme_cal); }

#include "kernels_ref.c"

/* ---- table ------------------------------------------------------------------------ */

typedef struct {
    const char *name;
    void (*setup)(void);
    void (*loop)(long);
    void (*loop_empty)(long);
} bench_entry;

static const bench_entry BENCHES[] = {
    {"bme280", bme_setup, bme_loop, bme_loop_empty},
    KERNEL_BENCHES /* from kernels_ref.c */
};

static int read_ints(char *line, long *v, int max)
{
    int n = 0;
    char *tok = strtok(line, " \t\r\n");
    while (tok && n < max) {
        v[n++] = strtol(tok, NULL, 0);
        tok = strtok(NULL, " \t\r\n");
    }
    return n;
}

static int eval(void)
{
    char line[8192];
    long v[512];
    while (fgets(line, sizeof line, stdin)) {
        char *name = strtok(line, " \t\r\n");
        if (!name)
            continue;
        int n = read_ints(name + strlen(name) + 1, v, 512);
        if (strcmp(name, "bme280") == 0 && n == 41) {
            uint8_t a[26], b[7], d[8];
            bme280_calib c;
            int32_t out[3];
            for (int i = 0; i < 26; i++) a[i] = (uint8_t)v[i];
            for (int i = 0; i < 7; i++) b[i] = (uint8_t)v[26 + i];
            for (int i = 0; i < 8; i++) d[i] = (uint8_t)v[33 + i];
            bme280_parse_calib(a, b, &c);
            int32_t t_fine = bme280_compensate(d, &c, out);
            printf("%d %d %d %d\n", out[0], out[1], out[2], t_fine);
        } else if (!kernels_eval(name, v, n)) {
            fprintf(stderr, "harness: bad eval line for %s (%d ints)\n", name, n);
            return 2;
        }
        fflush(stdout);
    }
    return 0;
}

int main(int argc, char **argv)
{
    if (argc >= 2 && strcmp(argv[1], "eval") == 0)
        return eval();
    if (argc >= 4 && strcmp(argv[1], "bench") == 0) {
        int64_t min_ns = (int64_t)(atof(argv[2]) * 1e6);
        int repeats = atoi(argv[3]);
        for (size_t k = 0; k < sizeof BENCHES / sizeof BENCHES[0]; k++) {
            const bench_entry *b = &BENCHES[k];
            if (argc >= 5 && strcmp(argv[4], b->name) != 0)
                continue;
            b->setup();
            double raw = measure(b->loop, min_ns, repeats);
            double base = measure(b->loop_empty, min_ns, repeats);
            printf("{\"kernel\": \"%s\", \"raw_ns\": %.3f, \"base_ns\": %.3f, \"ns\": %.3f}\n",
                   b->name, raw, base, raw - base);
            fflush(stdout);
        }
        return 0;
    }
    fprintf(stderr, "usage: harness bench MIN_MS REPEATS [KERNEL] | harness eval\n");
    return 2;
}
