/* canopy_host._fastscan: the monitor's hot loop in C (docs/performance.md, Ingest).
 *
 * scan_readings(buf, pos, node, boot, seq, head) -> (rows, end)
 * scan_readings(buf, pos, node, boot, seq, head, True) -> (rows, ends, bodies, tags)
 *
 * From buf[pos:], consume consecutive complete frame lines that are well-formed v1
 * readings with exactly the 15 v1 values, of node `node` (str), boot `boot`, with seq
 * numbers seq, seq+1, ...; stop at the first line that is anything else (or is
 * incomplete) and leave it to the Python parser. Each consumed line becomes the tuple
 * head + (node, boot, seq, v0, ..., v14) with int values. `end` is the offset just
 * past the last consumed line (== pos when nothing was consumed).
 *
 * Untagged, a line must have no tag; tagged (the 7th argument true), it must carry one
 * (' !' + 32 hex digits, docs/security.md) and the caller verifies it: `bodies[i]` is
 * the signed part of line i (up to the ' !'), `tags[i]` its 16 tag bytes, `ends[i]`
 * the offset past line i, so the caller can stop at the first frame that fails.
 *
 * "Well-formed" is exactly what canopy_host.protocol's fast path accepts
 * (_FAST_READING_RE, the 250-byte limit, the CRC32 of the body);
 * canopy_host.protocol.scan_readings_py is the same function in Python, and
 * tests/test_fastscan.py compares the two on random and mutated streams.
 * Python's own zlib module links the same crc32().
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <string.h>
#include <zlib.h>

#define MAX_FRAME 250 /* bytes per frame line including the LF */
#define N_VALUES 15
#define MAX_ID_DIGITS 10
#define MAX_VALUE_DIGITS 11

static int
hex_digit(unsigned char c)
{
    if (c >= '0' && c <= '9') return c - '0';
    if (c >= 'a' && c <= 'f') return c - 'a' + 10;
    if (c >= 'A' && c <= 'F') return c - 'A' + 10;
    return -1;
}

/* Unsigned decimal of 1..max_digits digits at b[*q], followed by `stop`. */
static int
read_decimal(const unsigned char *b, Py_ssize_t n, Py_ssize_t *q, int max_digits,
             unsigned char stop, long long *out)
{
    Py_ssize_t i = *q;
    long long v = 0;
    int digits = 0;
    while (i < n && b[i] >= '0' && b[i] <= '9') {
        if (++digits > max_digits) return 0;
        v = v * 10 + (b[i] - '0');
        i++;
    }
    if (digits == 0 || i >= n || b[i] != stop) return 0;
    *q = i + 1;
    *out = v;
    return 1;
}

#define TAG_BYTES 16

/* One line at b[p]; on success fills vals (and, tagged, *mac_end and tag) and returns
 * the offset past its '\n'. */
