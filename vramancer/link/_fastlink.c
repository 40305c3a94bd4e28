/* The steady state of a StreamConnection (vramancer/link/transport.py) in C: the base class Stream
   whose send() and recv() take the common frame themselves and hand anything else to the Python
   methods _send_py / _recv_py, which are the whole protocol (and, without this module, the Link).

   Optional: setup.py builds it with optional=True; without a compiler the Link runs in Python.
   It validates nothing of its own. A frame is received here only when its header (but stream and
   sequence) and descriptor block equal, byte for byte, those of a frame the Python reader validated
   before on this connection (the _rx layout), on a stream seen before, with a sequence number above
   the last one; its single destination is a numpy array of that layout's dtype and shape. Anything
   else is left staged (stage[_lo:_hi]) for the Python path, which checks it and names the reason of a
   refusal. A frame is sent here only when it is one numpy array of the last layout sent (_tx) on a
   stream used before: the stream and sequence are packed into the layout's encoded header.

   Fields (members, used by the Python methods too): _fd (-1: the C path is off: TLS, closed),
   _lo, _hi, _stage (bytearray), _tx (dtype, shape, header bytearray, frame bytes), _rx (_RxLayout or
   None), _next_seq (the writer's stream -> next sequence dict), bytes_sent, bytes_received.

   Reading: one recv into the staging buffer brings a small frame whole (or the start of a large one);
   the header is compared where it lies, then the staged payload is copied to the destination and the
   rest of a large one read straight into it with recvmsg [destination, staging] (what follows the
   frame lands in the staging buffer). The destination is not written before the frame is accepted. */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <structmember.h>

#include <errno.h>
#include <limits.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/types.h>
#include <sys/uio.h>

#define HEADER_BYTES 36
#define SEQ_END 20                 /* header bytes 8..20: stream id u32, sequence u64 */

static const unsigned char PREFIX[8] = {'V', 'R', 'M', 'L', 1, 1, 0, 0};   /* magic, version 1, TENSORS, flags 0 */

/* set by setup(): numpy.ndarray, the Frame class (slots: frame_type, stream_id, seq, descs, tensors),
   FrameType.TENSORS, and Frame's slot offsets */
static PyTypeObject *ndarray_type = NULL;
static PyTypeObject *frame_type_cls = NULL;
static PyObject *tensors_type = NULL;
static Py_ssize_t frame_off[5];
static PyObject *s_sock, *s_fileno, *s_send_py, *s_recv_py, *s_sendmsg_rest, *s_c_rest, *s_c_error, *s_dtype, *s_shape, *s_reader,
    *s_last_seq;

typedef struct {
    PyObject_HEAD
    int fd;
    Py_ssize_t lo, hi;
    long long bytes_sent, bytes_received;
    PyObject *stage, *tx, *rx, *next_seq;
} Stream;

static void put_le(unsigned char *p, unsigned long long v, int n) {
    for (int i = 0; i < n; i++) p[i] = (unsigned char)(v >> (8 * i));
}

static unsigned long long get_le(const unsigned char *p, int n) {
    unsigned long long v = 0;
    for (int i = n - 1; i >= 0; i--) v = (v << 8) | p[i];
    return v;
}

static PyObject *call_py(PyObject *self, PyObject *name, PyObject *const *args, Py_ssize_t nargs) {
    PyObject *stack[8];
    stack[0] = self;
    for (Py_ssize_t i = 0; i < nargs; i++) stack[i + 1] = args[i];
    return PyObject_VectorcallMethod(name, stack, (size_t)(nargs + 1) | PY_VECTORCALL_ARGUMENTS_OFFSET, NULL);
}

static PyObject *call_py_kw(PyObject *self, PyObject *name, PyObject *const *args, Py_ssize_t nargs,
                            PyObject *kwnames) {
    PyObject *stack[8];
    Py_ssize_t nkw = kwnames ? PyTuple_GET_SIZE(kwnames) : 0;
    if (nargs + nkw > 7) {
        PyErr_SetString(PyExc_TypeError, "too many arguments");
        return NULL;
    }
    stack[0] = self;
    for (Py_ssize_t i = 0; i < nargs + nkw; i++) stack[i + 1] = args[i];
    return PyObject_VectorcallMethod(name, stack, (size_t)(nargs + 1) | PY_VECTORCALL_ARGUMENTS_OFFSET, kwnames);
}

