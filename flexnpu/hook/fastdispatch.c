/* The npu device's dispatch hot path in C: tensor.dispatch() for a call whose spec is cached.
 *
 * Why: every aten operator on an npu tensor reaches NPUTensor.__torch_dispatch__; in eager
 * decoding that is ~150 calls per token, and the Python walk over the arguments, the cache key,
 * the wrappers of fresh outputs and the launch payload cost several times the operator itself
 * (issue 13's profile). This file does exactly what tensor.dispatch() does for the common call
 * (npu tensors, numbers, None, dtypes, strings and lists of them; a spec already in the cache)
 * and hands every other call to the Python dispatch() unchanged, before it has done anything:
 * it never decides an error and never inserts into a cache, so the Python path stays the one
 * definition of the behaviour, and the cache key built here must be the Python one
 * (tests/test_fastdispatch.py checks both on a corpus of calls).
 *
 * Installed into a Python dict by fxd_install() (the ring's pattern, flexnpu/ring/pyfast.c),
 * configured once by tensor.py with the objects it works on.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

#include <structmember.h>

#define MAXK 128 /* cache-key items; a call with more takes the Python path */

/* set by configure() */
static PyObject *g_infos, *g_cache, *g_enc_cache, *g_stats, *g_npu_type, *g_alloc_type,
    *g_ref_type, *g_make_raw, *g_ws, *g_tdevs, *g_tdev, *g_fallback, *g_make_rk, *g_launch_py,
    *g_build_py, *g_plain_types, *g_raw_kwnames, *g_ref_members[5], *g_device_type, *g_get_device,
    *g_npu_name;
static int g_ready = 0;

static PyObject *s_a, *s_rk, *s_dev, *s_special, *s_cpu, *s_value_free, *s_allowed, *s_flush_due,
    *s_flush_frees, *s_client, *s_stream, *s_index, *s_alloc_handle, *s_launch_payload, *s_hits,
    *s_device, *s_handle, *s_new, *s_self, *s_view, *s_empty, *s_one, *s_type;

enum { OK = 0, PYTHON = 1, ERR = -1 }; /* PYTHON: let tensor.dispatch() handle this call */

typedef struct {
    PyObject *dev; /* strong */
    PyObject *key[MAXK];
    int nk;
    PyObject *flat; /* list of the npu tensors, in walk order */
} Walk;

static int kpush(Walk *w, PyObject *o) { /* steals o */
    if (!o) return ERR;
    if (w->nk >= MAXK) {
        Py_DECREF(o);
        return PYTHON;
    }
    w->key[w->nk++] = o;
    return OK;
}

static void walk_clear(Walk *w) {
    for (int i = 0; i < w->nk; i++) Py_DECREF(w->key[i]);
    w->nk = 0;
    Py_CLEAR(w->dev);
    Py_CLEAR(w->flat);
}

/* An exact NPUTensor: device check, its (TensorRef, key part), in walk order. */
static int w_tensor(Walk *w, PyObject *a, PyObject **wire) {
    PyObject *al = PyObject_GetAttr(a, s_a);
    if (!al) goto attr;
    PyObject *d = PyObject_GetAttr(al, s_dev);
    Py_DECREF(al);
    if (!d) goto attr;
    if (!w->dev) {
        w->dev = d;
    } else {
        int same = d == w->dev;
        Py_DECREF(d);
        if (!same) return PYTHON; /* mixed devices: Python raises torch's error */
    }
    PyObject *rk = PyObject_GetAttr(a, s_rk);
    if (!rk) goto attr;
    if (rk == Py_None) {
        Py_DECREF(rk);
        rk = PyObject_CallOneArg(g_make_rk, a);
        if (!rk) return ERR;
    }
    if (!PyTuple_CheckExact(rk) || PyTuple_GET_SIZE(rk) != 2) {
        Py_DECREF(rk);
        return PYTHON;
    }
    if (PyList_Append(w->flat, a) < 0) {
        Py_DECREF(rk);
        return ERR;
    }
    int rc = kpush(w, Py_NewRef(PyTuple_GET_ITEM(rk, 1)));
    if (rc == OK) *wire = Py_NewRef(PyTuple_GET_ITEM(rk, 0));
    Py_DECREF(rk);
    return rc;
attr:
    if (PyErr_ExceptionMatches(PyExc_AttributeError)) {
        PyErr_Clear();
        return PYTHON;
    }
    return ERR;
}

/* a torch.device of type npu: 1; another type: 0 */
static int is_npu_device(PyObject *d) {
    PyObject *t = PyObject_GetAttr(d, s_type);
    if (!t) return -1;
    int r = PyUnicode_Compare(t, g_npu_name) == 0;
    Py_DECREF(t);
    return PyErr_Occurred() ? -1 : r;
}

static int is_number(PyObject *a) {
    return PyLong_CheckExact(a) || PyFloat_CheckExact(a) || PyBool_Check(a);
}

/* a number as the key holds it: `a if (a or type(a) is not float) else str(a)` (-0.0 vs 0.0) */
static PyObject *number_key(PyObject *a) {
    if (PyFloat_CheckExact(a) && PyFloat_AS_DOUBLE(a) == 0.0) return PyObject_Str(a);
    return Py_NewRef(a);
}

