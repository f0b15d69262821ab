/*
 * The NATS protocol's message frames (MSG and HMSG), cut out of a read buffer in C.
 *
 * Why: nats-py parses each frame in Python (a regular expression, int(), a dict, two slices and a
 * coroutine per message): about 4.7 us a message on this machine, a tenth of what a node spends on a
 * durable message or a request. scan() cuts every complete frame at the front of the buffer in one
 * call and hands them back as tuples.
 *
 * It reads only the canonical form nats-server writes: "MSG" or "HMSG", fields separated by spaces or
 * tabs, the subject and reply subject any bytes but space, tab, CR and LF (what the server relays),
 * the subscription id and sizes decimal digits, the line ended by CRLF, the body by CRLF. It stops at
 * the first thing that is anything else (a PING, an INFO, a line it does not read, a body not ended
 * by CRLF) and says so: the caller hands the rest to nats-py's own parser, so every other input is
 * parsed, refused or waited on exactly as before. Nothing here decides what a hostile byte means;
 * it either reads the frame the way the library would, or leaves it to the library.
 *
 * Bounds: a control line is looked at for at most MAX_LINE bytes (nats-py's own limit), the sizes
 * have at most MAX_DIGITS digits (a body of up to 999,999,999 bytes; nats-server's max_payload is far
 * below), and the scan never reads past the buffer.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <string.h>

#define MAX_LINE 4096
#define MAX_DIGITS 9
#define MAX_SID_DIGITS 18

/* what scan() says about where it stopped */
#define AT_END 0    /* the buffer is used up */
#define NEED_MORE 1 /* a frame starts there and its control line is not complete yet */
#define OTHER 2     /* something else starts there: nats-py's parser reads it */
#define NEED_BODY 3 /* a frame whose control line is complete and whose body is not */

static int is_sep(unsigned char c) { return c == ' ' || c == '\t'; }

static int is_end(unsigned char c) { return c == '\r' || c == '\n'; }

/* The fields of a control line: up to 6 tokens between separators. */
typedef struct {
    const unsigned char *start[6];
    Py_ssize_t len[6];
    int count;
} fields_t;

/* Parse a decimal field of at most max_digits digits, or -1. */
static long long digits(const unsigned char *p, Py_ssize_t n, int max_digits) {
    if (n < 1 || n > max_digits)
        return -1;
    long long v = 0;
    for (Py_ssize_t i = 0; i < n; i++) {
        if (p[i] < '0' || p[i] > '9')
            return -1;
        v = v * 10 + (p[i] - '0');
    }
    return v;
}

/* One frame at buf[0..n): AT_END is never returned; NEED_MORE, NEED_BODY or OTHER, or READ for a
 * frame read (its total length in *used and its parts in the out arguments). */
#define READ 4

static int one_frame(const unsigned char *buf, Py_ssize_t n, Py_ssize_t *used, long long *sid,
                     Py_ssize_t *subj_off, Py_ssize_t *subj_len, Py_ssize_t *reply_off, Py_ssize_t *reply_len,
                     Py_ssize_t *hdr_off, Py_ssize_t *hdr_len, Py_ssize_t *body_off, Py_ssize_t *body_len) {
    int headers;
    Py_ssize_t i;
    if (n >= 4 && memcmp(buf, "MSG", 3) == 0 && is_sep(buf[3])) {
        headers = 0;
        i = 3;
    } else if (n >= 5 && memcmp(buf, "HMSG", 4) == 0 && is_sep(buf[4])) {
        headers = 1;
        i = 4;
    } else if ((n < 4 && memcmp(buf, "MSG", (size_t)n) == 0) || (n < 5 && memcmp(buf, "HMSG", (size_t)n) == 0)) {
        return NEED_MORE; /* the start of a frame's name */
    } else {
        return OTHER;
    }
    /* The line ends at the first CR or LF; it must be CRLF, within MAX_LINE bytes. */
    Py_ssize_t limit = n < MAX_LINE ? n : MAX_LINE;
    Py_ssize_t eol = i;
    while (eol < limit && !is_end(buf[eol]))
        eol++;
    if (eol >= limit)
        return n < MAX_LINE ? NEED_MORE : OTHER;
    if (buf[eol] != '\r')
        return OTHER;
    if (eol + 1 >= n)
        return NEED_MORE;
    if (buf[eol + 1] != '\n')
        return OTHER;
    /* Fields: separator-led tokens; the line must end right after the last token. */
    fields_t f;
    f.count = 0;
    Py_ssize_t j = i;
    while (j < eol) {
        if (!is_sep(buf[j]))
            return OTHER; /* a token not led by a separator (cannot happen after the first) */
        while (j < eol && is_sep(buf[j]))
            j++;
        if (j == eol)
            return OTHER; /* separators before CRLF: nats-py's expressions do not match that */
        if (f.count == 6)
            return OTHER;
        f.start[f.count] = buf + j;
        Py_ssize_t s = j;
        while (j < eol && !is_sep(buf[j]))
            j++;
        f.len[f.count] = j - s;
        f.count++;
    }
    int base = headers ? 4 : 3; /* subject, sid, [hdr size,] total size: without a reply subject */
    int with_reply;
    if (f.count == base)
        with_reply = 0;
    else if (f.count == base + 1)
        with_reply = 1;
    else
        return OTHER;
    long long s = digits(f.start[1], f.len[1], MAX_SID_DIGITS);
    if (s < 0)
        return OTHER;
    long long hdr_size = 0, total;
    int k = 2 + with_reply;
    if (headers) {
        hdr_size = digits(f.start[k], f.len[k], MAX_DIGITS);
        k++;
        if (hdr_size < 0)
            return OTHER;
    }
    total = digits(f.start[k], f.len[k], MAX_DIGITS);
    if (total < 0 || hdr_size > total)
        return OTHER;
    Py_ssize_t line_end = eol + 2;
    if (n - line_end < (Py_ssize_t)total + 2)
        return NEED_BODY;
    if (buf[line_end + total] != '\r' || buf[line_end + total + 1] != '\n')
        return OTHER;
    *used = line_end + (Py_ssize_t)total + 2;
    *sid = s;
    *subj_off = f.start[0] - buf;
    *subj_len = f.len[0];
    if (with_reply) {
        *reply_off = f.start[2] - buf;
        *reply_len = f.len[2];
    } else {
        *reply_off = 0;
        *reply_len = 0;
    }
    /* nats-py hands a message whose header block is empty (HMSG with a header size of 0) no headers. */
    *hdr_off = line_end;
    *hdr_len = (Py_ssize_t)hdr_size;
    *body_off = line_end + (Py_ssize_t)hdr_size;
    *body_len = (Py_ssize_t)(total - hdr_size);
    return READ;
}