/* self._c_error(what, errno): closes the connection and raises LinkError; returns NULL */
static PyObject *fail(Stream *self, const char *what, int err) {
    PyObject *w = PyUnicode_FromString(what), *e = PyLong_FromLong(err);
    PyObject *r = (w && e) ? call_py((PyObject *)self, s_c_error, (PyObject *[]){w, e}, 2) : NULL;
    Py_XDECREF(w);
    Py_XDECREF(e);
    Py_XDECREF(r);
    return NULL;
}

/* ------------------------------------------------------------------------------------------ send */
static PyObject *send_impl(Stream *self, PyObject *tx, int fd, PyObject *const *args, Py_ssize_t nargs,
                           PyObject *kwnames) {
    PyObject *tensors = nargs > 0 ? args[0] : NULL, *stream = nargs > 1 ? args[1] : NULL;
    if (kwnames != NULL && nargs == 1 && PyTuple_GET_SIZE(kwnames) == 1
        && PyUnicode_CompareWithASCIIString(PyTuple_GET_ITEM(kwnames, 0), "stream_id") == 0)
        stream = args[1];
    else if (kwnames != NULL)
        goto python;
    if (nargs < 1 || nargs > 2 || fd < 0 || tx == NULL
        || !(PyList_CheckExact(tensors) || PyTuple_CheckExact(tensors)) || Py_SIZE(tensors) != 1
        || !PyTuple_CheckExact(tx) || PyTuple_GET_SIZE(tx) != 4 || self->next_seq == NULL)
        goto python;
    PyObject *t = PyList_CheckExact(tensors) ? PyList_GET_ITEM(tensors, 0) : PyTuple_GET_ITEM(tensors, 0);
    if (Py_TYPE(t) != ndarray_type) goto python;
    PyObject *dtype = PyObject_GetAttr(t, s_dtype);
    if (dtype == NULL) return NULL;
    Py_DECREF(dtype);                       /* the array holds it: only its identity is compared */
    if (dtype != PyTuple_GET_ITEM(tx, 0)) goto python;
    PyObject *shape = PyObject_GetAttr(t, s_shape);
    if (shape == NULL) return NULL;
    int same = PyObject_RichCompareBool(shape, PyTuple_GET_ITEM(tx, 1), Py_EQ);
    Py_DECREF(shape);
    if (same < 0) return NULL;
    if (!same) goto python;
    PyObject *key = stream;
    PyObject *zero = NULL;
    if (key == NULL) key = zero = PyLong_FromLong(0);
    if (key == NULL) return NULL;
    PyObject *seq_obj = PyLong_CheckExact(key) ? PyDict_GetItemWithError(self->next_seq, key) : NULL;
    if (seq_obj == NULL) {
        Py_XDECREF(zero);
        if (PyErr_Occurred()) return NULL;
        goto python;                        /* a stream not used before: the writer checks and numbers it */
    }
    unsigned long stream_id = PyLong_AsUnsignedLong(key);
    unsigned long long seq = PyLong_AsUnsignedLongLong(seq_obj);
    if (PyErr_Occurred()) {
        Py_XDECREF(zero);
        return NULL;
    }
    Py_buffer head, payload;
    if (PyObject_GetBuffer(t, &payload, PyBUF_C_CONTIGUOUS) < 0) {
        Py_XDECREF(zero);
        if (!PyErr_ExceptionMatches(PyExc_BufferError) && !PyErr_ExceptionMatches(PyExc_ValueError)) return NULL;
        PyErr_Clear();
        goto python;                        /* not contiguous: the general path sends a contiguous copy */
    }
    if (PyObject_GetBuffer(PyTuple_GET_ITEM(tx, 2), &head, PyBUF_WRITABLE) < 0) {
        PyBuffer_Release(&payload);
        Py_XDECREF(zero);
        return NULL;
    }
    Py_ssize_t total = head.len + payload.len;
    if (head.len < HEADER_BYTES || PyLong_AsSsize_t(PyTuple_GET_ITEM(tx, 3)) != total) {
        PyBuffer_Release(&head);
        PyBuffer_Release(&payload);
        Py_XDECREF(zero);
        if (PyErr_Occurred()) return NULL;
        goto python;
    }
    PyObject *next = PyLong_FromUnsignedLongLong(seq + 1);
    if (next == NULL || PyDict_SetItem(self->next_seq, key, next) < 0) {
        Py_XDECREF(next);
        PyBuffer_Release(&head);
        PyBuffer_Release(&payload);
        Py_XDECREF(zero);
        return NULL;
    }
    Py_DECREF(next);
    Py_XDECREF(zero);
    unsigned char *h = (unsigned char *)head.buf;
    put_le(h + 8, stream_id, 4);
    put_le(h + 12, seq, 8);
    Py_ssize_t sent = 0;
    int err = 0;
    Py_BEGIN_ALLOW_THREADS
    while (sent < total) {
        struct iovec iov[2];
        int n_iov = 0;
        if (sent < head.len) {
            iov[n_iov].iov_base = h + sent;
            iov[n_iov++].iov_len = (size_t)(head.len - sent);
            if (payload.len) {
                iov[n_iov].iov_base = payload.buf;
                iov[n_iov++].iov_len = (size_t)payload.len;
            }
        } else {
            iov[n_iov].iov_base = (char *)payload.buf + (sent - head.len);
            iov[n_iov++].iov_len = (size_t)(total - sent);
        }
        struct msghdr msg;
        memset(&msg, 0, sizeof msg);
        msg.msg_iov = iov;
        msg.msg_iovlen = n_iov;
        ssize_t n = sendmsg(fd, &msg, MSG_NOSIGNAL);
        if (n < 0) {
            err = errno;
            break;
        }
        sent += n;
    }
    Py_END_ALLOW_THREADS
    PyBuffer_Release(&head);
    PyBuffer_Release(&payload);
    if (sent < total) {
        if (err != EAGAIN && err != EWOULDBLOCK && err != EINTR) return fail(self, "send", err);
        /* would block (a socket with a timeout) or a signal: the Python side finishes the frame */
        PyObject *list = PyList_New(2), *n_obj = PyLong_FromSsize_t(sent);
        if (list == NULL || n_obj == NULL) {
            Py_XDECREF(list);
            Py_XDECREF(n_obj);
            return NULL;
        }
        PyObject *head_obj = PyTuple_GET_ITEM(tx, 2);
        Py_INCREF(head_obj);
        Py_INCREF(t);
        PyList_SET_ITEM(list, 0, head_obj);
        PyList_SET_ITEM(list, 1, t);
        PyObject *r = call_py((PyObject *)self, s_sendmsg_rest, (PyObject *[]){list, n_obj}, 2);
        Py_DECREF(list);
        Py_DECREF(n_obj);
        if (r == NULL) return NULL;
        Py_DECREF(r);
    }
    self->bytes_sent += total;
    return PyLong_FromSsize_t(total);
python:
    return call_py_kw((PyObject *)self, s_send_py, args, nargs, kwnames);
}

