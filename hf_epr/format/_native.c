/* Compiled decoding loops of the coded format (optional: hf_epr falls back to constriction and NumPy without it).

   ans_decode: the rANS stream of constriction's AnsCoder (32-bit words, 64-bit state, 24-bit probabilities)
   under the integer tables of a file, read exactly as constriction's Categorical(perfect=False) reads them:
   the left cumulative of symbol i of a table of n counts summing to 2**t is floor(C_i * (2**24 - n) / 2**t) + i,
   with C_i the sum of the counts before i (integer arithmetic only: the same on every machine). Symbols are
   found through a table of the 10 (at most) leading quantile bits (8 KB: the tables of the four streams a
   thread decodes together stay in L1), then a short forward scan.

   unpack_bits: fixed-width little-endian bit-packed integers.

   affine_in_place: the affine decoder's int32 -> float32 q * step + shift, in one pass.

   populate: fault in the pages of a part of a fresh buffer, so that threads share out that work too.

   crc32_combine: the CRC-32 of two byte strings one after the other from theirs (parts checksummed in parallel).

   All release the GIL, so threads decode streams in parallel. */

#define PY_SSIZE_T_CLEAN
#include <Python.h>

#pragma STDC FP_CONTRACT OFF /* no fused multiply-add: the same rounding as torch's float32 decoders */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#if defined(__linux__)
#include <sys/mman.h>
#include <unistd.h>
#endif
#ifndef MADV_POPULATE_WRITE
#define MADV_POPULATE_WRITE 23 /* Linux 5.14; older kernels answer EINVAL and the pages are touched instead */
#endif

#define PRECISION 24
#define LUT_BITS 10
#ifndef WAYS
#define WAYS 4 /* streams decoded together by one thread */
#endif
#if defined(__GNUC__)
#define ALWAYS_INLINE inline __attribute__((always_inline))
#else
#define ALWAYS_INLINE inline
#endif
#define GROUP_FIELDS 7 /* counts offset, n_symbols, count, out offset, lo, first and end escape (-1: none) */

typedef struct { /* what all streams of one call share */
    const int64_t *counts;
    Py_ssize_t n_counts;
    const int32_t *escapes;
    Py_ssize_t n_escapes;
    int32_t *out;
    Py_ssize_t n_out;
} Shared;

typedef struct { /* one stream, decoded group by group */
    const uint32_t *words;
    Py_ssize_t pos;
    uint64_t state;
    const int64_t *groups;
    Py_ssize_t n_groups, next_group;
    int64_t remaining, lo, escape, escape_end, e; /* of the current group */
    uint32_t escape_symbol;
    int lut_shift;
    int32_t *out;
    uint32_t *left;
    uint64_t *lut;
} Cursor;

static const uint32_t no_words[1] = {0};

static const char *cursor_open(Cursor *c, const uint32_t *words, Py_ssize_t n_words, const int64_t *groups,
                               Py_ssize_t n_groups) {
    c->words = n_words ? words : no_words;
    c->pos = n_words;
    c->state = 0;
    c->groups = groups;
    c->n_groups = n_groups;
    c->next_group = 0;
    c->remaining = 0;
    c->escape = -1;
    c->left = malloc(sizeof(uint32_t) * ((1 << 16) + 2));
    c->lut = malloc(sizeof(uint64_t) << LUT_BITS);
    if (!c->left || !c->lut) return "out of memory";
    if (c->pos > 0) { /* the initial state: the last word (never zero), then more words until it is full */
        c->state = c->words[--c->pos];
        if (c->state == 0) return "the stream ends in a zero word";
        while (c->pos > 0 && c->state < ((uint64_t)1 << 32)) c->state = (c->state << 32) | c->words[--c->pos];
    }
    return NULL;
}

static void cursor_close(Cursor *c) {
    free(c->left);
    free(c->lut);
    c->left = NULL;
    c->lut = NULL;
}

