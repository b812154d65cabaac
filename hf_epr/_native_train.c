/* Compiled loops of training on the CPU (optional: torch operations compute the same values, in more passes).

   quantize, group_sums: the decoders' straight-through quantization of float32 latents, x = step * round((z - shift)
   / step) + shift, and the step sizes' gradient, the sums of grad * (x - z) per step size, each in one pass over
   several tensors (torch operations: about ten passes, a saved x - z and a bincount).

   noisy_histogram: every latent plus its noise draw placed on its channel's grid, and per grid point the sums that
   noise_rate needs, in one pass: the latents whose noisy value lies in the interval above the point, their
   fractions of the way to the next point, and their noise draws. In torch operations this is eight passes over
   the latents (place, check, floor, fraction, channel offsets, three bincounts, each with its own min and max).
   The position of latent z in channel ch is z * a[ch] + b[ch] + u * c[ch] (u its noise draw).

   Every operation is rounded to float32 as torch rounds it (no fused multiply-add), so both ways give the same
   values; sums are kept in float64. Each call splits its elements among up to `threads` threads (POSIX threads;
   one elsewhere), each with its own sums, added at the end. */

#define PY_SSIZE_T_CLEAN
#include <Python.h>

#pragma STDC FP_CONTRACT OFF /* no fused multiply-add: the rounding of torch's separate operations */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#ifndef _WIN32
#include <pthread.h>
#define MAX_THREADS 64
#else
#define MAX_THREADS 1
#endif

#define ROW 256 /* per-element coefficients are laid out over a whole number of periods of at least this many */
#define CHUNK 1024 /* elements placed before they are summed */
#define PER_THREAD (1 << 20) /* fewest elements worth a thread of their own (below, torch's idle worker threads still
                                spinning after its last operation hold the other cores) */
#define MAX_LATENT 1073741824.0f /* 2**30: rounded latents are clamped to fit int32 (hf_epr.format.decoders) */

static int get_array(PyObject *obj, Py_buffer *view, char format, int writable, const char *name) {
    int flags = PyBUF_C_CONTIGUOUS | PyBUF_FORMAT | (writable ? PyBUF_WRITABLE : 0);
    if (PyObject_GetBuffer(obj, view, flags) < 0) return -1;
    const char *f = view->format ? view->format : "B";
    if (f[0] == '<' || f[0] == '=' || f[0] == '@') f++;
    int ok = f[0] == format && f[1] == '\0';
    if (format == 'i' && f[0] == 'l' && f[1] == '\0' && view->itemsize == 4) ok = 1; /* int32 spelled 'l' */
    if (!ok) {
        PyErr_Format(PyExc_TypeError, "%s must be a contiguous array of '%c' items, not '%s'", name, format, f);
        PyBuffer_Release(view);
        return -1;
    }
    return 0;
}

typedef struct { /* one latent tensor: its values, an index of each element (a pattern repeated: the parameter of
                    its step, or its density channel) and how far its shift lies after its step (-1: none) */
    const float *z;
    Py_ssize_t n;
    const int32_t *pattern;
    Py_ssize_t period, shift_delta;
} Part;

static Py_ssize_t row_length(Py_ssize_t period) { return period * ((ROW + period - 1) / period); }

/* The parts of a call: a list of (values, int32 pattern, shift offset) tuples (shift offset only where `shifts`),
   each pattern entry in [0, limit) and, with its shift offset, below limit. Fills parts and views (2 per part,
   released by the caller: *got counts them); returns the number of values, or -1. */