/* ------------------------------------------------------------------------------------------ recv */
/* recv into stage[hi:cap] until hi - lo >= need (lo moved to 0 first when needed): 0, 1 (would block,
   a signal, end of stream: leave it to the Python path), or -errno. Without the GIL. */
static int fill(int fd, unsigned char *stage, Py_ssize_t cap, Py_ssize_t *lo, Py_ssize_t *hi, Py_ssize_t need) {
    if (*lo == *hi) {
        *lo = *hi = 0;
    } else if (cap - *lo < need) {
        memmove(stage, stage + *lo, (size_t)(*hi - *lo));
        *hi -= *lo;
        *lo = 0;
    }
    while (*hi - *lo < need) {
        ssize_t n = recv(fd, stage + *hi, (size_t)(cap - *hi), 0);
        if (n > 0) {
            *hi += n;
        } else if (n == 0 || errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR) {
            return 1;
        } else {
            return -errno;
        }
    }
    return 0;
}

static PyObject *make_frame(Stream *self, unsigned long long stream_id, unsigned long long seq, PyObject *descs,
                            PyObject *dest) {
    PyObject *f = frame_type_cls->tp_alloc(frame_type_cls, 0);
    if (f == NULL) return NULL;
    PyObject *vals[5] = {tensors_type, PyLong_FromUnsignedLongLong(stream_id), PyLong_FromUnsignedLongLong(seq),
                         PySequence_List(descs), PyList_New(1)};
    Py_INCREF(tensors_type);
    int ok = vals[1] && vals[2] && vals[3] && vals[4];
    if (vals[4]) {
        Py_INCREF(dest);
        PyList_SET_ITEM(vals[4], 0, dest);
    }
    for (int i = 0; i < 5; i++) *(PyObject **)((char *)f + frame_off[i]) = vals[i];   /* NULLs stay unset */
    if (!ok) {
        Py_DECREF(f);
        return NULL;
    }
    (void)self;
    return f;
}