/* Finish the current group and set up the next one with symbols; *done when none is left. */
static const char *cursor_next(Cursor *c, const Shared *s, int *done) {
    if (c->escape >= 0 && c->e != c->escape_end) return "a coded group holds a different number of escapes than the file";
    c->escape = -1;
    while (c->next_group < c->n_groups) {
        const int64_t *f = c->groups + GROUP_FIELDS * c->next_group++;
        int64_t offset = f[0], n = f[1], count = f[2], start = f[3];
        if (n < 2 || n > (1 << 16) || offset < 0 || offset + n > s->n_counts || count < 0 || start < 0 ||
            start + count > s->n_out || (f[5] >= 0 && (f[6] < f[5] || f[6] > s->n_escapes)))
            return "a group does not fit the tables or the output";
        c->lo = f[4];
        c->escape = f[5];
        c->escape_end = f[6];
        c->e = f[5];
        if (count == 0) continue;
        uint64_t total = 0;
        for (int64_t i = 0; i < n; i++) total += (uint64_t)s->counts[offset + i];
        int bits = 0;
        while (((uint64_t)1 << bits) < total) bits++;
        if (total == 0 || ((uint64_t)1 << bits) != total || bits > 16) return "a table does not sum to a power of two up to 2**16";
        uint64_t cumulative = 0, free_weight = ((uint64_t)1 << PRECISION) - (uint64_t)n;
        for (int64_t i = 0; i < n; i++) {
            c->left[i] = (uint32_t)(((cumulative * free_weight) >> bits) + (uint64_t)i);
            cumulative += (uint64_t)s->counts[offset + i];
        }
        c->left[n] = (uint32_t)1 << PRECISION;
        int lut_bits = bits < LUT_BITS ? bits : LUT_BITS;
        c->lut_shift = PRECISION - lut_bits;
        uint32_t symbol = 0; /* entry: the symbol at the slot's first quantile, its left cumulative, probability */
        for (uint32_t j = 0; j < ((uint32_t)1 << lut_bits); j++) {
            while (c->left[symbol + 1] <= (j << c->lut_shift)) symbol++;
            c->lut[j] = (uint64_t)c->left[symbol] | (uint64_t)(c->left[symbol + 1] - c->left[symbol]) << 24 |
                        (uint64_t)symbol << 48;
        }
        c->escape_symbol = (uint32_t)(n - 1);
        c->out = s->out + start;
        c->remaining = count;
        return NULL;
    }
    if (c->escape >= 0 && c->e != c->escape_end) return "a coded group holds a different number of escapes than the file";
    *done = 1;
    if (c->pos != 0 || c->state != 0) return "the stream does not end where its symbols end";
    return NULL;
}

/* The state a symbol changes, held in locals while a run of symbols is decoded (the compiler keeps them in
   registers: they cannot alias the output or another stream's cursor). */
typedef struct {
    uint64_t state;
    Py_ssize_t pos;
    int32_t *out;
    int64_t e;
    /* read only */
    const uint64_t *lut;
    const uint32_t *left, *words;
    int lut_shift, escaped;
    uint32_t escape_symbol;
    uint32_t lo;
    int64_t escape_end;
} Lane;

static inline void lane_load(Lane *l, const Cursor *c) {
    l->state = c->state;
    l->pos = c->pos;
    l->out = c->out;
    l->e = c->e;
    l->lut = c->lut;
    l->left = c->left;
    l->words = c->words;
    l->lut_shift = c->lut_shift;
    l->escaped = c->escape >= 0;
    l->escape_symbol = c->escape_symbol;
    l->lo = (uint32_t)c->lo; /* the sum wraps as the int64 one cast to int32 did */
    l->escape_end = c->escape_end;
}

static inline void lane_store(const Lane *l, Cursor *c, int64_t decoded) {
    c->state = l->state;
    c->pos = l->pos;
    c->out = l->out;
    c->e = l->e;
    c->remaining -= decoded;
}

/* Decode one symbol of the cursor's current group into its place; 0, or 1 for an escape the file does not hold. */
static inline int lane_step(Lane *l, const int32_t *escapes) {
    uint64_t state = l->state;
    uint32_t quantile = (uint32_t)(state & (((uint64_t)1 << PRECISION) - 1));
    uint64_t entry = l->lut[quantile >> l->lut_shift];
    uint32_t sym = (uint32_t)(entry >> 48), low = (uint32_t)entry & 0xFFFFFF;
    uint32_t probability = (uint32_t)(entry >> 24) & 0xFFFFFF;
    if (quantile - low >= probability) { /* the slot holds a symbol boundary past its start: scan */
        while (l->left[sym + 1] <= quantile) sym++;
        low = l->left[sym];
        probability = l->left[sym + 1] - low;
    }
    state = (state >> PRECISION) * (uint64_t)probability + (quantile - low);
    /* refill without a branch (taken about once per 32 bits of information: unpredictable) */
    uint64_t refill = (state < ((uint64_t)1 << 32)) & (l->pos > 0);
    uint64_t word = l->words[l->pos > 0 ? l->pos - 1 : 0];
    l->state = refill ? (state << 32) | word : state;
    l->pos -= (Py_ssize_t)refill;
    int32_t value;
    if (!l->escaped) {
        value = (int32_t)sym;
    } else if (sym != l->escape_symbol) {
        value = (int32_t)(sym + l->lo);
    } else {
        if (l->e >= l->escape_end) return 1;
        value = escapes[l->e++];
    }
    *l->out++ = value;
    return 0;
}

