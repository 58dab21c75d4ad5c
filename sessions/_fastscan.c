/* sessions/_fastscan.c: three byte scans of the deep scanner (sessions/decoders.py) in compiled code.
 *
 * Each function answers exactly what a pure-Python expression answers (sessions/fastscan.py holds both, and
 * tests/test_fastscan.py compares them on random and planted buffers); this file only makes the answer cheaper.
 * On x86-64 the loops use SSE2 (always present there); elsewhere a scalar loop gives the same results.
 *
 *   run16(buf, start)         buf.translate(PRE).find(b"a" * 16, start): the first run of 16 bytes of
 *                             [A-Za-z0-9+] starting at or after start, or -1
 *   count_blanks(buf)         len(buf) - len(buf.translate(None, b" \t\r\n"))
 *   find(buf, needle, start)  buf.find(needle, start) for len(needle) >= 2 and start >= 0
 *
 * No state, no allocation, the GIL held throughout (each call takes microseconds: releasing the GIL would cost
 * more than it frees). Buffers are read through the buffer protocol, never written.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>
#ifdef __SSE2__
#include <emmintrin.h>
#endif

static unsigned char RUN_CLASS[256];  /* 1 for [A-Za-z0-9+] */
static unsigned char BLANK[256];      /* 1 for space, tab, CR, LF */

/* Bit k of the result is set when p[k] is in RUN_CLASS (k < 64). */
static inline uint64_t run_class64(const unsigned char *p) {
#ifdef __SSE2__
    uint64_t m = 0;
    for (int k = 0; k < 4; k++) {
        __m128i x = _mm_loadu_si128((const __m128i *)(p + 16 * k));
        /* x | 0x20 in 'a'..'z' exactly for letters; signed compares leave bytes >= 0x80 out */
        __m128i low = _mm_or_si128(x, _mm_set1_epi8(0x20));
        __m128i letter = _mm_and_si128(_mm_cmpgt_epi8(low, _mm_set1_epi8(0x60)),
                                       _mm_cmplt_epi8(low, _mm_set1_epi8(0x7B)));
        __m128i digit = _mm_and_si128(_mm_cmpgt_epi8(x, _mm_set1_epi8(0x2F)), _mm_cmplt_epi8(x, _mm_set1_epi8(0x3A)));
        __m128i plus = _mm_cmpeq_epi8(x, _mm_set1_epi8('+'));
        __m128i in = _mm_or_si128(_mm_or_si128(letter, digit), plus);
        m |= (uint64_t)(uint16_t)_mm_movemask_epi8(in) << (16 * k);
    }
    return m;
#else
    uint64_t m = 0;
    for (int k = 0; k < 64; k++) m |= (uint64_t)RUN_CLASS[p[k]] << k;
    return m;
#endif
}

static Py_ssize_t run16_impl(const unsigned char *p, Py_ssize_t len, Py_ssize_t i) {
    Py_ssize_t run = 0;  /* class bytes in a row ending at p[i - 1], counted from the first start */
    while (i < len) {
        Py_ssize_t take = len - i >= 64 ? 64 : len - i;
        uint64_t m = 0;
        if (take == 64) {
            m = run_class64(p + i);
        } else {
            for (Py_ssize_t k = 0; k < take; k++) m |= (uint64_t)RUN_CLASS[p[i + k]] << k;
        }
        if (run) {  /* a run from the previous block: does this block's head complete it? */
            Py_ssize_t lead = ~m ? __builtin_ctzll(~m) : 64;
            if (lead > take) lead = take;
            if (run + lead >= 16) return i - run;
        }
        uint64_t r = m & (m >> 1);  /* bit k: bits k..k+1 set */
        r &= r >> 2;                 /* k..k+3 */
        r &= r >> 4;                 /* k..k+7 */
        r &= r >> 8;                 /* k..k+15 */
        /* (bits of m at and past take are 0, and the shifts bring in 0s: a window past the block has no bit) */
        if (r) return i + __builtin_ctzll(r);
        if (take < 64) break;
        /* no run of 16 wholly in the block, none completed from before: the block has a byte outside the class,
           so the run carried on is the class bytes after its last such byte */
        run = (m >> 63) ? __builtin_clzll(~m) : 0;
        i += 64;
    }
    return -1;
}

static PyObject *fs_run16(PyObject *self, PyObject *args) {
    Py_buffer b;
    Py_ssize_t start = 0;
    if (!PyArg_ParseTuple(args, "y*|n:run16", &b, &start)) return NULL;
    if (start < 0) {
        PyBuffer_Release(&b);
        PyErr_SetString(PyExc_ValueError, "start must be >= 0");
        return NULL;
    }
    Py_ssize_t r = run16_impl((const unsigned char *)b.buf, b.len, start);
    PyBuffer_Release(&b);
    return PyLong_FromSsize_t(r);
}