static PyObject *recv_impl(Stream *self, PyObject *rx, PyObject *stage_obj, int fd, PyObject *const *args,
                           Py_ssize_t nargs, PyObject *kwnames) {
    PyObject *into = nargs > 0 ? args[0] : NULL;
    if (kwnames != NULL) {                  /* recv(into=[...]) */
        if (nargs == 0 && PyTuple_GET_SIZE(kwnames) == 1
            && PyUnicode_CompareWithASCIIString(PyTuple_GET_ITEM(kwnames, 0), "into") == 0)
            into = args[0];
        else
            goto python;
    } else if (nargs != 1) {
        goto python;
    }
    if (fd < 0 || into == NULL || !(PyList_CheckExact(into) || PyTuple_CheckExact(into)) || Py_SIZE(into) != 1
        || rx == NULL || !PyTuple_Check(rx) || PyTuple_GET_SIZE(rx) != 8 || stage_obj == NULL
        || !PyByteArray_CheckExact(stage_obj))
        goto python;
    PyObject *d = PyList_CheckExact(into) ? PyList_GET_ITEM(into, 0) : PyTuple_GET_ITEM(into, 0);
    PyObject *np_dtype = PyTuple_GET_ITEM(rx, 5), *tail = PyTuple_GET_ITEM(rx, 2);
    if (Py_TYPE(d) != ndarray_type || np_dtype == Py_None || !PyBytes_CheckExact(tail)) goto python;
    PyObject *dtype = PyObject_GetAttr(d, s_dtype);
    if (dtype == NULL) return NULL;
    Py_DECREF(dtype);
    if (dtype != np_dtype) goto python;
    PyObject *shape = PyObject_GetAttr(d, s_shape);
    if (shape == NULL) return NULL;
    int same = PyObject_RichCompareBool(shape, PyTuple_GET_ITEM(rx, 6), Py_EQ);
    Py_DECREF(shape);
    if (same < 0) return NULL;
    if (!same) goto python;
    Py_buffer db;
    if (PyObject_GetBuffer(d, &db, PyBUF_WRITABLE | PyBUF_C_CONTIGUOUS) < 0) {
        if (!PyErr_ExceptionMatches(PyExc_BufferError) && !PyErr_ExceptionMatches(PyExc_ValueError)) return NULL;
        PyErr_Clear();                      /* read-only or not contiguous: the Python path refuses it */
        goto python;
    }
    Py_ssize_t tail_len = PyBytes_GET_SIZE(tail), head_bytes = SEQ_END + tail_len, payload = db.len;
    const unsigned char *t = (const unsigned char *)PyBytes_AS_STRING(tail);
    unsigned char *stage = (unsigned char *)PyByteArray_AS_STRING(stage_obj), *dest = (unsigned char *)db.buf;
    Py_ssize_t cap = PyByteArray_GET_SIZE(stage_obj), lo = self->lo, hi = self->hi;
    if (tail_len < HEADER_BYTES - SEQ_END || head_bytes > cap || lo < 0 || lo > hi || hi > cap || payload == 0
        || get_le(t + 8, 8) != (unsigned long long)payload) {
        PyBuffer_Release(&db);
        goto python;
    }
    int r = 0, status = 0;
    Py_ssize_t got = 0, hpos = 0;
    {
        /* the fixed header first (a shorter frame, CLOSE, must not wait for more bytes), then the
           descriptors it announces; nothing is written to the destination before every check passed */
        if (hi - lo < HEADER_BYTES) {
            Py_BEGIN_ALLOW_THREADS
            r = fill(fd, stage, cap, &lo, &hi, HEADER_BYTES);
            Py_END_ALLOW_THREADS
        }
        if (!r && (memcmp(stage + lo, PREFIX, 8) || memcmp(stage + lo + SEQ_END, t, HEADER_BYTES - SEQ_END)))
            r = 1;
        if (!r && hi - lo < head_bytes) {
            Py_BEGIN_ALLOW_THREADS
            r = fill(fd, stage, cap, &lo, &hi, head_bytes);
            Py_END_ALLOW_THREADS
        }
        if (!r && memcmp(stage + lo + HEADER_BYTES, t + (HEADER_BYTES - SEQ_END), (size_t)(head_bytes - HEADER_BYTES)))
            r = 1;
        hpos = lo;
    }
    /* the stream must be known and the sequence above its last one (else the Python path refuses the frame,
       or counts a new stream against the limit) */
    unsigned long long stream_id = 0, seq = 0;
    PyObject *key = NULL, *last_seq = NULL;
    if (!r) {
        stream_id = get_le(stage + hpos + 8, 4);
        seq = get_le(stage + hpos + 12, 8);
        PyObject *reader = PyObject_GetAttr((PyObject *)self, s_reader);
        if (reader != NULL) {
            last_seq = PyObject_GetAttr(reader, s_last_seq);
            Py_DECREF(reader);
        }
        key = last_seq ? PyLong_FromUnsignedLongLong(stream_id) : NULL;
        PyObject *last = key && PyDict_CheckExact(last_seq) ? PyDict_GetItemWithError(last_seq, key) : NULL;
        if (PyErr_Occurred()) {
            Py_XDECREF(key);
            Py_XDECREF(last_seq);
            PyBuffer_Release(&db);
            return NULL;
        }
        unsigned long long last_v = last ? PyLong_AsUnsignedLongLong(last) : 0;
        if (last == NULL || (last_v == (unsigned long long)-1 && PyErr_Occurred()) || seq <= last_v) {
            PyErr_Clear();
            r = 1;
        }
    }
    if (r) {
        Py_XDECREF(key);
        Py_XDECREF(last_seq);
        self->lo = lo;
        self->hi = hi;
        PyBuffer_Release(&db);
        if (r < 0) return fail(self, "receive", -r);
        goto python;
    }
    {                                       /* the payload's staged part, once the frame is accepted */
        Py_ssize_t staged = hi - lo - head_bytes;
        got = staged < payload ? staged : payload;
        memcpy(dest, stage + lo + head_bytes, (size_t)got);
        lo += head_bytes + got;
        if (lo == hi) lo = hi = 0;
    }
    if (got < payload) {                    /* the rest: into dest, what follows into the (empty) stage */
        Py_BEGIN_ALLOW_THREADS
        while (got < payload) {
            Py_ssize_t want = payload - got;
            struct iovec iov[2] = {{dest + got, (size_t)want}, {stage, (size_t)cap}};
            struct msghdr msg;
            memset(&msg, 0, sizeof msg);
            msg.msg_iov = iov;
            msg.msg_iovlen = 2;
            ssize_t n = recvmsg(fd, &msg, 0);
            if (n > want) {
                got = payload;
                lo = 0;
                hi = n - want;
            } else if (n > 0) {
                got += n;
            } else if (n == 0) {
                status = 3;
                break;
            } else {
                status = (errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR) ? 2 : -errno;
                break;
            }
        }
        Py_END_ALLOW_THREADS
    }
    self->lo = lo;
    self->hi = hi;
    PyBuffer_Release(&db);
    if (status == 0) {
        PyObject *value = PyLong_FromUnsignedLongLong(seq);
        int bad = value == NULL || PyDict_SetItem(last_seq, key, value) < 0;
        Py_XDECREF(value);
        Py_DECREF(key);
        Py_DECREF(last_seq);
        if (bad) return NULL;
        self->bytes_received += head_bytes + payload;
        return make_frame(self, stream_id, seq, PyTuple_GET_ITEM(rx, 3), d);
    }
    Py_DECREF(key);
    Py_DECREF(last_seq);
    /* 2: the rest of the payload in Python (a socket with a timeout, a signal); 3: the peer closed;
       < 0: -errno of a failed read */
    PyObject *vals[6] = {PyLong_FromLong(status), rx, d, PyLong_FromUnsignedLongLong(stream_id),
                         PyLong_FromUnsignedLongLong(seq), PyLong_FromSsize_t(got)};
    PyObject *res = NULL;
    if (vals[0] && vals[3] && vals[4] && vals[5]) res = call_py((PyObject *)self, s_c_rest, vals, 6);
    Py_XDECREF(vals[0]);
    Py_XDECREF(vals[3]);
    Py_XDECREF(vals[4]);
    Py_XDECREF(vals[5]);
    return res;
python:
    return call_py_kw((PyObject *)self, s_recv_py, args, nargs, kwnames);
}