static Py_ssize_t
match_reading(const unsigned char *b, Py_ssize_t n, Py_ssize_t p, const char *node,
              Py_ssize_t node_len, long long boot, long long seq, long long *vals,
              int tagged, Py_ssize_t *mac_end, unsigned char *tag)
{
    Py_ssize_t q = p;
    long long v;
    if (n - q < 6 || memcmp(b + q, "@CNP1 ", 6) != 0) return -1;
    q += 6;
    if (n - q < node_len + 1 || memcmp(b + q, node, node_len) != 0 || b[q + node_len] != ' ') return -1;
    q += node_len + 1;
    if (!read_decimal(b, n, &q, MAX_ID_DIGITS, ' ', &v) || v != boot) return -1;
    if (!read_decimal(b, n, &q, MAX_ID_DIGITS, ' ', &v) || v != seq) return -1;
    if (n - q < 2 || b[q] != 'R' || b[q + 1] != ' ') return -1;
    q += 2;
    for (int k = 0; k < N_VALUES; k++) {
        int neg = 0;
        if (q < n && b[q] == '-') {
            neg = 1;
            q++;
        }
        /* exactly 15 values: ',' between them, ' ' (then '*') after the last; a 16th
         * value or a ' !tag' is not ours */
        if (!read_decimal(b, n, &q, MAX_VALUE_DIGITS, k < N_VALUES - 1 ? ',' : ' ', &v)) return -1;
        vals[k] = neg ? -v : v;
    }
    if (tagged) {
        if (n - q < 2 * TAG_BYTES + 2 || b[q] != '!') return -1;
        *mac_end = q - 1; /* the ' ' before '!' */
        for (int k = 0; k < TAG_BYTES; k++) {
            int hi = hex_digit(b[q + 1 + 2 * k]), lo = hex_digit(b[q + 2 + 2 * k]);
            if (hi < 0 || lo < 0) return -1;
            tag[k] = (unsigned char)(hi << 4 | lo);
        }
        q += 1 + 2 * TAG_BYTES;
        if (b[q] != ' ') return -1;
        q++;
    }
    Py_ssize_t body_end = q - 1; /* the ' ' before '*' */
    if (n - q < 9 || b[q] != '*') return -1;
    unsigned long crc = 0;
    for (int k = 1; k <= 8; k++) {
        int h = hex_digit(b[q + k]);
        if (h < 0) return -1;
        crc = (crc << 4) | (unsigned long)h;
    }
    q += 9;
    if (q - p >= MAX_FRAME) return -1; /* the line without its line ending */
    if (q < n && b[q] == '\r') q++;
    if (q >= n || b[q] != '\n') return -1;
    if (crc32(0L, b + p, (uInt)(body_end - p)) != crc) return -1;
    return q + 1;
}

static int
append_new(PyObject *list, PyObject *item)
{
    if (item == NULL) return -1;
    int err = PyList_Append(list, item);
    Py_DECREF(item);
    return err;
}

/* What a scan returns: the rows, and for tagged scans each line's end, signed part and tag. */
typedef struct {
    PyObject *head; /* borrowed: the tuple every row starts with */
    int tagged;
    PyObject *rows, *ends, *bodies, *tags;
} Out;

static int
out_init(Out *o, PyObject *head, int tagged)
{
    o->head = head;
    o->tagged = tagged;
    o->rows = PyList_New(0);
    o->ends = tagged ? PyList_New(0) : NULL;
    o->bodies = tagged ? PyList_New(0) : NULL;
    o->tags = tagged ? PyList_New(0) : NULL;
    return (o->rows == NULL || (tagged && (o->ends == NULL || o->bodies == NULL || o->tags == NULL))) ? -1 : 0;
}

static void
out_clear(Out *o)
{
    Py_CLEAR(o->rows);
    Py_CLEAR(o->ends);
    Py_CLEAR(o->bodies);
    Py_CLEAR(o->tags);
}

/* (rows, end) or (rows, ends, bodies, tags); the lists move into the result. */
static PyObject *
out_result(Out *o, Py_ssize_t pos)
{
    PyObject *r = o->tagged ? Py_BuildValue("(NNNN)", o->rows, o->ends, o->bodies, o->tags)
                            : Py_BuildValue("(Nn)", o->rows, pos);
    o->rows = o->ends = o->bodies = o->tags = NULL;
    return r;
}

/* One taken line: head + (node, boot, seq, *vals), plus its end, signed part and tag.
 * Steals `node`; borrows `boot_obj`. */
static int
out_add(Out *o, PyObject *node, PyObject *boot_obj, long long seq, const long long *vals,
        const unsigned char *line, Py_ssize_t mac_len, Py_ssize_t next, const unsigned char *tag)
{
    Py_ssize_t nhead = PyTuple_GET_SIZE(o->head);
    PyObject *row = PyTuple_New(nhead + 3 + N_VALUES);
    if (row == NULL) {
        Py_DECREF(node);
        return -1;
    }
    for (Py_ssize_t k = 0; k < nhead; k++) {
        PyObject *h = PyTuple_GET_ITEM(o->head, k);
        Py_INCREF(h);
        PyTuple_SET_ITEM(row, k, h);
    }
    PyTuple_SET_ITEM(row, nhead, node);
    Py_INCREF(boot_obj);
    PyTuple_SET_ITEM(row, nhead + 1, boot_obj);
    for (int k = -1; k < N_VALUES; k++) {
        PyObject *x = PyLong_FromLongLong(k < 0 ? seq : vals[k]);
        if (x == NULL) {
            Py_DECREF(row);
            return -1;
        }
        PyTuple_SET_ITEM(row, nhead + 3 + k, x);
    }
    if (append_new(o->rows, row) < 0) return -1;
    if (o->tagged
        && (append_new(o->ends, PyLong_FromSsize_t(next)) < 0
            || append_new(o->bodies, PyBytes_FromStringAndSize((const char *)line, mac_len)) < 0
            || append_new(o->tags, PyBytes_FromStringAndSize((const char *)tag, TAG_BYTES)) < 0))
        return -1;
    return 0;
}