/* _Walk.value(): the nested arguments. */
static int w_value(Walk *w, PyObject *a, PyObject **wire, int depth) {
    PyTypeObject *tp = Py_TYPE(a);
    if ((PyObject *)tp == g_npu_type) return w_tensor(w, a, wire);
    if (is_number(a)) {
        PyObject *k = number_key(a);
        if (!k) return ERR;
        int rc = kpush(w, PyTuple_Pack(2, (PyObject *)tp, k));
        Py_DECREF(k);
        if (rc == OK) *wire = Py_NewRef(a);
        return rc;
    }
    if (a == Py_None) {
        int rc = kpush(w, Py_NewRef(Py_None));
        if (rc == OK) *wire = Py_NewRef(Py_None);
        return rc;
    }
    if (PyList_CheckExact(a) || PyTuple_CheckExact(a)) {
        if (depth > 4) return PYTHON;
        int rc = kpush(w, Py_NewRef((PyObject *)tp));
        if (rc != OK) return rc;
        Py_ssize_t n = PySequence_Fast_GET_SIZE(a);
        PyObject *out = PyList_New(n);
        if (!out) return ERR;
        for (Py_ssize_t i = 0; i < n; i++) {
            PyObject *v = NULL;
            rc = w_value(w, PySequence_Fast_GET_ITEM(a, i), &v, depth + 1);
            if (rc != OK) {
                Py_DECREF(out);
                return rc;
            }
            PyList_SET_ITEM(out, i, v);
        }
        rc = kpush(w, PyLong_FromSsize_t(n));
        if (rc != OK) {
            Py_DECREF(out);
            return rc;
        }
        if (PyTuple_CheckExact(a)) {
            *wire = PyList_AsTuple(out);
            Py_DECREF(out);
            return *wire ? OK : ERR;
        }
        *wire = out;
        return OK;
    }
    if ((PyObject *)tp == g_device_type) { /* factories: device=npu:N names the device */
        int npu = is_npu_device(a);
        if (npu <= 0) return npu < 0 ? ERR : PYTHON; /* a host device: Python's host fallback */
        if (!w->dev) {
            PyObject *index = PyObject_GetAttr(a, s_index);
            if (!index) return ERR;
            w->dev = PyObject_CallOneArg(g_get_device, index); /* runtime.get(index) */
            Py_DECREF(index);
            if (!w->dev) return ERR;
        }
        int rc = kpush(w, Py_NewRef(a));
        if (rc == OK) *wire = Py_NewRef(a);
        return rc;
    }
    /* dtype, layout, memory_format, str: (type, value); anything else (host tensors, symbolic
     * sizes, complex, subclasses) takes the Python path */
    int plain = PySequence_Contains(g_plain_types, (PyObject *)tp);
    if (plain < 0) return ERR;
    if (!plain) return PYTHON;
    int rc = kpush(w, PyTuple_Pack(2, (PyObject *)tp, a));
    if (rc == OK) *wire = Py_NewRef(a);
    return rc;
}

/* ---- Alloc: a daemon allocation held by npu tensors (tensor.PyAlloc's behaviour, in C) ----
 * Every fresh output makes one and every last tensor to die frees one: ~100 of each a decode
 * step, where the Python class's __init__ and __del__ cost ~1 and ~2 us. These do exactly what
 * that class does, reading and writing the Device's Python attributes the same way; the free
 * runs as a PEP 442 finalizer, so an allocation in a reference cycle (a captured graph's
 * tensors) is still given back before the cycle is cleared. tests/test_fastdispatch.py runs
 * the same accounting through both. */
typedef struct {
    PyObject_HEAD
    PyObject *dev, *handle, *nbytes, *graph, *saved;
} AllocObj;

static PyObject *g_runtime; /* flexnpu.hook.runtime: FREE_BATCH and FREE_BYTES, read per free */
static PyObject *s_allocated, *s_peak, *s_capture, *s_pending, *s_pending_bytes, *s_graph,
    *s_held, *s_free_batch, *s_free_bytes;

static int add_attr(PyObject *o, PyObject *name, PyObject *delta, int sub) {
    PyObject *v = PyObject_GetAttr(o, name);
    if (!v) return -1;
    PyObject *nv = sub ? PyNumber_Subtract(v, delta) : PyNumber_Add(v, delta);
    Py_DECREF(v);
    if (!nv) return -1;
    int rc = PyObject_SetAttr(o, name, nv);
    Py_DECREF(nv);
    return rc;
}

static int al_init(AllocObj *self, PyObject *args, PyObject *kw) {
    PyObject *dev, *handle, *nbytes;
    if (kw && PyDict_GET_SIZE(kw)) {
        PyErr_SetString(PyExc_TypeError, "Alloc(dev, handle, nbytes)");
        return -1;
    }
    if (!PyArg_ParseTuple(args, "OOO", &dev, &handle, &nbytes)) return -1;
    PyObject *graph = PyObject_GetAttr(dev, s_capture); /* allocations made during capture live as long as the graph */
    if (!graph) return -1;
    Py_XSETREF(self->dev, Py_NewRef(dev));
    Py_XSETREF(self->handle, Py_NewRef(handle));
    Py_XSETREF(self->nbytes, Py_NewRef(nbytes));
    Py_XSETREF(self->saved, Py_NewRef(Py_None));
    Py_XSETREF(self->graph, graph);
    if (add_attr(dev, s_allocated, nbytes, 0) < 0) return -1;
    PyObject *a = PyObject_GetAttr(dev, s_allocated), *p = a ? PyObject_GetAttr(dev, s_peak) : NULL;
    int more = p ? PyObject_RichCompareBool(a, p, Py_GT) : -1;
    int rc = more > 0 ? PyObject_SetAttr(dev, s_peak, a) : more;
    Py_XDECREF(a);
    Py_XDECREF(p);
    return rc < 0 ? -1 : 0;
}