static Py_ssize_t get_parts(PyObject *list, int shifts, Py_ssize_t limit, Part *parts, Py_buffer *views,
                            Py_ssize_t *got) {
    Py_ssize_t total = 0, size = shifts ? 3 : 2;
    for (Py_ssize_t t = 0; t < PyList_GET_SIZE(list); t++) {
        PyObject *item = PyList_GET_ITEM(list, t);
        Part *p = &parts[t];
        if (!PyTuple_Check(item) || PyTuple_GET_SIZE(item) != size) {
            PyErr_SetString(PyExc_TypeError, shifts ? "tensors must be (latents, step pattern, shift offset) tuples"
                                                    : "tensors must be (values, channel pattern) tuples");
            return -1;
        }
        p->shift_delta = -1;
        if (shifts) {
            p->shift_delta = PyLong_AsSsize_t(PyTuple_GET_ITEM(item, 2));
            if (p->shift_delta == -1 && PyErr_Occurred()) return -1;
        }
        if (get_array(PyTuple_GET_ITEM(item, 0), &views[*got], 'f', 0, "values") < 0) return -1;
        p->z = views[*got].buf;
        p->n = views[(*got)++].len / 4;
        if (get_array(PyTuple_GET_ITEM(item, 1), &views[*got], 'i', 0, "pattern") < 0) return -1;
        p->pattern = views[*got].buf;
        p->period = views[(*got)++].len / 4;
        if (p->n && (p->period == 0 || p->n % p->period)) {
            PyErr_SetString(PyExc_ValueError, "a pattern must repeat a whole number of times over its values");
            return -1;
        }
        for (Py_ssize_t i = 0; i < p->period; i++)
            if (p->pattern[i] < 0 || p->pattern[i] >= limit
                || (p->shift_delta >= 0 && p->pattern[i] + p->shift_delta >= limit)) {
                PyErr_SetString(PyExc_ValueError, "a pattern or shift offset points past the parameters or channels");
                return -1;
            }
        total += p->n;
    }
    return total;
}

/* ------------------------------------------------------------------ threads */
typedef struct Job Job;
struct Job { /* one thread's share of a call: the elements [lo, hi) of all parts back to back */
    int (*run)(Job *);
    const Part *parts;
    Py_ssize_t n_parts, lo, hi;
    const float *f[2]; /* the call's first float arrays: steps, params; grad, x; noise, coef */
    float *out;
    int32_t *index;
    double *sums; /* this thread's sums (the first thread's are the call's) */
    Py_ssize_t n_sums, block, stride, pick, channels;
    int32_t points;
    int result;
};

#ifndef _WIN32
static void *run_job(void *job) {
    Job *j = job;
    j->result = j->run(j);
    return NULL;
}
#endif

/* Runs `job` split into up to `threads` shares of at least PER_THREAD elements; adds the shares' sums into the
   first's. Returns the smallest result of the shares (-1 out of memory). */
static int run_split(Job *job, Py_ssize_t total, int threads) {
    Py_ssize_t k = total / PER_THREAD;
    if (k > threads) k = threads;
    if (k > MAX_THREADS) k = MAX_THREADS;
    if (k < 1) k = 1;
    Job jobs[MAX_THREADS];
    int failed = 0;
    for (Py_ssize_t t = 0; t < k; t++) {
        jobs[t] = *job;
        jobs[t].lo = total * t / k;
        jobs[t].hi = total * (t + 1) / k;
        if (t > 0 && job->n_sums) {
            jobs[t].sums = calloc(job->n_sums, sizeof(double));
            if (!jobs[t].sums) {
                failed = 1;
                k = t;
                break;
            }
        }
    }
    if (failed) {
        for (Py_ssize_t t = 1; t < k; t++) free(jobs[t].sums);
        return -1;
    }
#ifndef _WIN32
    pthread_t ids[MAX_THREADS];
    int started[MAX_THREADS] = {0};
    for (Py_ssize_t t = 1; t < k; t++) started[t] = pthread_create(&ids[t], NULL, run_job, &jobs[t]) == 0;
    jobs[0].result = jobs[0].run(&jobs[0]);
    for (Py_ssize_t t = 1; t < k; t++) {
        if (started[t])
            pthread_join(ids[t], NULL);
        else
            jobs[t].result = jobs[t].run(&jobs[t]);
    }
#else
    jobs[0].result = jobs[0].run(&jobs[0]);
#endif
    int result = jobs[0].result;
    for (Py_ssize_t t = 1; t < k; t++) {
        if (jobs[t].result < result) result = jobs[t].result;
        if (job->n_sums) {
            for (Py_ssize_t i = 0; i < job->n_sums; i++) job->sums[i] += jobs[t].sums[i];
            free(jobs[t].sums);
        }
    }
    return result;
}

/* Calls each(job, part, first, last, g) for the elements [first, last) of every part within the job's share (g: the
   global place of element `first`); stops at a result other than 1. */
static int for_share(Job *job, int (*each)(Job *, const Part *, Py_ssize_t, Py_ssize_t, Py_ssize_t)) {
    Py_ssize_t start = 0;
    for (Py_ssize_t t = 0; t < job->n_parts; t++) {
        const Part *p = &job->parts[t];
        Py_ssize_t a = job->lo > start ? job->lo : start, b = job->hi < start + p->n ? job->hi : start + p->n;
        if (a < b) {
            int r = each(job, p, a - start, b - start, a);
            if (r != 1) return r;
        }
        start += p->n;
    }
    return 1;
}