PyDoc_STRVAR(scan_doc,
"scan(buf) -> (frames, used, status)\n\n"
"Cut the complete MSG/HMSG frames at the front of ``buf`` (a bytes-like object): ``frames`` is a list\n"
"of ``(sid, subject, reply, headers, body)`` (``reply`` b'' when there is none, ``headers`` None\n"
"without a header block), ``used`` the bytes they took, ``status`` what is at ``buf[used:]``: 0 nothing,\n"
"1 a frame whose control line is not complete, 2 something nats-py's parser must read, 3 a frame whose\n"
"control line is complete and whose body is not.");

static PyObject *scan(PyObject *self, PyObject *args) {
    Py_buffer view;
    if (!PyArg_ParseTuple(args, "y*", &view))
        return NULL;
    const unsigned char *buf = (const unsigned char *)view.buf;
    Py_ssize_t n = view.len, pos = 0;
    int status = AT_END;
    PyObject *frames = PyList_New(0);
    if (frames == NULL)
        goto fail;
    while (pos < n) {
        Py_ssize_t used, so, sl, ro, rl, ho, hl, bo, bl;
        long long sid;
        int r = one_frame(buf + pos, n - pos, &used, &sid, &so, &sl, &ro, &rl, &ho, &hl, &bo, &bl);
        if (r != READ) {
            status = r;
            break;
        }
        const char *b = (const char *)(buf + pos);
        PyObject *headers;
        if (hl > 0) {
            headers = PyBytes_FromStringAndSize(b + ho, hl);
        } else {
            headers = Py_None;
            Py_INCREF(headers);
        }
        PyObject *t = headers == NULL ? NULL
                      : Py_BuildValue("(Ly#y#Ny#)", sid, b + so, sl, b + ro, rl, headers, b + bo, bl);
        if (t == NULL) /* Py_BuildValue released headers ("N") */
            goto fail;
        int err = PyList_Append(frames, t);
        Py_DECREF(t);
        if (err < 0)
            goto fail;
        pos += used;
    }
    PyBuffer_Release(&view);
    return Py_BuildValue("(Nni)", frames, pos, status);
fail:
    Py_XDECREF(frames);
    PyBuffer_Release(&view);
    return NULL;
}

static PyMethodDef methods[] = {
    {"scan", scan, METH_VARARGS, scan_doc},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_frames", "NATS MSG/HMSG frames cut out of a read buffer (see sdk/nats_guard.py).",
    -1, methods,
};

PyMODINIT_FUNC PyInit__frames(void) {
    PyObject *m = PyModule_Create(&module);
    if (m == NULL)
        return NULL;
    if (PyModule_AddIntConstant(m, "AT_END", AT_END) < 0 || PyModule_AddIntConstant(m, "NEED_MORE", NEED_MORE) < 0
        || PyModule_AddIntConstant(m, "OTHER", OTHER) < 0 || PyModule_AddIntConstant(m, "NEED_BODY", NEED_BODY) < 0
        || PyModule_AddIntConstant(m, "MAX_LINE", MAX_LINE) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