/* the socket's descriptor now (-1: closed, or the C path is off): a socket closed directly, not through
   close(), never leaves a stale number to this module */
static int current_fd(Stream *self) {
    if (self->fd < 0) return -1;
    PyObject *sock = PyObject_GetAttr((PyObject *)self, s_sock);
    if (sock == NULL) {
        PyErr_Clear();
        return -1;
    }
    PyObject *n = PyObject_CallMethodNoArgs(sock, s_fileno);
    Py_DECREF(sock);
    if (n == NULL) {
        PyErr_Clear();
        return -1;
    }
    long v = PyLong_AsLong(n);
    Py_DECREF(n);
    if (v == -1 && PyErr_Occurred()) PyErr_Clear();
    return v < 0 || v > INT_MAX ? -1 : (int)v;
}

/* the layouts and the staging buffer are held for the call: the GIL is released around each system call */
static PyObject *Stream_send(Stream *self, PyObject *const *args, Py_ssize_t nargs, PyObject *kwnames) {
    PyObject *tx = self->tx;
    Py_XINCREF(tx);
    PyObject *r = send_impl(self, tx, current_fd(self), args, nargs, kwnames);
    Py_XDECREF(tx);
    return r;
}

static PyObject *Stream_recv(Stream *self, PyObject *const *args, Py_ssize_t nargs, PyObject *kwnames) {
    PyObject *rx = self->rx, *stage = self->stage;
    Py_XINCREF(rx);
    Py_XINCREF(stage);
    PyObject *r = recv_impl(self, rx, stage, current_fd(self), args, nargs, kwnames);
    Py_XDECREF(rx);
    Py_XDECREF(stage);
    return r;
}