/* PyAlloc.__del__: the handle to the graph that holds it, or to the device's deferred frees */
static void al_free_handle(AllocObj *self) {
    PyObject *d = self->dev, *g = NULL, *cap = NULL, *lst = NULL;
    if (!d || !self->handle || !self->nbytes) return;
    if (add_attr(d, s_allocated, self->nbytes, 1) < 0) goto out;
    g = Py_NewRef(self->graph ? self->graph : Py_None);
    if (!(cap = PyObject_GetAttr(d, s_capture))) goto out;
    if (g != Py_None) {
        PyObject *inner = PyObject_GetAttr(g, s_graph);
        if (!inner) goto out;
        int reset = inner == Py_None && cap != g; /* a graph that was reset no longer holds its memory */
        Py_DECREF(inner);
        if (reset) Py_SETREF(g, Py_NewRef(cap));
    } else {
        Py_SETREF(g, Py_NewRef(cap));
    }
    if (g != Py_None) {
        if (!(lst = PyObject_GetAttr(g, s_held))) goto out;
        if (PyList_Check(lst)) PyList_Append(lst, self->handle); /* the graph replays commands that use it */
        goto out;
    }
    if (!(lst = PyObject_GetAttr(d, s_pending)) || !PyList_Check(lst)) goto out;
    if (PyList_Append(lst, self->handle) < 0) goto out; /* never call the client from a destructor */
    if (add_attr(d, s_pending_bytes, self->nbytes, 0) < 0) goto out;
    if (!g_runtime) goto out;
    PyObject *fb = PyObject_GetAttr(g_runtime, s_free_batch), *fy = fb ? PyObject_GetAttr(g_runtime, s_free_bytes) : NULL;
    PyObject *pb = fy ? PyObject_GetAttr(d, s_pending_bytes) : NULL;
    if (pb) {
        PyObject *n = PyLong_FromSsize_t(PyList_GET_SIZE(lst));
        int due = n ? PyObject_RichCompareBool(n, fb, Py_GE) : -1;
        if (due == 0) due = PyObject_RichCompareBool(pb, fy, Py_GE);
        Py_XDECREF(n);
        if (due > 0) PyObject_SetAttrString(d, "flush_due", Py_True);
    }
    Py_XDECREF(fb);
    Py_XDECREF(fy);
    Py_XDECREF(pb);
out:
    Py_XDECREF(g);
    Py_XDECREF(cap);
    Py_XDECREF(lst);
}

static void al_finalize(PyObject *o) {
    PyObject *t, *v, *tb;
    PyErr_Fetch(&t, &v, &tb);
    al_free_handle((AllocObj *)o);
    PyErr_Clear(); /* as __del__'s `except Exception: pass` (interpreter shutdown) */
    PyErr_Restore(t, v, tb);
}

static int al_traverse(AllocObj *self, visitproc visit, void *arg) {
    Py_VISIT(self->dev);
    Py_VISIT(self->graph);
    Py_VISIT(self->saved);
    return 0;
}

static int al_clear(AllocObj *self) {
    Py_CLEAR(self->dev);
    Py_CLEAR(self->graph);
    Py_CLEAR(self->saved);
    return 0;
}

static void al_dealloc(AllocObj *self) {
    if (PyObject_CallFinalizerFromDealloc((PyObject *)self) < 0) return; /* resurrected */
    PyObject_GC_UnTrack(self);
    al_clear(self);
    Py_CLEAR(self->handle);
    Py_CLEAR(self->nbytes);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyMemberDef al_members[] = {
    {"dev", T_OBJECT_EX, offsetof(AllocObj, dev), 0, "the runtime.Device"},
    {"handle", T_OBJECT_EX, offsetof(AllocObj, handle), 0, "the daemon handle"},
    {"nbytes", T_OBJECT_EX, offsetof(AllocObj, nbytes), 0, "its size in bytes"},
    {"graph", T_OBJECT_EX, offsetof(AllocObj, graph), 0, "the graph being captured when it was made"},
    {"saved", T_OBJECT_EX, offsetof(AllocObj, saved), 0, "weakref to a torch.save's host copy"},
    {NULL},
};

static PyTypeObject AllocType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "flexnpu.hook._dispatch_core.Alloc",
    .tp_basicsize = sizeof(AllocObj),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC,
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)al_init,
    .tp_dealloc = (destructor)al_dealloc,
    .tp_finalize = al_finalize,
    .tp_traverse = (traverseproc)al_traverse,
    .tp_clear = (inquiry)al_clear,
    .tp_members = al_members,
    .tp_doc = "A daemon allocation; freed (deferred to the next command) when the last tensor dies.",
};

static int attr_true(PyObject *o, PyObject *name) {
    PyObject *v = PyObject_GetAttr(o, name);
    if (!v) return -1;
    int r = PyObject_IsTrue(v);
    Py_DECREF(v);
    return r;
}

/* TensorRef(h, dt, sh, st, of) without the frozen dataclass's __init__ (its five
 * object.__setattr__ calls): the slots are set through their member descriptors. */