/* k symbols from each of the first M cursors (M a constant where inlined, so the lanes become registers). */
static ALWAYS_INLINE int decode_run(Cursor **c, const int M, int64_t k, const int32_t *escapes) {
    Lane lanes[WAYS];
    for (int j = 0; j < M; j++) lane_load(&lanes[j], c[j]);
    int bad = 0;
    int64_t i = 0;
    for (; i < k && !bad; i++)
        for (int j = 0; j < M; j++) bad |= lane_step(&lanes[j], escapes);
    for (int j = 0; j < M; j++) lane_store(&lanes[j], c[j], i);
    return bad;
}

static const char *too_many_escapes = "a coded group holds more escapes than the file";

/* Decode up to WAYS streams together (independent dependency chains keep the core busy): each round decodes, from
   every stream still going, as many symbols as the shortest current group has left. */
static const char *decode_together(Cursor **c, int m, const Shared *s) {
    const char *error = NULL;
    for (int j = 0; j < m && !error; j++) {
        int done = 0;
        error = cursor_next(c[j], s, &done);
        if (done) c[j--] = c[--m];
    }
    while (!error && m > 0) {
        int64_t k = c[0]->remaining;
        for (int j = 1; j < m; j++) k = c[j]->remaining < k ? c[j]->remaining : k;
        int bad;
        switch (m) {
        case 1: bad = decode_run(c, 1, k, s->escapes); break;
        case 2: bad = decode_run(c, 2, k, s->escapes); break;
        case 3: bad = decode_run(c, 3, k, s->escapes); break;
        default: bad = m == WAYS ? decode_run(c, WAYS, k, s->escapes) : decode_run(c, m, k, s->escapes);
        }
        if (bad) return too_many_escapes;
        for (int j = 0; j < m && !error; j++) {
            if (c[j]->remaining) continue;
            int done = 0;
            error = cursor_next(c[j], s, &done);
            if (done) c[j--] = c[--m];
        }
    }
    return error;
}

static int get_buffer(PyObject *obj, Py_buffer *view, Py_ssize_t itemsize, int writable, const char *name) {
    if (PyObject_GetBuffer(obj, view, PyBUF_C_CONTIGUOUS | (writable ? PyBUF_WRITABLE : 0)) < 0) return -1;
    if (view->itemsize != itemsize) {
        PyErr_Format(PyExc_ValueError, "%s must hold %zd-byte items", name, itemsize);
        PyBuffer_Release(view);
        return -1;
    }
    return 0;
}

static PyObject *ans_decode(PyObject *self, PyObject *args) {
    PyObject *streams, *objs[3];
    if (!PyArg_ParseTuple(args, "O!OOO", &PyList_Type, &streams, &objs[0], &objs[1], &objs[2])) return NULL;
    static const char *names[3] = {"counts", "escapes", "out"};
    static const Py_ssize_t sizes[3] = {8, 4, 4};
    Py_ssize_t n = PyList_GET_SIZE(streams), got = 0, n_views = 3 + 2 * n;
    Py_buffer *views = PyMem_Calloc(n_views, sizeof(Py_buffer));
    Cursor *cursors = PyMem_Calloc(n ? n : 1, sizeof(Cursor));
    const char *error = NULL;
    if (!views || !cursors) {
        PyMem_Free(views);
        PyMem_Free(cursors);
        return PyErr_NoMemory();
    }
    for (; got < 3; got++)
        if (get_buffer(objs[got], &views[got], sizes[got], got == 2, names[got]) < 0) goto release;
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *item = PyList_GET_ITEM(streams, i);
        if (!PyTuple_Check(item) || PyTuple_GET_SIZE(item) != 2) {
            PyErr_SetString(PyExc_TypeError, "streams must be (words, groups) tuples");
            goto release;
        }
        if (get_buffer(PyTuple_GET_ITEM(item, 0), &views[got], 4, 0, "words") < 0) goto release;
        got++;
        if (get_buffer(PyTuple_GET_ITEM(item, 1), &views[got], 8, 0, "groups") < 0) goto release;
        got++;
        if (views[got - 1].len % (GROUP_FIELDS * 8)) {
            PyErr_SetString(PyExc_ValueError, "groups must have 7 fields per group");
            goto release;
        }
    }
    Shared s = {views[0].buf, views[0].len / 8, views[1].buf, views[1].len / 4, views[2].buf, views[2].len / 4};
    Py_BEGIN_ALLOW_THREADS for (Py_ssize_t i = 0; i < n && !error; i++) {
        Py_buffer *w = &views[3 + 2 * i], *g = &views[4 + 2 * i];
        error = cursor_open(&cursors[i], w->buf, w->len / 4, g->buf, g->len / (GROUP_FIELDS * 8));
    }
    for (Py_ssize_t i = 0; i < n && !error; i += WAYS) {
        Cursor *group[WAYS];
        int m = 0;
        for (; m < WAYS && i + m < n; m++) group[m] = &cursors[i + m];
        error = decode_together(group, m, &s);
    }
    for (Py_ssize_t i = 0; i < n; i++) cursor_close(&cursors[i]);
    Py_END_ALLOW_THREADS
    if (error) PyErr_SetString(PyExc_ValueError, error);