/* The arguments both scanners share: the buffer, the start offset and, optionally, tagged. */
static int
scan_args(PyObject *const *args, Py_ssize_t nargs, Py_ssize_t fixed, const char *usage, Py_buffer *view,
          Py_ssize_t *pos, int *tagged)
{
    if (nargs != fixed && nargs != fixed + 1) {
        PyErr_SetString(PyExc_TypeError, usage);
        return -1;
    }
    if (!PyTuple_Check(args[fixed - 1])) {
        PyErr_Format(PyExc_TypeError, "%s: head must be a tuple", usage);
        return -1;
    }
    *tagged = nargs > fixed ? PyObject_IsTrue(args[fixed]) : 0;
    if (*tagged < 0) return -1;
    *pos = PyLong_AsSsize_t(args[1]);
    if (PyErr_Occurred()) return -1;
    if (PyObject_GetBuffer(args[0], view, PyBUF_SIMPLE) < 0) return -1;
    if (*pos < 0 || *pos > view->len) {
        PyBuffer_Release(view);
        PyErr_Format(PyExc_ValueError, "%s: pos out of range", usage);
        return -1;
    }
    return 0;
}

static PyObject *
scan_readings(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    static const char usage[] = "scan_readings(buf, pos, node, boot, seq, head[, tagged])";
    if (nargs >= 3 && !PyUnicode_Check(args[2])) {
        PyErr_SetString(PyExc_TypeError, "scan_readings: node must be str");
        return NULL;
    }
    Py_buffer view;
    Py_ssize_t pos;
    int tagged;
    if (nargs < 6 || nargs > 7) {
        PyErr_SetString(PyExc_TypeError, usage);
        return NULL;
    }
    long long boot = PyLong_AsLongLong(args[3]);
    long long seq = PyLong_AsLongLong(args[4]);
    if (PyErr_Occurred()) return NULL;
    PyObject *node = args[2];
    Py_ssize_t node_len;
    const char *node_s = PyUnicode_AsUTF8AndSize(node, &node_len);
    if (node_s == NULL || scan_args(args, nargs, 6, usage, &view, &pos, &tagged) < 0) return NULL;
    Out out = {NULL, 0, NULL, NULL, NULL, NULL};
    PyObject *boot_obj = PyLong_FromLongLong(boot);
    if (boot_obj == NULL || out_init(&out, args[5], tagged) < 0) goto fail;
    const unsigned char *b = (const unsigned char *)view.buf;
    long long vals[N_VALUES];
    unsigned char tag[TAG_BYTES];
    Py_ssize_t mac_end = 0, next;
    while ((next = match_reading(b, view.len, pos, node_s, node_len, boot, seq, vals, tagged, &mac_end, tag)) >= 0) {
        Py_INCREF(node);
        if (out_add(&out, node, boot_obj, seq, vals, b + pos, mac_end - pos, next, tag) < 0) goto fail;
        pos = next;
        seq++;
    }
    PyBuffer_Release(&view);
    Py_DECREF(boot_obj);
    return out_result(&out, pos);
fail:
    PyBuffer_Release(&view);
    Py_XDECREF(boot_obj);
    out_clear(&out);
    return NULL;
}

/* scan_gateway(buf, pos, expect, head[, tagged]): scan_readings for a port that carries
 * several nodes (a mesh gateway): `expect` maps node id -> [boot, next seq]; a line
 * belongs to the run if its node is a key there and it continues that node. The
 * lists' next seq is advanced in place. Same results as (rows, end) or
 * (rows, ends, bodies, tags). */
