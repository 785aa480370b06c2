/* C references of firmware/canopy/{condition,control,health}.py kernels.
 *
 * Same buffers, same layouts, same integer arithmetic as the viper kernels, written as
 * natural C on int32_t. The viper "(x ^ sgn) - sgn" sign extension after each load is
 * not reproduced: it only exists because ptr32 loads zero-extend on the unix port, and
 * C's int32_t loads are signed already. Included by harness.c.
 */
#include <stdint.h>

/* ---- condition.py: median-of-5 + EMA ---------------------------------------------- */

#define SWAP_GT(x, y) do { if ((x) > (y)) { int32_t t_ = (x); (x) = (y); (y) = t_; } } while (0)

KERNEL static void condition_ref(const int32_t *raw, int32_t *hist, int32_t *ema,
                                 const int32_t *shift, int32_t *out, int n, int pos)
{
    for (int c = 0; c < n; c++) {
        int32_t *h = hist + c * 5;
        h[pos] = raw[c];
        int32_t a = h[0], b = h[1], d = h[2], f = h[3], g = h[4];
        /* the same 9-comparator network as condition_kernel; median in d */
        SWAP_GT(a, f); SWAP_GT(b, g); SWAP_GT(a, d); SWAP_GT(b, f); SWAP_GT(a, b);
        SWAP_GT(d, g); SWAP_GT(b, d); SWAP_GT(f, g); SWAP_GT(d, f);
        int32_t s = ema[c];
        /* d * 256 is viper's d << 8; C leaves << of a negative value undefined. Right
         * shifts of negatives are arithmetic in gcc, like viper's. */
        s = s + ((d * 256 - s) >> shift[c]);
        ema[c] = s;
        out[c] = (s + 128) >> 8;
    }
}

KERNEL static void condition_empty(const int32_t *raw, int32_t *hist, int32_t *ema,
                                   const int32_t *shift, int32_t *out, int n, int pos)
{
    (void)raw; (void)hist; (void)ema; (void)shift; (void)out; (void)n; (void)pos;
}

/* ---- control.py: three PI loops ---------------------------------------------------- */

KERNEL static void control_ref(const int32_t *m, const int32_t *p, int32_t *s, int32_t *o, int n)
{
    for (int a = 0; a < n; a++) {
        const int32_t *row = p + a * 11;
        int32_t lo = row[5], hi = row[6];
        int32_t *st = s + a * 2;
        if (row[8] && m[row[9]] >= row[10]) {
            st[0] = lo << 16;
            st[1] = lo;
            o[a] = lo;
            continue;
        }
        int32_t err = m[row[0]] - row[1];
        int32_t elim = row[4];
        if (err > elim)
            err = elim;
        else if (err < -elim)
            err = -elim;
        int32_t up = (row[2] * err) >> 16;
        int32_t integ = st[0], prev = st[1];
        int32_t top = prev + row[7];
        if (top > hi)
            top = hi;
        int32_t bot = prev - row[7];
        if (bot < lo)
            bot = lo;
        int32_t u = up + (integ >> 16);
        if (!((u >= top && err > 0) || (u <= bot && err < 0))) {
            integ = integ + row[3] * err;
            if (integ > (hi << 16))
                integ = hi << 16;
            else if (integ < (lo << 16))
                integ = lo << 16;
            st[0] = integ;
            u = up + (integ >> 16);
        }
        if (u > top)
            u = top;
        else if (u < bot)
            u = bot;
        st[1] = u;
        o[a] = u;
    }
}

KERNEL static void control_empty(const int32_t *m, const int32_t *p, int32_t *s, int32_t *o, int n)
{
    (void)m; (void)p; (void)s; (void)o; (void)n;
}

/* ---- health.py: missing / stuck / range with latch and recovery ------------------- */