release:
    for (Py_ssize_t i = 0; i < got; i++) PyBuffer_Release(&views[i]);
    PyMem_Free(views);
    PyMem_Free(cursors);
    if (PyErr_Occurred()) return NULL;
    Py_RETURN_NONE;
}

static PyObject *unpack_bits(PyObject *self, PyObject *args) {
    PyObject *data_obj, *out_obj;
    long long bit_offset, lo;
    int width;
    if (!PyArg_ParseTuple(args, "OLiLO", &data_obj, &bit_offset, &width, &lo, &out_obj)) return NULL;
    Py_buffer data, out;
    if (get_buffer(data_obj, &data, 1, 0, "data") < 0) return NULL;
    if (get_buffer(out_obj, &out, 4, 1, "out") < 0) {
        PyBuffer_Release(&data);
        return NULL;
    }
    Py_ssize_t count = out.len / 4;
    const char *error = NULL;
    if (width < 1 || width > 32 || bit_offset < 0) {
        error = "width must be in [1, 32] and the offset non-negative";
    } else if (count > 0 && ((bit_offset + (long long)(count - 1) * width) >> 3) + 8 > data.len) {
        error = "a packed group runs past the end of its section";
    } else {
        const uint8_t *bytes = data.buf;
        int32_t *values = out.buf;
        const uint64_t mask = ((uint64_t)1 << width) - 1;
        Py_BEGIN_ALLOW_THREADS for (Py_ssize_t i = 0; i < count; i++) {
            uint64_t bit = (uint64_t)bit_offset + (uint64_t)i * (uint64_t)width, word;
            memcpy(&word, bytes + (bit >> 3), 8); /* little-endian machines (checked at import) */
            values[i] = (int32_t)(((word >> (bit & 7)) & mask) + (uint64_t)lo);
        }
        Py_END_ALLOW_THREADS
    }
    PyBuffer_Release(&data);
    PyBuffer_Release(&out);
    if (error) {
        PyErr_SetString(PyExc_ValueError, error);
        return NULL;
    }
    Py_RETURN_NONE;
}

static PyObject *affine_in_place(PyObject *self, PyObject *args) {
    PyObject *obj;
    float step, shift;
    if (!PyArg_ParseTuple(args, "Off", &obj, &step, &shift)) return NULL;
    Py_buffer view;
    if (get_buffer(obj, &view, 4, 1, "values") < 0) return NULL;
    unsigned char *bytes = view.buf;
    Py_ssize_t n = view.len / 4;
    Py_BEGIN_ALLOW_THREADS for (Py_ssize_t i = 0; i < n; i++) {
        int32_t q;
        memcpy(&q, bytes + 4 * i, 4);
        float product = (float)q * step; /* rounded, then the sum rounded: as torch's float32 q * step + shift */
        float weight = product + shift;
        memcpy(bytes + 4 * i, &weight, 4);
    }
    Py_END_ALLOW_THREADS
    PyBuffer_Release(&view);
    Py_RETURN_NONE;
}

