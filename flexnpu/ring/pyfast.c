/* CPython fast path for the ring's hot operations.
 *
 * Why: a cffi API-mode call costs ~150-200 ns here (generic argument conversion plus a GIL
 * release around every call), which alone would blow the 1 us round-trip budget. These
 * METH_FASTCALL methods cost ~30-50 ns. Non-blocking operations (push/pop) keep the GIL
 * (they take well under a microsecond and never block); waits and call() release it.
 *
 * The functions are compiled into the same cffi extension as ring.c and installed into a
 * Python namespace by fx_py_install() (called once from segment.py). A FastRing holds the
 * fx_ring pointer; Segment.close() detaches it (pointer -> NULL) so a stale Ring raises
 * instead of touching unmapped memory.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <time.h>
#include "ring.h"

typedef struct {
    PyObject_HEAD
    fx_ring *r;
    uint32_t esz;
    PyObject *err;   /* callable(rc, what) that raises the right exception */
    char *scratch;
} FastRing;

static PyObject *raise_rc(FastRing *f, int rc, const char *what) {
    PyObject *res = PyObject_CallFunction(f->err, "is", rc, what);
    if (res) {   /* the handler must raise; be safe if it did not */
        Py_DECREF(res);
        PyErr_Format(PyExc_RuntimeError, "ring %s: status %d", what, rc);
    }
    return NULL;
}

#define FX_CLOSEDRC 100   /* passed to err(): the segment was closed in this process */
#define FX_ROLERC 101     /* passed to err(): wrong role (e.g. pop on the producer side) */

static int fr_init(FastRing *self, PyObject *args, PyObject *kw) {
    unsigned long long addr;
    PyObject *err;
    if (!PyArg_ParseTuple(args, "KO", &addr, &err)) return -1;
    self->r = (fx_ring *)(uintptr_t)addr;
    self->esz = fx_ring_entry_size(self->r);
    Py_XSETREF(self->err, Py_NewRef(err));
    PyMem_Free(self->scratch);
    self->scratch = PyMem_Malloc(self->esz);
    if (!self->scratch) { PyErr_NoMemory(); return -1; }
    return 0;
}