static PyObject *make_ref(PyObject *h, PyObject *dt, PyObject *sh, PyObject *st, PyObject *of) {
    PyTypeObject *tp = (PyTypeObject *)g_ref_type;
    PyObject *r = tp->tp_alloc(tp, 0);
    if (!r) return NULL;
    PyObject *vals[5] = {h, dt, sh, st, of};
    for (int i = 0; i < 5; i++) {
        PyObject *d = g_ref_members[i];
        if (Py_TYPE(d)->tp_descr_set(d, r, vals[i]) < 0) {
            Py_DECREF(r);
            return NULL;
        }
    }
    return r;
}

/* _make_raw(NPUTensor, sh, strides=st, storage_offset=of, dtype=dt, device=dev, storage_size=...) */
static PyObject *make_wrapper(PyObject *sh, PyObject *st, PyObject *of, PyObject *dt, PyObject *dev) {
    PyObject *args[7] = {g_npu_type, sh, st, of, dt, dev, g_ws};
    return PyObject_Vectorcall(g_make_raw, args, 2, g_raw_kwnames);
}

static int set2(PyObject *t, PyObject *alloc, PyObject *rk) { /* t._a = alloc; t._rk = rk */
    if (PyObject_SetAttr(t, s_a, alloc) < 0) return -1;
    return PyObject_SetAttr(t, s_rk, rk);
}

/* _build() for the forms of the hot path; the rest goes to the Python one */
static PyObject *build(PyObject *tmpl, PyObject *made, PyObject *flat, PyObject *tdev) {
    if (PyLong_CheckExact(tmpl)) return Py_NewRef(PyList_GET_ITEM(made, 0)); /* 0: one fresh tensor */
    if (PyTuple_CheckExact(tmpl) && PyTuple_GET_SIZE(tmpl) >= 2) {
        PyObject *kind = PyTuple_GET_ITEM(tmpl, 0);
        PyObject *p = PyTuple_GET_ITEM(tmpl, 1);
        if (kind == s_new || kind == s_self) { /* interned by tensor.py's literals and ours */
            PyObject *seq = kind == s_new ? made : flat;
            Py_ssize_t i = PyLong_AsSsize_t(p);
            if (i == -1 && PyErr_Occurred()) return NULL;
            if (i >= 0 && i < PyList_GET_SIZE(seq)) return Py_NewRef(PyList_GET_ITEM(seq, i));
        } else if (kind == s_view && PyTuple_GET_SIZE(tmpl) == 6 && PyTuple_CheckExact(PyTuple_GET_ITEM(tmpl, 3)) &&
                   PyTuple_CheckExact(PyTuple_GET_ITEM(tmpl, 4)) && PyLong_CheckExact(PyTuple_GET_ITEM(tmpl, 5))) {
            Py_ssize_t i = PyLong_AsSsize_t(p);
            if (i == -1 && PyErr_Occurred()) return NULL;
            if (i >= 0 && i < PyList_GET_SIZE(flat)) {
                PyObject *src = PyList_GET_ITEM(flat, i);
                PyObject *dt = PyTuple_GET_ITEM(tmpl, 2), *sh = PyTuple_GET_ITEM(tmpl, 3),
                         *st = PyTuple_GET_ITEM(tmpl, 4), *of = PyTuple_GET_ITEM(tmpl, 5);
                PyObject *t = make_wrapper(sh, st, of, dt, tdev);
                if (!t) return NULL;
                /* its (TensorRef, key part) as _make_rk would make them from the wrapper: the
                 * view is read by the next operator, nearly always */
                PyObject *al = PyObject_GetAttr(src, s_a);
                PyObject *h = al ? PyObject_GetAttr(al, s_handle) : NULL;
                PyObject *ref = h ? make_ref(h, dt, sh, st, of) : NULL;
                PyObject *kp = ref ? PyTuple_Pack(4, dt, sh, st, of) : NULL;
                PyObject *rk = kp ? PyTuple_Pack(2, ref, kp) : NULL;
                int bad = !rk || set2(t, al, rk) < 0;
                Py_XDECREF(h);
                Py_XDECREF(ref);
                Py_XDECREF(kp);
                Py_XDECREF(rk);
                Py_XDECREF(al);
                if (bad) {
                    Py_DECREF(t);
                    return NULL;
                }
                return t;
            }
        }
    }
    return PyObject_CallFunctionObjArgs(g_build_py, tmpl, made, flat, NULL);
}

/* The cached payload with this launch's handles written in (protocol.fill_launch), or NULL
 * without an error: the Python _launch encodes it (and raises what fill_launch raises). */
static PyObject *fill(PyObject *tpl, PyObject *flat, PyObject *out_handles) {
    if (!PyTuple_CheckExact(tpl) || PyTuple_GET_SIZE(tpl) != 2) return NULL;
    PyObject *payload = PyTuple_GET_ITEM(tpl, 0), *offs = PyTuple_GET_ITEM(tpl, 1);
    if (!PyBytes_CheckExact(payload) || !PyTuple_CheckExact(offs)) return NULL;
    Py_ssize_t nf = PyList_GET_SIZE(flat), no = PyList_GET_SIZE(out_handles);
    Py_ssize_t n = PyBytes_GET_SIZE(payload);
    if (PyTuple_GET_SIZE(offs) != nf + no) return NULL;
    PyObject *b = PyBytes_FromStringAndSize(PyBytes_AS_STRING(payload), n);
    if (!b) return NULL;
    unsigned char *p = (unsigned char *)PyBytes_AS_STRING(b);
    for (Py_ssize_t i = 0; i < nf + no; i++) {
        PyObject *h;
        if (i < nf) {
            PyObject *al = PyObject_GetAttr(PyList_GET_ITEM(flat, i), s_a);
            if (!al) goto bad;
            h = PyObject_GetAttr(al, s_handle);
            Py_DECREF(al);
            if (!h) goto bad;
        } else {
            h = Py_NewRef(PyList_GET_ITEM(out_handles, i - nf));
        }
        unsigned long long v = PyLong_Check(h) ? PyLong_AsUnsignedLongLong(h) : (unsigned long long)-1;
        Py_DECREF(h);
        Py_ssize_t off = PyLong_AsSsize_t(PyTuple_GET_ITEM(offs, i));
        if (PyErr_Occurred() || v > 0xFFFFFFFFull || off < 0 || off > n - 4) goto bad;
        p[off] = (unsigned char)v;
        p[off + 1] = (unsigned char)(v >> 8);
        p[off + 2] = (unsigned char)(v >> 16);
        p[off + 3] = (unsigned char)(v >> 24);
    }
    return b;
bad:
    PyErr_Clear();
    Py_DECREF(b);
    return NULL;
}