KERNEL static int32_t health_ref(const int32_t *r, const int32_t *L, int32_t *s, int n, int present)
{
    int32_t stuck_n = L[2 * n], recover_m = L[2 * n + 1];
    int32_t cur = 0;
    if (!present) {
        cur = 1;
        s[n] = 0;
        s[n + 1] = 0;
    } else {
        int32_t same = s[n];
        for (int c = 0; c < n; c++) {
            int32_t x = r[c];
            if (x < L[2 * c] || x > L[2 * c + 1])
                cur |= 4;
            if (x != s[c])
                same = 0;
            s[c] = x;
        }
        int32_t run = 1;
        if (same) {
            run = s[n + 1] + 1;
            if (run > stuck_n)
                run = stuck_n;
        }
        s[n] = 1;
        s[n + 1] = run;
        if (run >= stuck_n)
            cur |= 2;
    }
    int32_t latched = s[n + 3];
    if (cur) {
        latched |= cur;
        s[n + 2] = 0;
    } else {
        int32_t good = s[n + 2] + 1;
        if (good >= recover_m) {
            good = recover_m;
            latched = 0;
        }
        s[n + 2] = good;
    }
    s[n + 3] = latched;
    return latched;
}

KERNEL static int32_t health_empty(const int32_t *r, const int32_t *L, int32_t *s, int n, int present)
{
    (void)r; (void)L; (void)s; (void)n; (void)present;
    return 0;
}

/* ---- bench state: as tests/mpy/kernels_bench_inputs.py builds it ------------------- */

static int32_t k_raw[3] = {2512, 101325, 51200};
static int32_t k_meas[3];
static int32_t k_out[3];
static int32_t k_hist[15], k_ema[3];
static int32_t k_shift[3] = {2, 3, 2};
static int32_t k_par[33];
static int32_t k_cst[6];
static int32_t k_lim[8] = {-4000, 8500, 30000, 110000, 0, 100 * 1024, 20, 5};
static int32_t k_hst[7];

static void kernels_setup(void)
{
    /* canopy/control.py rows for DEFAULT_CONFIG:
     * ch, sp, kp, ki, elim = min(2**30 // max(kp, ki, 1), 2**22), lo, hi, slew,
     * block_en, block_ch, block_thr */
    static const int32_t par[33] = {
        0, 2600, 25 * 65536, 65536 / 20, (1 << 30) / (25 * 65536), 0, 10000, 500, 0, 0, 0,
        0, 2900, 33 * 65536, 65536 / 10, (1 << 30) / (33 * 65536), 0, 10000, 10000, 1, 2, 85 * 1024,
        2, 70 * 1024, 65536, 65536 / 500, 1 << 14, 0, 10000, 1000, 0, 0, 0,
    };
    static const int32_t spikes[3] = {9000, 50000, 1000};
    int32_t raw0[3] = {2512, 101325, 51200};
    for (int i = 0; i < 33; i++)
        k_par[i] = par[i];
    /* condition_args(): primed history, one spike per channel in slot 4, ring slot 2 */
    for (int c = 0; c < 3; c++) {
        k_raw[c] = raw0[c];
        for (int i = 0; i < 5; i++)
            k_hist[c * 5 + i] = raw0[c];
        k_hist[c * 5 + 4] = spikes[c];
        k_ema[c] = raw0[c] << 8;
    }
    /* control_args(): the controller's start state (safe shade 5000, safe fan 3000),
     * then 5 steps at 29.50 degC, 75 %RH */
    int32_t st0[6] = {0, 5000, 0, 0, 0, 3000};
    for (int i = 0; i < 6; i++)
        k_cst[i] = st0[i];
    k_meas[0] = 2950;
    k_meas[1] = 101325;
    k_meas[2] = 75 * 1024;
    for (int i = 0; i < 5; i++)
        control_ref(k_meas, k_par, k_cst, k_out, 3);
    /* health_args(): one healthy check of raw0, then T differs by one count */
    for (int i = 0; i < 7; i++)
        k_hst[i] = 0;
    health_ref(k_raw, k_lim, k_hst, 3, 1);
    k_raw[0] = 2513;
}

static void condition_loop(long n)
{
    int64_t acc = 0;
    for (long i = 0; i < n; i++) {
        condition_ref(k_raw, k_hist, k_ema, k_shift, k_out, 3, 2);
        acc += k_out[0];
    }
    sink = acc;
}
static void condition_loop_empty(long n)
{
    int64_t acc = 0;
    for (long i = 0; i < n; i++) {
        condition_empty(k_raw, k_hist, k_ema, k_shift, k_out, 3, 2);
        acc += k_out[0];
    }
    sink = acc;
}
static void control_loop(long n)
{
    int64_t acc = 0;
    for (long i = 0; i < n; i++) {
        control_ref(k_meas, k_par, k_cst, k_out, 3);
        acc += k_out[0];
    }
    sink = acc;
}
static void control_loop_empty(long n)
{
    int64_t acc = 0;
    for (long i = 0; i < n; i++) {
        control_empty(k_meas, k_par, k_cst, k_out, 3);
        acc += k_out[0];
    }
    sink = acc;
}
static void health_loop(long n)
{
    int64_t acc = 0;
    for (long i = 0; i < n; i++)
        acc += health_ref(k_raw, k_lim, k_hst, 3, 1);
    sink = acc;
}
static void health_loop_empty(long n)
{
    int64_t acc = 0;
    for (long i = 0; i < n; i++)
        acc += health_empty(k_raw, k_lim, k_hst, 3, 1);
    sink = acc;
}