static void fr_dealloc(FastRing *self) {
    Py_XDECREF(self->err);
    PyMem_Free(self->scratch);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyObject *fr_detach(FastRing *self, PyObject *unused) {
    self->r = NULL;
    Py_RETURN_NONE;
}

static PyObject *fr_push(FastRing *self, PyObject *const *args, Py_ssize_t n) {
    if (n != 1) { PyErr_SetString(PyExc_TypeError, "push(rec)"); return NULL; }
    if (!self->r) return raise_rc(self, FX_CLOSEDRC, "push");
    const char *p;
    Py_ssize_t len;
    Py_buffer view;
    int have_view = 0;
    if (PyBytes_CheckExact(args[0])) {
        p = PyBytes_AS_STRING(args[0]);
        len = PyBytes_GET_SIZE(args[0]);
    } else {
        if (PyObject_GetBuffer(args[0], &view, PyBUF_SIMPLE) < 0) return NULL;
        have_view = 1; p = view.buf; len = view.len;
    }
    if (len > self->esz) {
        if (have_view) PyBuffer_Release(&view);
        return PyErr_Format(PyExc_ValueError, "record of %zd bytes exceeds entry size %u", len,
                            self->esz);
    }
    int rc = fx_push(self->r, p, (uint32_t)len);
    if (have_view) PyBuffer_Release(&view);
    if (rc == 1) Py_RETURN_TRUE;
    if (rc == 0) Py_RETURN_FALSE;
    return raise_rc(self, rc, "push");
}

static PyObject *fr_pop(FastRing *self, PyObject *unused) {
    if (!self->r) return raise_rc(self, FX_CLOSEDRC, "pop");
    int rc = fx_pop(self->r, self->scratch);
    if (rc == 1) return PyBytes_FromStringAndSize(self->scratch, self->esz);
    if (rc == 0) Py_RETURN_NONE;
    return raise_rc(self, rc, "pop");
}

static double mono(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec * 1e-9;
}

static int parse_timeout(PyObject *o, double *t) {
    if (o == Py_None) { *t = -1.0; return 0; }
    *t = PyFloat_AsDouble(o);
    if (*t == -1.0 && PyErr_Occurred()) return -1;
    if (*t < 0) *t = 0;
    return 0;
}

/* wait(timeout) -> bool; GIL released while waiting; signals handled between slices */
static PyObject *fr_wait(FastRing *self, PyObject *const *args, Py_ssize_t n) {
    if (n != 1) { PyErr_SetString(PyExc_TypeError, "wait(timeout)"); return NULL; }
    if (!self->r) return raise_rc(self, FX_CLOSEDRC, "wait");
    if (fx_ring_is_producer(self->r)) return raise_rc(self, FX_ROLERC, "wait");
    double timeout, end;
    if (parse_timeout(args[0], &timeout) < 0) return NULL;
    end = timeout < 0 ? 0 : mono() + timeout;
    for (;;) {
        double left = timeout < 0 ? -1.0 : end - mono();
        if (timeout >= 0 && left < 0) left = 0;
        int rc;
        Py_BEGIN_ALLOW_THREADS
        rc = fx_wait(self->r, left);
        Py_END_ALLOW_THREADS
        if (rc == FX_READY) Py_RETURN_TRUE;
        if (rc == FX_TIMEOUT) Py_RETURN_FALSE;
        if (rc != FX_EINTR) return raise_rc(self, rc, "wait");
        if (PyErr_CheckSignals() < 0) return NULL;
    }
}

static PyTypeObject FastRingType;

/* call(sq, cq, rec, timeout) -> bytes */
static PyObject *py_call(PyObject *mod, PyObject *const *args, Py_ssize_t n) {
    if (n != 4 || !PyObject_TypeCheck(args[0], &FastRingType) ||
        !PyObject_TypeCheck(args[1], &FastRingType)) {
        PyErr_SetString(PyExc_TypeError, "call(sq, cq, rec, timeout)");
        return NULL;
    }
    FastRing *sq = (FastRing *)args[0], *cq = (FastRing *)args[1];
    if (!sq->r) return raise_rc(sq, FX_CLOSEDRC, "call");
    if (!cq->r) return raise_rc(cq, FX_CLOSEDRC, "call");
    if (!fx_ring_is_producer(sq->r)) return raise_rc(sq, FX_ROLERC, "call");
    if (fx_ring_is_producer(cq->r)) return raise_rc(cq, FX_ROLERC, "call");
    Py_buffer view;
    if (PyObject_GetBuffer(args[2], &view, PyBUF_SIMPLE) < 0) return NULL;
    if (view.len > sq->esz) {
        PyBuffer_Release(&view);
        return PyErr_Format(PyExc_ValueError, "record of %zd bytes exceeds entry size %u",
                            view.len, sq->esz);
    }
    double timeout;
    if (parse_timeout(args[3], &timeout) < 0) { PyBuffer_Release(&view); return NULL; }
    int rc;
    Py_BEGIN_ALLOW_THREADS
    rc = fx_call(sq->r, cq->r, view.buf, (uint32_t)view.len, cq->scratch, timeout);
    Py_END_ALLOW_THREADS
    PyBuffer_Release(&view);
    if (rc == FX_READY) return PyBytes_FromStringAndSize(cq->scratch, cq->esz);
    if (rc == FX_TIMEOUT) return PyErr_Format(PyExc_TimeoutError, "no completion within %g s", timeout);
    if (rc == FX_EINTR) {
        /* the request is in flight: keep waiting for its completion, letting signals run */
        if (PyErr_CheckSignals() < 0) return NULL;
        double end = timeout < 0 ? 0 : mono() + timeout;
        for (;;) {
            int p = fx_pop(cq->r, cq->scratch);
            if (p == 1) return PyBytes_FromStringAndSize(cq->scratch, cq->esz);
            if (p < 0) return raise_rc(cq, p, "call");
            double left = timeout < 0 ? -1.0 : end - mono();
            if (timeout >= 0 && left <= 0)
                return PyErr_Format(PyExc_TimeoutError, "no completion within %g s", timeout);
            Py_BEGIN_ALLOW_THREADS
            rc = fx_wait(cq->r, left);
            Py_END_ALLOW_THREADS
            if (rc == FX_EINTR) { if (PyErr_CheckSignals() < 0) return NULL; continue; }
            if (rc != FX_READY && rc != FX_TIMEOUT) return raise_rc(cq, rc, "call");
        }
    }
    return raise_rc(rc == FX_ECORRUPT ? sq : cq, rc, "call");
}

static PyMethodDef fr_methods[] = {
    {"push", (PyCFunction)(void (*)(void))fr_push, METH_FASTCALL, "push(rec) -> bool"},
    {"pop", (PyCFunction)fr_pop, METH_NOARGS, "pop() -> bytes | None"},
    {"wait", (PyCFunction)(void (*)(void))fr_wait, METH_FASTCALL, "wait(timeout) -> bool"},
    {"detach", (PyCFunction)fr_detach, METH_NOARGS, "forget the ring pointer (segment closed)"},
    {NULL},
};

static PyTypeObject FastRingType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "flexnpu.ring._fast.FastRing",
    .tp_basicsize = sizeof(FastRing),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)fr_init,
    .tp_dealloc = (destructor)fr_dealloc,
    .tp_methods = fr_methods,
    .tp_doc = "FastRing(ring_address, error_handler): METH_FASTCALL push/pop/wait",
};

static PyMethodDef call_def = {"call", (PyCFunction)(void (*)(void))py_call, METH_FASTCALL,
                               "call(sq, cq, rec, timeout) -> bytes"};

/* Called through cffi (which released the GIL) with id(namespace_dict). */
int fx_py_install(uintptr_t dict_addr) {
    PyGILState_STATE g = PyGILState_Ensure();
    int rc = -1;
    PyObject *d = (PyObject *)dict_addr;
    PyObject *f = NULL;
    if (!PyDict_Check(d)) goto out;
    if (PyType_Ready(&FastRingType) < 0) goto out;
    if (PyDict_SetItemString(d, "FastRing", (PyObject *)&FastRingType) < 0) goto out;
    f = PyCFunction_New(&call_def, NULL);
    if (!f || PyDict_SetItemString(d, "call", f) < 0) goto out;
    rc = 0;
out:
    Py_XDECREF(f);
    if (rc) PyErr_Clear();
    PyGILState_Release(g);
    return rc;
}