static PyObject *
scan_gateway(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    static const char usage[] = "scan_gateway(buf, pos, expect, head[, tagged])";
    if (nargs >= 3 && !PyDict_Check(args[2])) {
        PyErr_SetString(PyExc_TypeError, "scan_gateway: expect must be a dict");
        return NULL;
    }
    Py_buffer view;
    Py_ssize_t pos;
    int tagged;
    if (scan_args(args, nargs, 4, usage, &view, &pos, &tagged) < 0) return NULL;
    PyObject *expect = args[2];
    Out out = {NULL, 0, NULL, NULL, NULL, NULL};
    if (out_init(&out, args[3], tagged) < 0) goto fail;
    const unsigned char *b = (const unsigned char *)view.buf;
    Py_ssize_t n = view.len;
    long long vals[N_VALUES];
    unsigned char tag[TAG_BYTES];
    Py_ssize_t mac_end = 0;
    for (;;) {
        /* the node id token after "@CNP1 ", then what is expected of that node */
        if (n - pos < 6 || memcmp(b + pos, "@CNP1 ", 6) != 0) break;
        Py_ssize_t q = pos + 6, len = 0;
        while (len <= 16 && q + len < n && b[q + len] != ' ') len++;
        if (len == 0 || len > 16 || q + len >= n) break;
        PyObject *node = PyUnicode_DecodeLatin1((const char *)b + q, len, NULL);
        if (node == NULL) goto fail;
        PyObject *want = PyDict_GetItemWithError(expect, node); /* borrowed */
        if (want == NULL || !PyList_Check(want) || PyList_GET_SIZE(want) != 2) {
            Py_DECREF(node);
            if (PyErr_Occurred()) goto fail;
            if (want == NULL) break;
            PyErr_SetString(PyExc_TypeError, "scan_gateway: expect values must be [boot, next_seq] lists");
            goto fail;
        }
        PyObject *boot_obj = PyList_GET_ITEM(want, 0);
        long long boot = PyLong_AsLongLong(boot_obj);
        long long seq = PyLong_AsLongLong(PyList_GET_ITEM(want, 1));
        Py_ssize_t next = -1;
        if (!PyErr_Occurred())
            next = match_reading(b, n, pos, (const char *)b + q, len, boot, seq, vals, tagged, &mac_end, tag);
        if (next < 0) {
            Py_DECREF(node);
            if (PyErr_Occurred()) goto fail;
            break;
        }
        Py_INCREF(boot_obj); /* the list's item may be replaced below */
        int err = out_add(&out, node, boot_obj, seq, vals, b + pos, mac_end - pos, next, tag);
        Py_DECREF(boot_obj);
        PyObject *next_seq = err < 0 ? NULL : PyLong_FromLongLong(seq + 1);
        if (next_seq == NULL || PyList_SetItem(want, 1, next_seq) < 0) goto fail;
        pos = next;
    }
    PyBuffer_Release(&view);
    return out_result(&out, pos);
fail:
    PyBuffer_Release(&view);
    out_clear(&out);
    return NULL;
}

static PyMethodDef methods[] = {
    {"scan_readings", (PyCFunction)(void (*)(void))scan_readings, METH_FASTCALL,
     "scan_readings(buf, pos, node, boot, seq, head[, tagged]) -> (rows, end) | (rows, ends, bodies, tags)\n\n"
     "Consume the run of in-sequence v1 readings of one node at buf[pos:] "
     "(see canopy_host.protocol.scan_readings_py, its Python twin)."},
    {"scan_gateway", (PyCFunction)(void (*)(void))scan_gateway, METH_FASTCALL,
     "scan_gateway(buf, pos, expect, head[, tagged]) -> (rows, end) | (rows, ends, bodies, tags)\n\n"
     "scan_readings for a port that carries several nodes: expect maps node -> [boot, next_seq] "
     "(advanced in place); see canopy_host.protocol.scan_gateway_py."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module_def = {
    PyModuleDef_HEAD_INIT, "_fastscan",
    "Compiled fast path of the canopy monitor's frame parser (optional; "
    "canopy_host.protocol falls back to Python without it).",
    -1, methods,
};

PyMODINIT_FUNC
PyInit__fastscan(void)
{
    return PyModule_Create(&module_def);
}