static PyObject *populate(PyObject *self, PyObject *args) {
    PyObject *obj;
    Py_ssize_t start, end;
    if (!PyArg_ParseTuple(args, "Onn", &obj, &start, &end)) return NULL;
    Py_buffer view;
    if (get_buffer(obj, &view, 1, 1, "buffer") < 0) return NULL;
    start = start < 0 ? 0 : start;
    end = end > view.len ? view.len : end;
    if (end > start) {
        char *first = (char *)view.buf + start, *last = (char *)view.buf + end;
        Py_BEGIN_ALLOW_THREADS
        int done = 0;
#if defined(__linux__)
        uintptr_t page = (uintptr_t)sysconf(_SC_PAGESIZE);
        char *aligned = (char *)(((uintptr_t)first + page - 1) / page * page);
        done = aligned >= last || madvise(aligned, (size_t)(last - aligned), MADV_POPULATE_WRITE) == 0;
#endif
#if defined(__GNUC__)
        if (!done) { /* one write per page, keeping its contents (atomic: another thread may be writing there) */
            for (char *p = first; p < last; p += 4096) __atomic_fetch_add(p, 0, __ATOMIC_RELAXED);
            __atomic_fetch_add(last - 1, 0, __ATOMIC_RELAXED); /* the last page, when first is not page-aligned */
        }
#endif
        Py_END_ALLOW_THREADS
    }
    PyBuffer_Release(&view);
    Py_RETURN_NONE;
}

/* The image of register v under the GF(2) linear map whose columns (images of the unit registers) are m. */
static uint32_t gf2_apply(const uint32_t m[32], uint32_t v) {
    uint32_t image = 0;
    for (int i = 0; v; i++, v >>= 1)
        if (v & 1) image ^= m[i];
    return image;
}

static void gf2_square(uint32_t m[32]) {
    uint32_t squared[32];
    for (int i = 0; i < 32; i++) squared[i] = gf2_apply(m, m[i]);
    memcpy(m, squared, sizeof(squared));
}

static PyObject *crc32_combine(PyObject *self, PyObject *args) {
    unsigned long crc_a, crc_b;
    long long length_b;
    if (!PyArg_ParseTuple(args, "kkL", &crc_a, &crc_b, &length_b)) return NULL;
    if (length_b < 0) {
        PyErr_SetString(PyExc_ValueError, "the length must be non-negative");
        return NULL;
    }
    /* zlib's CRC-32 is affine over GF(2): A's register runs on over len(B) zero bytes, then B's CRC is added */
    uint32_t run[32], register_a = (uint32_t)crc_a;
    run[0] = 0xEDB88320u; /* one zero bit: shift right, the reflected polynomial where a one falls out */
    for (int i = 1; i < 32; i++) run[i] = (uint32_t)1 << (i - 1);
    for (int k = 0; k < 3; k++) gf2_square(run); /* one zero byte */
    for (unsigned long long n = (unsigned long long)length_b; n; n >>= 1) {
        if (n & 1) register_a = gf2_apply(run, register_a);
        if (n > 1) gf2_square(run);
    }
    return PyLong_FromUnsignedLong((unsigned long)(register_a ^ (uint32_t)crc_b));
}

static PyMethodDef methods[] = {
    {"ans_decode", ans_decode, METH_VARARGS,
     "ans_decode(streams, counts, escapes, out): decode each stream's groups into out (streams: a list of "
     "(words, groups) pairs, decoded four at a time)."},
    {"unpack_bits", unpack_bits, METH_VARARGS,
     "unpack_bits(data, bit_offset, width, lo, out): len(out) width-bit integers plus lo."},
    {"affine_in_place", affine_in_place, METH_VARARGS,
     "affine_in_place(values, step, shift): int32 values become float32 q * step + shift in the same memory."},
    {"crc32_combine", crc32_combine, METH_VARARGS,
     "crc32_combine(crc_a, crc_b, length_b): zlib.crc32 of a + b from zlib.crc32(a), zlib.crc32(b) and len(b)."},
    {"populate", populate, METH_VARARGS,
     "populate(buffer, start, end): fault in the pages of bytes [start, end) of a writable buffer, contents kept."},
    {NULL, NULL, 0, NULL}};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_native", NULL, -1, methods};

PyMODINIT_FUNC PyInit__native(void) {
    const uint16_t probe = 1;
    if (*(const uint8_t *)&probe != 1) {
        PyErr_SetString(PyExc_ImportError, "hf_epr's compiled decoder needs a little-endian machine");
        return NULL;
    }
    return PyModule_Create(&module);
}