static PyMethodDef Stream_methods[] = {
    {"send", (PyCFunction)(void (*)(void))Stream_send, METH_FASTCALL | METH_KEYWORDS,
     "send(tensors, stream_id=0) -> frame bytes (the steady state here, else _send_py)"},
    {"recv", (PyCFunction)(void (*)(void))Stream_recv, METH_FASTCALL | METH_KEYWORDS,
     "recv(into=None, factory=None) -> Frame (the steady state here, else _recv_py)"},
    {NULL, NULL, 0, NULL},
};

static PyMemberDef Stream_members[] = {
    {"_fd", T_INT, offsetof(Stream, fd), 0, "socket descriptor of the C path, -1: off"},
    {"_lo", T_PYSSIZET, offsetof(Stream, lo), 0, "staged bytes start"},
    {"_hi", T_PYSSIZET, offsetof(Stream, hi), 0, "staged bytes end"},
    {"bytes_sent", T_LONGLONG, offsetof(Stream, bytes_sent), 0, "frame bytes sent"},
    {"bytes_received", T_LONGLONG, offsetof(Stream, bytes_received), 0, "frame bytes received"},
    {"_stage", T_OBJECT, offsetof(Stream, stage), 0, "staging bytearray"},
    {"_tx", T_OBJECT, offsetof(Stream, tx), 0, "last single-array send layout"},
    {"_rx", T_OBJECT, offsetof(Stream, rx), 0, "last validated receive layout"},
    {"_next_seq", T_OBJECT, offsetof(Stream, next_seq), 0, "the writer's next sequence numbers"},
    {NULL, 0, 0, 0, NULL},
};

static PyObject *Stream_new(PyTypeObject *type, PyObject *args, PyObject *kwds) {
    (void)args;
    (void)kwds;
    Stream *self = (Stream *)type->tp_alloc(type, 0);
    if (self != NULL) self->fd = -1;
    return (PyObject *)self;
}

static int Stream_traverse(Stream *self, visitproc visit, void *arg) {
    Py_VISIT(self->stage);
    Py_VISIT(self->tx);
    Py_VISIT(self->rx);
    Py_VISIT(self->next_seq);
    Py_VISIT(Py_TYPE(self));
    return 0;
}