/* The tick's compute, without I/O: compensate, health check, condition, control.
 * adc_T alternates by 32 counts, as in tests/bench/mpy/cases.py's pipeline. */
static void tick_loop(long n)
{
    int64_t acc = 0;
    for (long i = 0; i < n; i++) {
        bme_data[4] = (uint8_t)(0x79 + 2 * (i & 1));
        acc += bme_kernel(bme_data, &bme_cal, k_raw);
        acc += health_ref(k_raw, k_lim, k_hst, 3, 1);
        condition_ref(k_raw, k_hist, k_ema, k_shift, k_meas, 3, (int)(i % 5));
        control_ref(k_meas, k_par, k_cst, k_out, 3);
        acc += k_out[0];
    }
    sink = acc;
}
static void tick_loop_empty(long n)
{
    int64_t acc = 0;
    for (long i = 0; i < n; i++) {
        bme_data[4] = (uint8_t)(0x79 + 2 * (i & 1));
        acc += bme_empty(bme_data, &bme_cal, k_raw);
        acc += health_empty(k_raw, k_lim, k_hst, 3, 1);
        condition_empty(k_raw, k_hist, k_ema, k_shift, k_meas, 3, (int)(i % 5));
        control_empty(k_meas, k_par, k_cst, k_out, 3);
        acc += k_out[0];
    }
    sink = acc;
}
static void tick_setup(void)
{
    bme_setup();
    kernels_setup();
}

#define KERNEL_BENCHES \
    {"health", kernels_setup, health_loop, health_loop_empty}, \
    {"condition", kernels_setup, condition_loop, condition_loop_empty}, \
    {"control", kernels_setup, control_loop, control_loop_empty}, \
    {"pipeline", tick_setup, tick_loop, tick_loop_empty},

static void print_ints(const int32_t *v, int n, int last)
{
    for (int i = 0; i < n; i++)
        printf("%d%s", v[i], (i == n - 1 && last) ? "" : " ");
}

/* eval lines (all ints):
 *   condition n pos raw[n] hist[5n] ema[n] shift[n]  -> out[n] hist[5n] ema[n]
 *   control   n meas[3] par[11n] st[2n]              -> out[n] st[2n]
 *   health    n present raw[n] lim[2n+2] st[n+4]     -> faults st[n+4]
 */
static int kernels_eval(const char *name, const long *v, int nv)
{
    int32_t buf[512];
    if (nv < 1 || v[0] < 1 || v[0] > 16)
        return 0;
    int n = (int)v[0];
    for (int i = 0; i < nv && i < 512; i++)
        buf[i] = (int32_t)v[i];
    if (strcmp(name, "condition") == 0 && nv == 2 + 8 * n) {
        int32_t *raw = buf + 2, *hist = raw + n, *ema = hist + 5 * n, *shift = ema + n;
        int32_t out[16];
        condition_ref(raw, hist, ema, shift, out, n, (int)v[1]);
        print_ints(out, n, 0); print_ints(hist, 5 * n, 0); print_ints(ema, n, 1);
    } else if (strcmp(name, "control") == 0 && nv == 4 + 13 * n) {
        int32_t *meas = buf + 1, *par = meas + 3, *st = par + 11 * n;
        int32_t out[16];
        control_ref(meas, par, st, out, n);
        print_ints(out, n, 0); print_ints(st, 2 * n, 1);
    } else if (strcmp(name, "health") == 0 && nv == 2 + n + 2 * n + 2 + n + 4) {
        int32_t *raw = buf + 2, *lim = raw + n, *st = lim + 2 * n + 2;
        int32_t f = health_ref(raw, lim, st, n, (int)v[1]);
        printf("%d ", f); print_ints(st, n + 4, 1);
    } else {
        return 0;
    }
    printf("\n");
    return 1;
}