/* ------------------------------------------------------------------ quantize, group_sums */
/* round half to even of a float32, as torch.round and nearbyint: adding and subtracting 2**23 rounds a value below
   2**23 in magnitude to an integer in the default rounding mode (larger floats are integers already); the sign is
   copied back so that -0.3 rounds to -0.0. Branch-free, so that loops over it vectorize. */
static inline float round_even(float u) {
    const float big = 8388608.0f;
    const float magnitude = fabsf(u);
    const float r = (magnitude + big) - big;
    return copysignf(magnitude < big ? r : magnitude, u);
}

static int quantize_run(Job *job, const Part *p, Py_ssize_t first, Py_ssize_t last, Py_ssize_t g) {
    const float *steps = job->f[0], *params = job->f[1];
    const Py_ssize_t row = row_length(p->period);
    float *step = malloc(2 * row * sizeof(float)), *shift = step + row;
    if (!step) return -1;
    for (Py_ssize_t i = 0; i < row; i++) {
        const int32_t k = p->pattern[i % p->period];
        step[i] = steps[k];
        shift[i] = p->shift_delta >= 0 ? params[k + p->shift_delta] : 0.0f;
    }
    for (Py_ssize_t j = first; j < last;) { /* a run within one row */
        const Py_ssize_t q = j % row, m = last - j < row - q ? last - j : row - q;
        const float *z = p->z + j, *s = step + q, *h = shift + q;
        float *x = job->out + g + (j - first);
        if (p->shift_delta >= 0) {
            for (Py_ssize_t i = 0; i < m; i++) {
                float u = (z[i] - h[i]) / s[i];
                u = round_even(u);
                u = u < -MAX_LATENT ? -MAX_LATENT : u; /* comparisons, not fminf/fmaxf: NaN stays NaN */
                u = u > MAX_LATENT ? MAX_LATENT : u;
                const float w = u * s[i];
                x[i] = w + h[i];
            }
        } else {
            for (Py_ssize_t i = 0; i < m; i++) {
                float u = z[i] / s[i];
                u = round_even(u);
                u = u < -MAX_LATENT ? -MAX_LATENT : u;
                u = u > MAX_LATENT ? MAX_LATENT : u;
                x[i] = u * s[i];
            }
        }
        j += m;
    }
    free(step);
    return 1;
}

static int quantize_job(Job *job) { return for_share(job, quantize_run); }

/* sums[pattern[i % period]] += grad * (x - z), through per-position sums over rows (which vectorize). */
static int group_sums_run(Job *job, const Part *p, Py_ssize_t first, Py_ssize_t last, Py_ssize_t g) {
    const float *grad = job->f[0] + g - first, *x = job->f[1] + g - first;
    const Py_ssize_t row = row_length(p->period);
    double *acc = calloc(row, sizeof(double));
    if (!acc) return -1;
    for (Py_ssize_t j = first; j < last;) {
        const Py_ssize_t q = j % row, m = last - j < row - q ? last - j : row - q;
        for (Py_ssize_t i = 0; i < m; i++) acc[q + i] += (double)(grad[j + i] * (x[j + i] - p->z[j + i]));
        j += m;
    }
    for (Py_ssize_t i = 0; i < row; i++) job->sums[p->pattern[i % p->period]] += acc[i];
    free(acc);
    return 1;
}

static int group_sums_job(Job *job) { return for_share(job, group_sums_run); }

/* ------------------------------------------------------------------ noisy_histogram */
/* Positions of n latents with per-element coefficients: each latent's cell to index and its fraction of the way to
   the next point to frac. Branch-free, so that the compiler vectorizes it; returns 0 if a position left
   [0, limit) or was not finite. */
static int place(const float *restrict z, const float *restrict u, Py_ssize_t n, const float *restrict a,
                 const float *restrict b, const float *restrict c, const int32_t *restrict offset, float limit,
                 int32_t *restrict index, float *restrict frac) {
    int ok = 1;
    for (Py_ssize_t i = 0; i < n; i++) {
        float x = z[i] * a[i];
        x = x + b[i];
        x = x + u[i] * c[i];
        ok &= (x >= 0.0f) & (x < limit);
        const int32_t k = (int32_t)x; /* x >= 0: truncation is the floor */
        frac[i] = x - (float)k;
        index[i] = k + offset[i];
    }
    return ok;
}

