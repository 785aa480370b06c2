/* BME280 compensation, written from the Bosch BME280 datasheet (BST-BME280-DS002,
 * section 4.2.3 "Compensation formulas" and 8.2 "32-bit integer" pressure variant).
 * Units match the firmware contract: T in 0.01 degC, P in Pa, H in 1/1024 %RH.
 *
 * This is the C -O2 reference for the benchmark and the smoke test: it must do the same
 * work per call as the viper kernel (unpack the 8-byte data burst 0xF7..0xFE, compensate
 * T, P and H), so the timing ratio compares like with like.
 *
 * One deviation from the datasheet text: where Bosch left-shifts a value that can be
 * negative (`(var1 * P5) << 1`, `P4 << 16`, `H4 << 20`), this file multiplies by the
 * power of two instead. The result is the same two's-complement value, but a left shift of
 * a negative int is undefined in C, and the smoke test runs this file under UBSan.
 */
#include <stdint.h>

typedef struct {
    uint16_t T1; int16_t T2, T3;
    uint16_t P1; int16_t P2, P3, P4, P5, P6, P7, P8, P9;
    uint8_t H1; int16_t H2; uint8_t H3; int16_t H4, H5; int8_t H6;
} bme280_calib;

/* cal_a: 26 bytes read from 0x88..0xA1; cal_b: 7 bytes from 0xE1..0xE7. */
static void bme280_parse_calib(const uint8_t *a, const uint8_t *b, bme280_calib *c)
{
#define U16(p) ((uint16_t)((p)[0] | ((p)[1] << 8)))
    c->T1 = U16(a + 0);
    c->T2 = (int16_t)U16(a + 2);
    c->T3 = (int16_t)U16(a + 4);
    c->P1 = U16(a + 6);
    c->P2 = (int16_t)U16(a + 8);
    c->P3 = (int16_t)U16(a + 10);
    c->P4 = (int16_t)U16(a + 12);
    c->P5 = (int16_t)U16(a + 14);
    c->P6 = (int16_t)U16(a + 16);
    c->P7 = (int16_t)U16(a + 18);
    c->P8 = (int16_t)U16(a + 20);
    c->P9 = (int16_t)U16(a + 22);
    c->H1 = a[25];
    c->H2 = (int16_t)U16(b + 0);
    c->H3 = b[2];
    /* H4 and H5 are 12-bit signed values sharing the nibbles of 0xE5. */
    c->H4 = (int16_t)(((int8_t)b[3]) * 16 | (b[4] & 0x0F));
    c->H5 = (int16_t)(((int8_t)b[5]) * 16 | (b[4] >> 4));
    c->H6 = (int8_t)b[6];
#undef U16
}

/* Returns t_fine; writes T, P, H into out[0..2] from the raw data burst d[0..7]. */
static int32_t bme280_compensate(const uint8_t *d, const bme280_calib *c, int32_t *out)
{
    int32_t adc_P = (int32_t)(((uint32_t)d[0] << 12) | ((uint32_t)d[1] << 4) | (d[2] >> 4));
    int32_t adc_T = (int32_t)(((uint32_t)d[3] << 12) | ((uint32_t)d[4] << 4) | (d[5] >> 4));
    int32_t adc_H = (int32_t)(((uint32_t)d[6] << 8) | d[7]);
    int32_t var1, var2, t_fine, v;
    uint32_t p;

    var1 = ((((adc_T >> 3) - ((int32_t)c->T1 << 1))) * ((int32_t)c->T2)) >> 11;
    var2 = (((((adc_T >> 4) - ((int32_t)c->T1)) * ((adc_T >> 4) - ((int32_t)c->T1))) >> 12)
            * ((int32_t)c->T3)) >> 14;
    t_fine = var1 + var2;
    out[0] = (t_fine * 5 + 128) >> 8;

    var1 = (t_fine >> 1) - (int32_t)64000;
    var2 = (((var1 >> 2) * (var1 >> 2)) >> 11) * ((int32_t)c->P6);
    var2 = var2 + ((var1 * ((int32_t)c->P5)) * 2);
    var2 = (var2 >> 2) + (((int32_t)c->P4) * 65536);
    var1 = (((c->P3 * (((var1 >> 2) * (var1 >> 2)) >> 13)) >> 3)
            + ((((int32_t)c->P2) * var1) >> 1)) >> 18;
    var1 = ((((32768 + var1)) * ((int32_t)c->P1)) >> 15);
    if (var1 == 0) {
        p = 0; /* datasheet: avoid division by zero */
    } else {
        p = (((uint32_t)(((int32_t)1048576) - adc_P) - (uint32_t)(var2 >> 12))) * 3125;
        if (p < 0x80000000u)
            p = (p << 1) / ((uint32_t)var1);
        else
            p = (p / (uint32_t)var1) * 2;
        var1 = (((int32_t)c->P9) * ((int32_t)(((p >> 3) * (p >> 3)) >> 13))) >> 12;
        var2 = (((int32_t)(p >> 2)) * ((int32_t)c->P8)) >> 13;
        p = (uint32_t)((int32_t)p + ((var1 + var2 + c->P7) >> 4));
    }
    out[1] = (int32_t)p;

    v = t_fine - ((int32_t)76800);
    v = (((((adc_H * 16384) - (((int32_t)c->H4) * 1048576) - (((int32_t)c->H5) * v))
           + ((int32_t)16384)) >> 15)
         * (((((((v * ((int32_t)c->H6)) >> 10)
                * (((v * ((int32_t)c->H3)) >> 11) + ((int32_t)32768))) >> 10)
              + ((int32_t)2097152)) * ((int32_t)c->H2) + 8192) >> 14));
    v = (v - (((((v >> 15) * (v >> 15)) >> 7) * ((int32_t)c->H1)) >> 4));
    v = (v < 0 ? 0 : v);
    v = (v > 419430400 ? 419430400 : v);
    out[2] = v >> 12;
    return t_fine;
}