static PyObject *fallback(PyObject *func, PyObject *args, PyObject *kwargs) {
    return PyObject_CallFunctionObjArgs(g_fallback, func, args, kwargs, NULL);
}

/* Build the key (and wire arguments) of a call; PYTHON if the call is not for this path. */
static int walk(Walk *w, PyObject *args, PyObject *kwargs, int value_free,
                PyObject *wargs, PyObject *wkwargs) {
    Py_ssize_t n = PyTuple_GET_SIZE(args);
    int rc;
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *a = PyTuple_GET_ITEM(args, i), *wire = NULL;
        if (is_number(a)) { /* top level: the type, then the value unless value_free */
            rc = kpush(w, Py_NewRef((PyObject *)Py_TYPE(a)));
            if (rc == OK && !value_free) rc = kpush(w, number_key(a));
            wire = Py_NewRef(a);
        } else if ((PyObject *)Py_TYPE(a) == g_npu_type) {
            rc = w_tensor(w, a, &wire);
        } else {
            rc = w_value(w, a, &wire, 0);
        }
        if (rc != OK) {
            Py_XDECREF(wire);
            return rc;
        }
        rc = PyList_Append(wargs, wire);
        Py_DECREF(wire);
        if (rc < 0) return ERR;
    }
    if (kwargs && PyDict_GET_SIZE(kwargs)) {
        PyObject *k, *v;
        Py_ssize_t pos = 0;
        while (PyDict_Next(kwargs, &pos, &k, &v)) {
            PyObject *wire = NULL;
            if ((rc = kpush(w, Py_NewRef(k))) != OK) return rc;
            if (value_free && is_number(v)) {
                rc = kpush(w, Py_NewRef((PyObject *)Py_TYPE(v)));
                wire = Py_NewRef(v);
            } else {
                rc = w_value(w, v, &wire, 0);
            }
            if (rc != OK) {
                Py_XDECREF(wire);
                return rc;
            }
            rc = PyDict_SetItem(wkwargs, k, wire);
            Py_DECREF(wire);
            if (rc < 0) return ERR;
        }
    }
    return w->dev ? OK : PYTHON; /* no npu tensor nor device: Python picks the current device */
}

static PyObject *key_tuple(Walk *w, PyObject *info) {
    PyObject *t = PyTuple_New(w->nk + 1);
    if (!t) return NULL;
    PyTuple_SET_ITEM(t, 0, Py_NewRef(info));
    for (int i = 0; i < w->nk; i++) PyTuple_SET_ITEM(t, i + 1, Py_NewRef(w->key[i]));
    return t;
}

/* What the call needs before its walk: its OpInfo, PYTHON for the calls only Python handles. */
static int pre(PyObject *func, PyObject *args, PyObject *kwargs, PyObject **info_out, int *vf,
               int *allowed) {
    if (!g_ready || !PyTuple_CheckExact(args) || (kwargs && !PyDict_CheckExact(kwargs))) return PYTHON;
    PyObject *id = PyLong_FromVoidPtr(func);
    if (!id) return ERR;
    PyObject *info = PyDict_GetItemWithError(g_infos, id); /* borrowed */
    Py_DECREF(id);
    if (!info) return PyErr_Occurred() ? ERR : PYTHON;
    PyObject *special = PyObject_GetAttr(info, s_special);
    if (!special) return ERR;
    int is_special = special != Py_None;
    Py_DECREF(special);
    if (is_special) return PYTHON;
    int cpu = attr_true(info, s_cpu);
    if (cpu) return cpu < 0 ? ERR : PYTHON;
    if (kwargs) {
        PyObject *d = PyDict_GetItemWithError(kwargs, s_device);
        if (d && d != Py_None) { /* a host device: Python's host fallback */
            if ((PyObject *)Py_TYPE(d) != g_device_type) return PYTHON;
            int npu = is_npu_device(d);
            if (npu <= 0) return npu < 0 ? ERR : PYTHON;
        }
        if (PyErr_Occurred()) return ERR;
    }
    if ((*vf = attr_true(info, s_value_free)) < 0) return ERR;
    if ((*allowed = attr_true(info, s_allowed)) < 0) return ERR;
    *info_out = info;
    return OK;
}