static int histogram_run(Job *job, const Part *p, Py_ssize_t first, Py_ssize_t last, Py_ssize_t g) {
    const float *noise = job->f[0], *a = job->f[1], *b = a + job->channels, *c = b + job->channels;
    const float limit = (float)(job->points - 1);
    const Py_ssize_t row = row_length(p->period), block = job->block;
    float frac[CHUNK];
    float *coef = malloc(row * (3 * sizeof(float) + sizeof(int32_t)));
    if (!coef) return -1;
    float *ra = coef, *rb = coef + row, *rc = coef + 2 * row;
    int32_t *offset = (int32_t *)(coef + 3 * row);
    for (Py_ssize_t i = 0; i < row; i++) {
        const int32_t ch = p->pattern[i % p->period];
        ra[i] = a[ch], rb[i] = b[ch], rc[i] = c[ch], offset[i] = ch * job->points;
    }
    int fits = 1;
    for (Py_ssize_t j = first; j < last && fits;) { /* a run within one row, one chunk and one sampling block */
        const Py_ssize_t q = j % row;
        Py_ssize_t m = last - j;
        if (m > row - q) m = row - q;
        if (m > CHUNK) m = CHUNK;
        if (m > block - g % block) m = block - g % block;
        fits = place(p->z + j, noise + g, m, ra + q, rb + q, rc + q, offset + q, limit, job->index + g, frac);
        if (fits && (g / block) % job->stride == job->pick)
            for (Py_ssize_t i = 0; i < m; i++) {
                double *s = job->sums + 3 * (Py_ssize_t)job->index[g + i];
                s[0] += 1.0;
                s[1] += (double)frac[i];
                s[2] += (double)noise[g + i];
            }
        j += m, g += m;
    }
    free(coef);
    return fits;
}

static int histogram_job(Job *job) { return for_share(job, histogram_run); }

/* ------------------------------------------------------------------ Python functions */
typedef struct { /* what tells the three functions' arguments apart */
    const char *formats; /* of the arrays after the tensors: 'f' float32, 'i' int32, 'd' float64 */
    const char *names[4];
    int writable[4], shifts;
    int (*setup)(Job *, Py_buffer *, Py_ssize_t); /* checks the arrays against the number of latents, fills job */
    int (*run)(Job *);
} Signature;

/* Parses the tensors and arrays (the first two arrays become job->f), lets the signature check them and fill job,
   then runs it with the GIL released. Returns the job's result, or -1 with an exception set. */
static int call(const Signature *sig, PyObject *list, PyObject **arrays, Py_ssize_t limit_array, Py_ssize_t unit,
                Job *job, int threads) {
    const int n_arrays = (int)strlen(sig->formats);
    Py_ssize_t n_parts = PyList_GET_SIZE(list), got = 0;
    Py_buffer *views = PyMem_Calloc(n_arrays + 2 * n_parts, sizeof(Py_buffer));
    Part *parts = PyMem_Calloc(n_parts ? n_parts : 1, sizeof(Part));
    int result = -1;
    if (!views || !parts) {
        PyErr_NoMemory();
        goto release;
    }
    for (; got < n_arrays; got++)
        if (get_array(arrays[got], &views[got], sig->formats[got], sig->writable[got], sig->names[got]) < 0)
            goto release;
    Py_ssize_t total = get_parts(list, sig->shifts, views[limit_array].len / unit, parts, views, &got);
    if (total < 0 || sig->setup(job, views, total) < 0) goto release;
    job->parts = parts;
    job->n_parts = n_parts;
    job->run = sig->run;
    job->f[0] = views[0].buf;
    job->f[1] = views[1].buf;
    Py_BEGIN_ALLOW_THREADS
    if (job->n_sums) memset(job->sums, 0, job->n_sums * sizeof(double));
    result = run_split(job, total, threads);
    Py_END_ALLOW_THREADS
    if (result < 0) PyErr_NoMemory();
release:
    for (Py_ssize_t i = 0; i < got; i++) PyBuffer_Release(&views[i]);
    PyMem_Free(views);
    PyMem_Free(parts);
    return PyErr_Occurred() ? -1 : result;
}

static int value_error(const char *message) {
    PyErr_SetString(PyExc_ValueError, message);
    return -1;
}

static int quantize_setup(Job *job, Py_buffer *views, Py_ssize_t total) {
    if (views[0].len != views[1].len || views[2].len / 4 < total)
        return value_error("steps and params must have one entry per parameter, x one per latent");
    job->out = views[2].buf;
    return 0;
}