static PyObject *fs_count_blanks(PyObject *self, PyObject *args) {
    Py_buffer b;
    if (!PyArg_ParseTuple(args, "y*:count_blanks", &b)) return NULL;
    const unsigned char *p = (const unsigned char *)b.buf;
    Py_ssize_t n = b.len, i = 0, c = 0;
#ifdef __SSE2__
    while (n - i >= 16) {
        __m128i acc = _mm_setzero_si128();  /* per-lane counts: at most 255 blocks before they are summed */
        Py_ssize_t stop = i + 16 * 255;
        if (stop > n - 15) stop = n - 15;
        for (; i < stop; i += 16) {
            __m128i x = _mm_loadu_si128((const __m128i *)(p + i));
            __m128i e = _mm_or_si128(_mm_or_si128(_mm_cmpeq_epi8(x, _mm_set1_epi8(' ')),
                                                  _mm_cmpeq_epi8(x, _mm_set1_epi8('\t'))),
                                     _mm_or_si128(_mm_cmpeq_epi8(x, _mm_set1_epi8('\r')),
                                                  _mm_cmpeq_epi8(x, _mm_set1_epi8('\n'))));
            acc = _mm_sub_epi8(acc, e);  /* a match is -1 */
        }
        __m128i s = _mm_sad_epu8(acc, _mm_setzero_si128());
        c += _mm_cvtsi128_si32(s) + _mm_cvtsi128_si32(_mm_srli_si128(s, 8));
    }
#endif
    for (; i < n; i++) c += BLANK[p[i]];
    PyBuffer_Release(&b);
    return PyLong_FromSsize_t(c);
}

static Py_ssize_t find_impl(const unsigned char *p, Py_ssize_t len, const unsigned char *nd, Py_ssize_t k,
                            Py_ssize_t i) {
    /* candidates: the needle's first and last byte in place; then the bytes between compared */
#ifdef __SSE2__
    const __m128i first = _mm_set1_epi8((char)nd[0]), last = _mm_set1_epi8((char)nd[k - 1]);
    while (i + k - 1 + 16 <= len) {
        __m128i a = _mm_cmpeq_epi8(_mm_loadu_si128((const __m128i *)(p + i)), first);
        __m128i z = _mm_cmpeq_epi8(_mm_loadu_si128((const __m128i *)(p + i + k - 1)), last);
        unsigned m = (unsigned)_mm_movemask_epi8(_mm_and_si128(a, z));
        while (m) {
            int bit = __builtin_ctz(m);
            if (memcmp(p + i + bit + 1, nd + 1, (size_t)(k - 2)) == 0) return i + bit;
            m &= m - 1;
        }
        i += 16;
    }
#endif
    for (; i + k <= len; i++) {
        if (p[i] == nd[0] && p[i + k - 1] == nd[k - 1] && memcmp(p + i + 1, nd + 1, (size_t)(k - 2)) == 0) return i;
    }
    return -1;
}

static PyObject *fs_find(PyObject *self, PyObject *args) {
    Py_buffer b, nd;
    Py_ssize_t start = 0;
    if (!PyArg_ParseTuple(args, "y*y*|n:find", &b, &nd, &start)) return NULL;
    PyObject *res = NULL;
    if (start < 0 || nd.len < 2) {
        PyErr_SetString(PyExc_ValueError, "find needs start >= 0 and a needle of 2 or more bytes");
    } else {
        res = PyLong_FromSsize_t(find_impl((const unsigned char *)b.buf, b.len, (const unsigned char *)nd.buf,
                                           nd.len, start));
    }
    PyBuffer_Release(&b);
    PyBuffer_Release(&nd);
    return res;
}

static PyMethodDef methods[] = {
    {"run16", fs_run16, METH_VARARGS, "run16(buf, start=0) -> first run of 16 [A-Za-z0-9+] at or after start, or -1"},
    {"count_blanks", fs_count_blanks, METH_VARARGS, "count_blanks(buf) -> number of space, tab, CR and LF bytes"},
    {"find", fs_find, METH_VARARGS, "find(buf, needle, start=0) -> buf.find(needle, start) (needle >= 2 bytes)"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_fastscan",
                                    "Byte scans of the deep scanner in compiled code (see sessions/fastscan.py).",
                                    -1, methods};

PyMODINIT_FUNC PyInit__fastscan(void) {
    for (int c = 0; c < 256; c++) {
        RUN_CLASS[c] = (c >= 'A' && c <= 'Z') || (c >= 'a' && c <= 'z') || (c >= '0' && c <= '9') || c == '+';
        BLANK[c] = c == ' ' || c == '\t' || c == '\r' || c == '\n';
    }
    return PyModule_Create(&module);
}