static PyObject *launch(PyObject *c, PyObject *info, PyObject *ckey, PyObject *wargs,
                        PyObject *wkwargs, PyObject *outs, PyObject *out_handles, PyObject *flat,
                        PyObject *stream, int value_free) {
    if (!value_free) {
        PyObject *tpl = PyDict_GetItemWithError(g_enc_cache, ckey);
        if (tpl) {
            PyObject *payload = fill(tpl, flat, out_handles);
            if (payload) {
                PyObject *r = PyObject_CallMethodObjArgs(c, s_launch_payload, payload, stream, NULL);
                Py_DECREF(payload);
                return r;
            }
        } else if (PyErr_Occurred()) {
            return NULL;
        }
    }
    PyObject *a[8] = {c, info, ckey, wargs, wkwargs, outs, flat, stream};
    return PyObject_Vectorcall(g_launch_py, a, 8, NULL);
}

static PyObject *run(PyObject *func, PyObject *args, PyObject *kwargs) {
    PyObject *info = NULL;
    int vf = 0, allowed = 0;
    int rc = pre(func, args, kwargs, &info, &vf, &allowed);
    if (rc == ERR) return NULL;
    if (rc == PYTHON) return fallback(func, args, kwargs);
    Walk w = {0};
    PyObject *wargs = NULL, *wkwargs = NULL, *ckey = NULL, *result = NULL, *made = NULL,
             *outs = NULL, *out_handles = NULL, *c = NULL, *stream = NULL, *tdev = NULL, *r;
    w.flat = PyList_New(0);
    wargs = PyList_New(0);
    wkwargs = PyDict_New();
    if (!w.flat || !wargs || !wkwargs) goto done;
    rc = walk(&w, args, kwargs, vf, wargs, wkwargs);
    if (rc == ERR) goto done;
    if (rc == PYTHON) goto python;
    if (!(ckey = key_tuple(&w, info))) goto done;
    PyObject *spec = PyDict_GetItemWithError(g_cache, ckey); /* borrowed */
    if (!spec) {
        if (PyErr_Occurred()) goto done;
        goto python; /* a miss: Python infers the spec and caches it */
    }
    if (!PyTuple_CheckExact(spec) || PyTuple_GET_SIZE(spec) != 3) goto python;
    PyObject *tmpl = PyTuple_GET_ITEM(spec, 0), *news = PyTuple_GET_ITEM(spec, 1);
    int need_launch = PyObject_IsTrue(PyTuple_GET_ITEM(spec, 2));
    if (need_launch < 0) goto done;
    if (PyUnicode_Check(tmpl) || !PyTuple_CheckExact(news)) goto python; /* "resize" */
    Py_ssize_t nn = PyTuple_GET_SIZE(news);
    if ((nn || need_launch) && !allowed) goto python; /* Python raises the refusal */
    Py_INCREF(spec); /* the cache may be cleared below (a flush frees, a launch encodes) */
    /* from here on the call is ours: everything below is what dispatch() does on a hit */
    r = PyDict_GetItemWithError(g_stats, s_hits);
    if (r) {
        PyObject *n1 = PyNumber_Add(r, s_one);
        if (!n1 || PyDict_SetItem(g_stats, s_hits, n1) < 0) {
            Py_XDECREF(n1);
            Py_DECREF(spec);
            goto done;
        }
        Py_DECREF(n1);
    } else if (PyErr_Occurred()) {
        Py_DECREF(spec);
        goto done;
    }
    int due = attr_true(w.dev, s_flush_due);
    if (due < 0) goto done_spec;
    if (due) {
        r = PyObject_CallMethodNoArgs(w.dev, s_flush_frees);
        if (!r) goto done_spec;
        Py_DECREF(r);
    }
    if (!(c = PyObject_GetAttr(w.dev, s_client))) goto done_spec;
    if (!(stream = PyObject_GetAttr(w.dev, s_stream))) goto done_spec;
    PyObject *index = PyObject_GetAttr(w.dev, s_index);
    if (!index) goto done_spec;
    tdev = PyDict_GetItemWithError(g_tdevs, index);
    if (tdev) {
        Py_INCREF(tdev);
    } else if (!PyErr_Occurred()) {
        tdev = PyObject_CallOneArg(g_tdev, index);
    }
    Py_DECREF(index);
    if (!tdev) goto done_spec;
    made = PyList_New(0);
    outs = PyList_New(0);
    out_handles = PyList_New(0);
    if (!made || !outs || !out_handles) goto done_spec;
    if (nn) {
        for (Py_ssize_t i = 0; i < nn; i++) {
            PyObject *nw = PyTuple_GET_ITEM(news, i);
            if (!PyTuple_CheckExact(nw) || PyTuple_GET_SIZE(nw) != 6) {
                PyErr_SetString(PyExc_SystemError, "flexnpu: malformed output spec in the dispatch cache");
                goto done_spec;
            }
            PyObject *dt = PyTuple_GET_ITEM(nw, 0), *sh = PyTuple_GET_ITEM(nw, 1),
                     *st = PyTuple_GET_ITEM(nw, 2), *of = PyTuple_GET_ITEM(nw, 3),
                     *nb = PyTuple_GET_ITEM(nw, 4), *kp = PyTuple_GET_ITEM(nw, 5);
            PyObject *h = PyObject_CallMethodNoArgs(c, s_alloc_handle);
            if (!h) goto done_spec;
            PyObject *t = make_wrapper(sh, st, of, dt, tdev);
            PyObject *aargs[3] = {w.dev, h, nb};
            PyObject *alloc = t ? PyObject_Vectorcall(g_alloc_type, aargs, 3, NULL) : NULL;
            PyObject *ref = alloc ? make_ref(h, dt, sh, st, of) : NULL;
            PyObject *rk = ref ? PyTuple_Pack(2, ref, kp) : NULL;
            PyObject *ob = rk ? PyTuple_Pack(2, nb, ref) : NULL;
            int bad = !ob || set2(t, alloc, rk) < 0 || PyList_Append(made, t) < 0 ||
                      PyList_Append(outs, ob) < 0 || PyList_Append(out_handles, h) < 0;
            Py_XDECREF(t);
            Py_XDECREF(alloc);
            Py_XDECREF(ref);
            Py_XDECREF(rk);
            Py_XDECREF(ob);
            Py_DECREF(h);
            if (bad) goto done_spec;
        }
    }
    if (nn || need_launch) {
        r = launch(c, info, ckey, wargs, wkwargs, outs, out_handles, w.flat, stream, vf);
        if (!r) goto done_spec;
        Py_DECREF(r);
    }
    result = build(tmpl, made, w.flat, tdev);
done_spec:
    Py_DECREF(spec);
    goto done;
python:
    result = fallback(func, args, kwargs);
done:
    walk_clear(&w);
    Py_XDECREF(wargs);
    Py_XDECREF(wkwargs);
    Py_XDECREF(ckey);
    Py_XDECREF(made);
    Py_XDECREF(outs);
    Py_XDECREF(out_handles);
    Py_XDECREF(c);
    Py_XDECREF(stream);
    Py_XDECREF(tdev);
    return result;
}