static int group_sums_setup(Job *job, Py_buffer *views, Py_ssize_t total) {
    if (views[0].len / 4 < total || views[1].len / 4 < total)
        return value_error("grad and x must hold a value for every latent");
    job->sums = views[2].buf;
    job->n_sums = views[2].len / 8;
    return 0;
}

static int histogram_setup(Job *job, Py_buffer *views, Py_ssize_t total) {
    job->channels = views[1].len / 12;
    job->n_sums = 3 * job->channels * (Py_ssize_t)job->points;
    if (views[1].len != 12 * job->channels || job->points < 2 || job->block < 1 || job->stride < 1 || job->pick < 0
        || job->pick >= job->stride)
        return value_error("coef must hold 3 rows of channels, points >= 2 and 0 <= pick < stride");
    if (views[0].len / 4 < total || views[2].len / 4 < total || views[3].len / 8 < job->n_sums)
        return value_error("noise and index must hold a value for every latent, sums 3 per grid point");
    job->index = views[2].buf;
    job->sums = views[3].buf;
    return 0;
}

static const Signature quantize_signature = {"fff", {"steps", "params", "x"}, {0, 0, 1}, 1, quantize_setup,
                                             quantize_job};
static const Signature group_sums_signature = {"ffd", {"grad", "x", "sums"}, {0, 0, 1}, 1, group_sums_setup,
                                               group_sums_job};
static const Signature histogram_signature = {"ffid", {"noise", "coef", "index", "sums"}, {0, 0, 1, 1}, 0,
                                              histogram_setup, histogram_job};

/* quantize(tensors, steps, params, x, threads) and group_sums(tensors, grad, x, sums, threads) */
static PyObject *quantized(PyObject *args, const Signature *sig, Py_ssize_t limit_array, Py_ssize_t unit) {
    PyObject *list, *arrays[3];
    int threads;
    if (!PyArg_ParseTuple(args, "O!OOOi", &PyList_Type, &list, &arrays[0], &arrays[1], &arrays[2], &threads))
        return NULL;
    Job job = {0};
    if (call(sig, list, arrays, limit_array, unit, &job, threads) < 0) return NULL;
    Py_RETURN_NONE;
}

static PyObject *quantize(PyObject *self, PyObject *args) { return quantized(args, &quantize_signature, 0, 4); }

static PyObject *group_sums(PyObject *self, PyObject *args) { return quantized(args, &group_sums_signature, 2, 8); }

static PyObject *noisy_histogram(PyObject *self, PyObject *args) {
    PyObject *list, *arrays[4];
    int threads;
    Job job = {0};
    if (!PyArg_ParseTuple(args, "O!OOOOinnni", &PyList_Type, &list, &arrays[0], &arrays[1], &arrays[2], &arrays[3],
                          &job.points, &job.block, &job.stride, &job.pick, &threads))
        return NULL;
    int result = call(&histogram_signature, list, arrays, 1, 12, &job, threads);
    if (result < 0) return NULL;
    return PyBool_FromLong(result);
}

static PyMethodDef methods[] = {
    {"quantize", quantize, METH_VARARGS,
     "quantize(tensors, steps, params, x, threads): for every latent z (tensors: (float32 latents, int32 pattern "
     "of the parameter index of each element's step, shift offset or -1) tuples), x = step * round((z - shift) / "
     "step) + shift, rounded values clamped to +-2**30 (steps: exp of the log steps, indexed like params; the shift "
     "is params[index + offset]), back to back in x."},
    {"group_sums", group_sums, METH_VARARGS,
     "group_sums(tensors, grad, x, sums, threads): sums[index] = the sum of grad * (x - z) over the elements of "
     "each step (tensors and x as for quantize; sums float64, one per parameter, zeroed first)."},
    {"noisy_histogram", noisy_histogram, METH_VARARGS,
     "noisy_histogram(tensors, noise, coef, index, sums, points, block, stride, pick, threads) -> bool: place every "
     "latent (tensors: (float32 values, int32 channel pattern) pairs) with its noise draw on its channel's grid of "
     "points (coef: float32 rows a, b, c per channel: position z * a + b + u * c); write each latent's grid cell "
     "(channel * points + point) to index and, for the latents of every stride-th block (from pick), their count, "
     "fractions and noise draws per cell to sums (float64, 3 per cell). False when a position left "
     "[0, points - 1): index and sums are then incomplete."},
    {NULL, NULL, 0, NULL}};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_native_train", NULL, -1, methods};

PyMODINIT_FUNC PyInit__native_train(void) { return PyModule_Create(&module); }