static int Stream_clear(Stream *self) {
    Py_CLEAR(self->stage);
    Py_CLEAR(self->tx);
    Py_CLEAR(self->rx);
    Py_CLEAR(self->next_seq);
    return 0;
}

static void Stream_dealloc(Stream *self) {
    PyObject_GC_UnTrack(self);
    Stream_clear(self);
    PyTypeObject *tp = Py_TYPE(self);
    tp->tp_free((PyObject *)self);
    Py_DECREF(tp);
}

static PyType_Slot Stream_slots[] = {
    {Py_tp_new, Stream_new},
    {Py_tp_dealloc, Stream_dealloc},
    {Py_tp_traverse, Stream_traverse},
    {Py_tp_clear, Stream_clear},
    {Py_tp_methods, Stream_methods},
    {Py_tp_members, Stream_members},
    {Py_tp_doc, "The compiled steady state of a StreamConnection (vramancer/link/_fastlink.c)."},
    {0, NULL},
};

static PyType_Spec Stream_spec = {"vramancer.link._fastlink.Stream", sizeof(Stream), 0,
                                  Py_TPFLAGS_DEFAULT | Py_TPFLAGS_BASETYPE | Py_TPFLAGS_HAVE_GC, Stream_slots};

/* setup(ndarray, Frame, FrameType.TENSORS): the types the steady state checks and makes */
static PyObject *fl_setup(PyObject *mod, PyObject *const *args, Py_ssize_t nargs) {
    (void)mod;
    static const char *names[5] = {"frame_type", "stream_id", "seq", "descs", "tensors"};
    if (nargs != 3 || !PyType_Check(args[0]) || !PyType_Check(args[1])) {
        PyErr_SetString(PyExc_TypeError, "setup(ndarray, Frame, TENSORS)");
        return NULL;
    }
    PyTypeObject *frame = (PyTypeObject *)args[1];
    for (int i = 0; i < 5; i++) {
        PyObject *descr = PyObject_GetAttrString(args[1], names[i]);
        if (descr == NULL) return NULL;
        int ok = Py_IS_TYPE(descr, &PyMemberDescr_Type) && ((PyMemberDescrObject *)descr)->d_member->type == T_OBJECT_EX;
        if (ok) frame_off[i] = ((PyMemberDescrObject *)descr)->d_member->offset;
        Py_DECREF(descr);
        if (!ok) {
            PyErr_Format(PyExc_TypeError, "Frame.%s is not a slot", names[i]);
            return NULL;
        }
    }
    Py_INCREF(args[0]);
    Py_INCREF(args[1]);
    Py_INCREF(args[2]);
    Py_XSETREF(ndarray_type, (PyTypeObject *)args[0]);
    Py_XSETREF(frame_type_cls, frame);
    Py_XSETREF(tensors_type, args[2]);
    Py_RETURN_NONE;
}

static PyMethodDef module_methods[] = {
    {"setup", (PyCFunction)(void (*)(void))fl_setup, METH_FASTCALL, "setup(ndarray, Frame, FrameType.TENSORS)"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_fastlink", "The Link's steady-state send and receive in C (see _fastlink.c).", -1,
    module_methods, NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__fastlink(void) {
    struct { PyObject **slot; const char *s; } strs[] = {
        {&s_sock, "sock"}, {&s_fileno, "fileno"}, {&s_send_py, "_send_py"}, {&s_recv_py, "_recv_py"}, {&s_sendmsg_rest, "_sendmsg_rest"},
        {&s_c_rest, "_c_rest"}, {&s_c_error, "_c_error"}, {&s_dtype, "dtype"}, {&s_shape, "shape"},
        {&s_reader, "reader"}, {&s_last_seq, "last_seq"},
    };
    for (size_t i = 0; i < sizeof strs / sizeof strs[0]; i++) {
        *strs[i].slot = PyUnicode_InternFromString(strs[i].s);
        if (*strs[i].slot == NULL) return NULL;
    }
    PyObject *m = PyModule_Create(&module);
    if (m == NULL) return NULL;
    PyObject *type = PyType_FromSpec(&Stream_spec);
    if (type == NULL || PyModule_AddObject(m, "Stream", type) < 0) {
        Py_XDECREF(type);
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