/* __torch_dispatch__(cls, func, types, args=(), kwargs=None), as a classmethod */
static PyObject *py_torch_dispatch(PyObject *self, PyObject *const *a, Py_ssize_t n, PyObject *kwnames) {
    PyObject *func = NULL, *args = s_empty, *kwargs = NULL;
    Py_ssize_t nk = kwnames ? PyTuple_GET_SIZE(kwnames) : 0;
    if (n < 3 || n > 5) goto usage;
    func = a[1];
    if (n >= 4) args = a[3];
    if (n == 5) kwargs = a[4];
    for (Py_ssize_t i = 0; i < nk; i++) {
        PyObject *name = PyTuple_GET_ITEM(kwnames, i);
        if (PyUnicode_CompareWithASCIIString(name, "args") == 0) args = a[n + i];
        else if (PyUnicode_CompareWithASCIIString(name, "kwargs") == 0) kwargs = a[n + i];
        else goto usage;
    }
    if (kwargs == Py_None) kwargs = NULL;
    if (!kwargs) {
        PyObject *empty = PyDict_New();
        if (!empty) return NULL;
        PyObject *r = run(func, args, empty);
        Py_DECREF(empty);
        return r;
    }
    return run(func, args, kwargs);
usage:
    PyErr_SetString(PyExc_TypeError, "__torch_dispatch__(cls, func, types, args=(), kwargs=None)");
    return NULL;
}

/* dispatch(func, args, kwargs): tensor.dispatch() (the PrivateUse1 kernels call it) */
static PyObject *py_dispatch(PyObject *self, PyObject *const *a, Py_ssize_t n) {
    if (n != 3) {
        PyErr_SetString(PyExc_TypeError, "dispatch(func, args, kwargs)");
        return NULL;
    }
    return run(a[0], a[1], a[2]);
}

/* key_of(func, args, kwargs): the cache key this path builds for a call, or None if the call
 * takes the Python path before its key (for the test that compares it with Python's) */
static PyObject *py_key_of(PyObject *self, PyObject *const *a, Py_ssize_t n) {
    if (n != 3) {
        PyErr_SetString(PyExc_TypeError, "key_of(func, args, kwargs)");
        return NULL;
    }
    PyObject *info = NULL;
    int vf = 0, allowed = 0;
    int rc = pre(a[0], a[1], a[2], &info, &vf, &allowed);
    if (rc == ERR) return NULL;
    if (rc == PYTHON) Py_RETURN_NONE;
    Walk w = {0};
    PyObject *wargs = PyList_New(0), *wkwargs = PyDict_New(), *res = NULL;
    w.flat = PyList_New(0);
    if (wargs && wkwargs && w.flat) {
        rc = walk(&w, a[1], a[2], vf, wargs, wkwargs);
        if (rc == OK) res = key_tuple(&w, info);
        else if (rc == PYTHON) res = Py_NewRef(Py_None);
    }
    walk_clear(&w);
    Py_XDECREF(wargs);
    Py_XDECREF(wkwargs);
    return res;
}

static int keep(PyObject *cfg, const char *name, PyObject **slot) {
    PyObject *v = PyDict_GetItemString(cfg, name);
    if (!v) {
        PyErr_Format(PyExc_KeyError, "fastdispatch.configure: missing %s", name);
        return -1;
    }
    Py_XSETREF(*slot, Py_NewRef(v));
    return 0;
}

static PyObject *py_configure(PyObject *self, PyObject *cfg) {
    if (!PyDict_Check(cfg)) {
        PyErr_SetString(PyExc_TypeError, "configure(dict)");
        return NULL;
    }
    g_ready = 0;
    if (keep(cfg, "infos", &g_infos) || keep(cfg, "cache", &g_cache) ||
        keep(cfg, "enc_cache", &g_enc_cache) || keep(cfg, "stats", &g_stats) ||
        keep(cfg, "tensor_type", &g_npu_type) || keep(cfg, "alloc_type", &g_alloc_type) ||
        keep(cfg, "ref_type", &g_ref_type) || keep(cfg, "make_raw", &g_make_raw) ||
        keep(cfg, "wrapper_storage", &g_ws) || keep(cfg, "tdevs", &g_tdevs) ||
        keep(cfg, "tdev", &g_tdev) || keep(cfg, "fallback", &g_fallback) ||
        keep(cfg, "make_rk", &g_make_rk) || keep(cfg, "launch", &g_launch_py) ||
        keep(cfg, "build", &g_build_py) || keep(cfg, "plain_types", &g_plain_types) ||
        keep(cfg, "device_type", &g_device_type) || keep(cfg, "get_device", &g_get_device) ||
        keep(cfg, "runtime", &g_runtime))
        return NULL;
    if (!PyDict_CheckExact(g_infos) || !PyDict_CheckExact(g_cache) || !PyDict_CheckExact(g_enc_cache) ||
        !PyDict_CheckExact(g_stats) || !PyDict_CheckExact(g_tdevs) || !PyType_Check(g_ref_type) ||
        !PyTuple_CheckExact(g_plain_types)) {
        PyErr_SetString(PyExc_TypeError, "fastdispatch.configure: unexpected object types");
        return NULL;
    }
    static const char *members[5] = {"handle", "dtype", "shape", "stride", "offset"};
    for (int i = 0; i < 5; i++) {
        PyObject *d = PyDict_GetItemString(((PyTypeObject *)g_ref_type)->tp_dict, members[i]);
        if (!d || !Py_TYPE(d)->tp_descr_set) {
            PyErr_Format(PyExc_TypeError, "fastdispatch.configure: TensorRef.%s is not a slot", members[i]);
            return NULL;
        }
        Py_XSETREF(g_ref_members[i], Py_NewRef(d));
    }
    if (!g_raw_kwnames) {
        g_raw_kwnames = Py_BuildValue("(sssss)", "strides", "storage_offset", "dtype", "device", "storage_size");
        if (!g_raw_kwnames) return NULL;
    }
    g_ready = 1;
    Py_RETURN_NONE;
}

static PyMethodDef td_def = {"torch_dispatch", (PyCFunction)(void (*)(void))py_torch_dispatch,
                             METH_FASTCALL | METH_KEYWORDS, "NPUTensor.__torch_dispatch__ in C"};
static PyMethodDef run_def = {"dispatch", (PyCFunction)(void (*)(void))py_dispatch, METH_FASTCALL,
                              "tensor.dispatch(func, args, kwargs) in C"};
static PyMethodDef key_def = {"key_of", (PyCFunction)(void (*)(void))py_key_of, METH_FASTCALL,
                              "the cache key of a call on the C path (tests)"};
static PyMethodDef cfg_def = {"configure", (PyCFunction)py_configure, METH_O,
                              "configure(dict): the objects of flexnpu.hook.tensor"};

static int intern(PyObject **slot, const char *s) {
    if (*slot) return 0;
    *slot = PyUnicode_InternFromString(s);
    return *slot ? 0 : -1;
}

static int install(PyObject *d) {
    if (!PyDict_Check(d)) return -1;
    if (intern(&s_a, "_a") || intern(&s_rk, "_rk") || intern(&s_dev, "dev") ||
        intern(&s_special, "special") || intern(&s_cpu, "cpu") || intern(&s_value_free, "value_free") ||
        intern(&s_allowed, "allowed") || intern(&s_flush_due, "flush_due") ||
        intern(&s_flush_frees, "flush_frees") || intern(&s_client, "client") ||
        intern(&s_stream, "stream") || intern(&s_index, "index") || intern(&s_alloc_handle, "alloc_handle") ||
        intern(&s_launch_payload, "launch_payload") || intern(&s_hits, "hits") ||
        intern(&s_device, "device") || intern(&s_handle, "handle") || intern(&s_new, "new") ||
        intern(&s_self, "self") || intern(&s_view, "view") || intern(&s_type, "type") ||
        intern(&g_npu_name, "npu") || intern(&s_allocated, "allocated") || intern(&s_peak, "peak") ||
        intern(&s_capture, "capture") || intern(&s_pending, "pending") ||
        intern(&s_pending_bytes, "pending_bytes") || intern(&s_graph, "_graph") ||
        intern(&s_held, "_held") || intern(&s_free_batch, "FREE_BATCH") ||
        intern(&s_free_bytes, "FREE_BYTES"))
        return -1;
    if (PyType_Ready(&AllocType) < 0 || PyDict_SetItemString(d, "Alloc", (PyObject *)&AllocType) < 0) return -1;
    if (!s_empty && !(s_empty = PyTuple_New(0))) return -1;
    if (!s_one && !(s_one = PyLong_FromLong(1))) return -1;
    PyMethodDef *defs[4] = {&td_def, &run_def, &key_def, &cfg_def};
    for (int i = 0; i < 4; i++) {
        PyObject *f = PyCFunction_New(defs[i], NULL);
        if (!f || PyDict_SetItemString(d, defs[i]->ml_name, f) < 0) {
            Py_XDECREF(f);
            return -1;
        }
        Py_DECREF(f);
    }
    return 0;
}

/* cffi calls this with the GIL released: take it */
int fxd_install(uint64_t dict_addr) {
    PyGILState_STATE g = PyGILState_Ensure();
    int rc = install((PyObject *)(uintptr_t)dict_addr);
    if (rc < 0) PyErr_Clear();
    PyGILState_Release(g);
    return rc;
}
