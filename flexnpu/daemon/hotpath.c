/* The daemon's hot path in C: a planned aten launch on an idle stream of an in-order daemon.
 *
 * Why: an eager decode loop sends ~120 launches a token whose exact structure the daemon has a
 * plan for. In Python (handlers/launch.py run_hot + _run_now) each cost ~15 us of interpreted
 * bookkeeping around the operator itself (~10 frames: copying the payload out, the plan
 * lookup, the handle table, the memory accounts, the allocation, binding the result, the
 * counters), and the daemon, not the client, set the pace of the loop (busy ~90 % of a token).
 * This file is that same path with the frames taken out. It is not a second definition of the
 * behaviour: whatever is not the common case goes to the Python functions, before anything is
 * changed (an unknown handle, an output handle in use or out of range, a memory or handle
 * budget exceeded, a device stream, several outputs, an input to make bytes for), and those
 * raise the errors and do the accounting exactly as for any launch. What it does itself is the
 * Python's, step for step:
 *   run_hot: payload copied out of the arena (bounds-checked by the buffer protocol), the
 *            native front end's operators and payloads over PLAN_MAX_PAYLOAD left to Python,
 *            launch_split, the plan lookup;
 *   _run_now: inputs looked up, the output's bytes charged to the client's account chain
 *            (MemoryAccount.charge: every level's limit checked before any is charged), its
 *            Alloc made and entered in the table (charged HANDLE_COST to the host account),
 *            the producer's pending result used as the input where its layout is the slot's,
 *            backend.run_plan, the result bound pending (_bind_planned's one-output case),
 *            a sync launch's reply, the stream's and session's counters and the latency metric.
 * Failures after the output exists go to launch.py's _hot_failed (the same s.fail as Python).
 *
 * Installed into a Python dict by fxh_install() (the ring's pattern, flexnpu/ring/pyfast.c),
 * configured once by handlers/launch.py with the objects it works on. The daemon is one thread
 * holding the GIL: nothing here races.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>
#include <time.h>

/* set by configure() */
static PyObject *g_split, *g_run_now, *g_failed, *g_bind, *g_cannot_report, *g_ready_buf,
    *g_alloc_type, *g_account_type, *g_one, *g_unpack;
static long long g_launch_op, g_sqe_size;
static Py_ssize_t g_plan_max, g_max_handles;
static long long g_max_handle, g_handle_cost, g_max_alloc, g_flag_sync;
static int g_ready = 0;

static PyObject *s_seg, *s_arena, *s_plans, *s_dead, *s_n_in, *s_slots, *s_outputs, *s_out_keys,
    *s_handles, *s_h, *s_device_stream, *s_mem, *s_account, *s_limit, *s_used, *s_peak, *s_parent,
    *s_ref, *s_tables, *s_buf, *s_result, *s_view, *s_mutable, *s_key, *s_daemon, *s_backend,
    *s_run_plan, *s_alloc, *s_failed, *s_reply_sync, *s_busy_s, *s_ops_done, *s_launches,
    *s_latency_observe, *s_drain_t, *s_uncharge, *s_kill, *s_streams, *s_capturing, *s_queue,
    *s_fail, *s_prepare;

enum { DONE = 1, NOT_HOT = 0, TO_PYTHON = 2, ERR = -1 };

/* the raised exception, normalized, as a new reference (NULL if none); the error cleared */
static PyObject *take_exc(void) {
    PyObject *t, *v, *tb;
    PyErr_Fetch(&t, &v, &tb);
    if (!t) return NULL;
    PyErr_NormalizeException(&t, &v, &tb);
    if (v && tb) PyException_SetTraceback(v, tb);
    Py_XDECREF(t);
    Py_XDECREF(tb);
    return v;
}

static void give_exc(PyObject *v) { /* steals v */
    PyErr_SetObject((PyObject *)Py_TYPE(v), v);
    Py_DECREF(v);
}

static double now_s(void) {
    /* time.perf_counter() is CLOCK_MONOTONIC on Linux: comparable with s._drain_t */
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

static int get_ll(PyObject *o, long long *out) {
    if (!PyLong_CheckExact(o)) return 0;
    int overflow = 0;
    long long v = PyLong_AsLongLongAndOverflow(o, &overflow);
    if (overflow || (v == -1 && PyErr_Occurred())) {
        PyErr_Clear();
        return 0;
    }
    *out = v;
    return 1;
}

/* attribute as a new reference; NULL with an error set */
#define GET(o, name) PyObject_GetAttr((o), (name))

/* The payload bytes [off, off + n) of the client's arena, or NULL with no error set when the
 * Python path should handle the record (outside the arena, a closed segment). */
static PyObject *payload_of(PyObject *s, long long off, long long n) {
    PyObject *seg = GET(s, s_seg);
    if (!seg) return NULL;
    PyObject *arena = GET(seg, s_arena);
    Py_DECREF(seg);
    if (!arena) return NULL;
    Py_buffer view;
    if (PyObject_GetBuffer(arena, &view, PyBUF_SIMPLE) < 0) { /* released: segment closed */
        Py_DECREF(arena);
        PyErr_Clear();
        return NULL;
    }
    PyObject *out = NULL;
    if (off >= 0 && n >= 0 && off <= (long long)view.len && n <= (long long)view.len - off)
        out = PyBytes_FromStringAndSize((const char *)view.buf + off, (Py_ssize_t)n);
    PyBuffer_Release(&view);
    Py_DECREF(arena);
    if (!out) PyErr_Clear();
    return out;
}

/* MemoryAccount.charge over the chain, for exact MemoryAccount objects: 1 charged, 0 refused
 * (nothing changed), 2 not a plain chain (the caller takes the Python path), -1 error. */
static int charge_chain(PyObject *acct, long long n) {
    PyObject *chain[8];
    int depth = 0, rc = 1;
    for (PyObject *a = acct; a != Py_None; depth++) {
        if (depth == 8 || Py_TYPE(a) != (PyTypeObject *)g_account_type) return 2;
        chain[depth] = a;
        PyObject *p = GET(a, s_parent);
        if (!p) return -1;
        Py_DECREF(p); /* the chain is held by its children for as long as this call runs */
        a = p;
    }
    for (int i = 0; i < depth && rc == 1; i++) { /* every limit first */
        PyObject *lim = GET(chain[i], s_limit);
        if (!lim) return -1;
        if (lim != Py_None) {
            PyObject *used = GET(chain[i], s_used);
            long long l, u;
            if (!used) {
                Py_DECREF(lim);
                return -1;
            }
            if (!get_ll(lim, &l) || !get_ll(used, &u)) rc = 2;
            else if (u + n > l) rc = 0;
            Py_DECREF(used);
        }
        Py_DECREF(lim);
    }
    if (rc != 1) return rc;
    for (int i = 0; i < depth; i++) {
        PyObject *used = GET(chain[i], s_used), *peak = NULL, *nu = NULL, *amount = NULL;
        int bad = -1;
        if (!used) return -1;
        if (!(amount = PyLong_FromLongLong(n))) goto out;
        if (!(nu = PyNumber_Add(used, amount))) goto out;
        if (PyObject_SetAttr(chain[i], s_used, nu) < 0) goto out;
        if (!(peak = GET(chain[i], s_peak))) goto out;
        int more = PyObject_RichCompareBool(nu, peak, Py_GT);
        if (more < 0) goto out;
        if (more && PyObject_SetAttr(chain[i], s_peak, nu) < 0) goto out;
        bad = 0;
    out:
        Py_XDECREF(used);
        Py_XDECREF(peak);
        Py_XDECREF(nu);
        Py_XDECREF(amount);
        if (bad) return -1; /* (an int add or attribute store failing: out of memory) */
    }
    return 1;
}

static int uncharge(PyObject *acct, long long n) {
    PyObject *amount = PyLong_FromLongLong(n);
    if (!amount) return -1;
    PyObject *r = PyObject_CallMethodObjArgs(acct, s_uncharge, amount, NULL);
    Py_DECREF(amount);
    if (!r) return -1;
    Py_DECREF(r);
    return 0;
}

/* the plan's run, bound and replied to; the output already entered. 0, or -1 with an error
 * that _cannot_report must see (reporting failed) */
static int run_and_bind(PyObject *s, PyObject *st, PyObject *rec, PyObject *plan, PyObject *handles,
                        PyObject **ins, Py_ssize_t n_in, PyObject *slots, PyObject *out_h,
                        PyObject *al_out, PyObject *out_keys, long long flags, PyObject *ud) {
    (void)rec;
    PyObject *bufs = PyList_New(n_in), *hints = NULL, *daemon = NULL, *be = NULL, *run = NULL,
             *alloc = NULL, *results = NULL;
    int rc = -1, made = 0;
    if (!bufs) goto fail;
    for (Py_ssize_t k = 0; k < n_in; k++) {
        PyObject *al = ins[k], *b = GET(al, s_buf);
        if (!b) goto fail;
        if (b == Py_None) {
            Py_DECREF(b);
            b = NULL;
            PyObject *res = GET(al, s_result), *v = res ? GET(al, s_view) : NULL;
            if (!v) {
                Py_XDECREF(res);
                goto fail;
            }
            if (res != Py_None && PyTuple_CheckExact(v) && PyTuple_GET_SIZE(v) == 3 &&
                PyTuple_GET_ITEM(v, 0) == res) {
                PyObject *sl = PyList_GET_ITEM(slots, k);
                PyObject *mut = GET(sl, s_mutable), *key = mut ? GET(sl, s_key) : NULL;
                int same = 0;
                if (key) {
                    int m = PyObject_IsTrue(mut);
                    same = m < 0 ? -1 : (m ? 0 : PyObject_RichCompareBool(PyTuple_GET_ITEM(v, 1), key, Py_EQ));
                }
                Py_XDECREF(mut);
                Py_XDECREF(key);
                if (!key || same < 0) {
                    Py_DECREF(res);
                    Py_DECREF(v);
                    goto fail;
                }
                if (same) b = Py_NewRef(res);
            }
            Py_DECREF(res);
            Py_DECREF(v);
            if (!b) { /* its bytes are made (or it was never produced: InvalidHandle) */
                b = PyObject_CallFunctionObjArgs(g_ready_buf, al, PyTuple_GET_ITEM(handles, k), NULL);
                if (!b) goto fail;
                made = 1;
            }
        }
        PyList_SET_ITEM(bufs, k, b);
    }
    if (made) { /* an allocation read twice may have been given its bytes after its first read */
        for (Py_ssize_t k = 0; k < n_in; k++) {
            PyObject *b = GET(ins[k], s_buf);
            if (!b) goto fail;
            if (b != Py_None) PyList_SetItem(bufs, k, b); /* steals b */
            else Py_DECREF(b);
        }
    }
    if (!(hints = PyList_New(n_in))) goto fail;
    for (Py_ssize_t k = 0; k < n_in; k++) {
        PyObject *v = GET(ins[k], s_view);
        if (!v) goto fail;
        PyList_SET_ITEM(hints, k, v);
    }
    if (!(daemon = GET(s, s_daemon)) || !(be = GET(daemon, s_backend))) goto fail;
    if (!(run = GET(be, s_run_plan)) || !(alloc = GET(be, s_alloc))) goto fail;
    PyObject *args[5] = {plan, bufs, handles, alloc, hints};
    results = PyObject_Vectorcall(run, args, 5, NULL);
    if (!results) goto fail;
    /* bound: _bind_planned's one-output case */
    if (PyList_CheckExact(results) && PyList_GET_SIZE(results) == 1 &&
        PyTuple_CheckExact(PyList_GET_ITEM(results, 0)) && PyTuple_GET_SIZE(PyList_GET_ITEM(results, 0)) == 2 &&
        PyTuple_GET_ITEM(PyList_GET_ITEM(results, 0), 0) == Py_None && PyList_CheckExact(out_keys) &&
        PyList_GET_SIZE(out_keys) == 1) {
        PyObject *view = PyTuple_GET_ITEM(PyList_GET_ITEM(results, 0), 1);
        PyObject *hint = PyTuple_Pack(3, view, PyList_GET_ITEM(out_keys, 0), view);
        if (!hint) goto fail;
        int e = PyObject_SetAttr(al_out, s_result, view) < 0 || PyObject_SetAttr(al_out, s_buf, Py_None) < 0 ||
                PyObject_SetAttr(al_out, s_failed, Py_None) < 0 || PyObject_SetAttr(al_out, s_view, hint) < 0;
        Py_DECREF(hint);
        if (e) goto fail;
    } else { /* anything else: launch.py _hot_bind (_bind_planned); its failure is reporting's */
        PyObject *r = PyObject_CallFunctionObjArgs(g_bind, plan, handles, out_h, al_out, results, NULL);
        if (!r) goto done;
        Py_DECREF(r);
    }
    rc = 0;
    if (flags & g_flag_sync) {
        PyObject *r = PyObject_CallMethodObjArgs(s, s_reply_sync, ud, st, NULL);
        if (!r) rc = -1;
        else Py_DECREF(r);
    }
    goto done;
fail: {
    /* the client's error, reported like a queued launch's (launch.py _hot_failed) */
    PyObject *exc = take_exc();
    if (!exc) {
        PyErr_SetString(PyExc_SystemError, "hot path: failure without an exception");
        goto done;
    }
    PyObject *r = PyObject_CallFunctionObjArgs(g_failed, s, st, rec, plan, out_h, al_out, exc, NULL);
    Py_DECREF(exc);
    if (r) {
        Py_DECREF(r);
        rc = 0;
    }
}
done:
    Py_XDECREF(bufs);
    Py_XDECREF(hints);
    Py_XDECREF(daemon);
    Py_XDECREF(be);
    Py_XDECREF(run);
    Py_XDECREF(alloc);
    Py_XDECREF(results);
    return rc;
}

/* st.<name> += v (float or int) */
static int add_to(PyObject *o, PyObject *name, PyObject *v) {
    PyObject *cur = GET(o, name);
    if (!cur) return -1;
    PyObject *nv = PyNumber_Add(cur, v);
    Py_DECREF(cur);
    if (!nv) return -1;
    int e = PyObject_SetAttr(o, name, nv);
    Py_DECREF(nv);
    return e;
}

/* the planned launch itself (_run_now). DONE, TO_PYTHON (nothing changed) or ERR */
static int run_now(PyObject *s, PyObject *st, PyObject *rec, PyObject *plan, PyObject *handles,
                   long long flags, PyObject *ud) {
    PyObject *ins[64];
    Py_ssize_t n_in_got = 0;
    PyObject *n_in_o = NULL, *slots = NULL, *outputs = NULL, *out_keys = NULL, *table = NULL,
             *hd = NULL, *ds = NULL, *mem = NULL, *host = NULL, *al = NULL;
    int rc = ERR;
    long long n_in, nbytes, h;
    if (!(n_in_o = GET(plan, s_n_in)) || !(slots = GET(plan, s_slots)) || !(outputs = GET(plan, s_outputs)) ||
        !(out_keys = GET(plan, s_out_keys)))
        goto out;
    rc = TO_PYTHON;
    if (!get_ll(n_in_o, &n_in) || n_in < 0 || n_in > 64 || !PyList_CheckExact(slots) ||
        PyList_GET_SIZE(slots) != n_in || !PyList_CheckExact(outputs) || PyList_GET_SIZE(outputs) != 1 ||
        !PyTuple_CheckExact(handles) || PyTuple_GET_SIZE(handles) != n_in + 1)
        goto out;
    rc = ERR;
    if (!(ds = GET(st, s_device_stream))) goto out;
    rc = TO_PYTHON;
    if (ds != Py_None) goto out;
    rc = ERR;
    if (!(table = GET(s, s_handles)) || !(hd = GET(table, s_h))) goto out;
    rc = TO_PYTHON;
    if (!PyDict_CheckExact(hd)) goto out;
    for (; n_in_got < n_in; n_in_got++) {
        PyObject *a = PyDict_GetItemWithError(hd, PyTuple_GET_ITEM(handles, n_in_got));
        if (!a) {
            rc = PyErr_Occurred() ? ERR : TO_PYTHON; /* unknown: Python raises InvalidHandle */
            goto out;
        }
        ins[n_in_got] = Py_NewRef(a);
    }
    /* the output: fresh, in range, its bytes and handle within the budgets */
    PyObject *out_h = PyTuple_GET_ITEM(handles, n_in);
    PyObject *spec = PyList_GET_ITEM(outputs, 0);
    if (!get_ll(out_h, &h) || h <= 0 || h > g_max_handle || !PyTuple_CheckExact(spec) ||
        PyTuple_GET_SIZE(spec) != 2 || !get_ll(PyTuple_GET_ITEM(spec, 0), &nbytes) || nbytes < 0 ||
        nbytes > g_max_alloc || PyDict_GET_SIZE(hd) >= g_max_handles)
        goto out;
    for (Py_ssize_t k = 0; k < n_in; k++) {
        int eq = PyObject_RichCompareBool(PyTuple_GET_ITEM(handles, k), out_h, Py_EQ);
        if (eq != 0) {
            rc = eq < 0 ? ERR : TO_PYTHON;
            goto out;
        }
    }
    int in_use = PyDict_Contains(hd, out_h);
    if (in_use != 0) {
        rc = in_use < 0 ? ERR : TO_PYTHON;
        goto out;
    }
    rc = ERR;
    if (!(mem = GET(s, s_mem)) || !(host = GET(table, s_account))) goto out;
    int c = charge_chain(mem, nbytes);
    if (c != 1) {
        rc = c < 0 ? ERR : TO_PYTHON;
        goto out;
    }
    if (host != Py_None) {
        c = charge_chain(host, g_handle_cost);
        if (c != 1) {
            rc = uncharge(mem, nbytes) < 0 || c < 0 ? ERR : TO_PYTHON;
            goto out;
        }
    }
    /* from here the output exists (_planned_outputs + _enter) */
    PyObject *nb = PyTuple_GET_ITEM(spec, 0);
    al = PyObject_CallFunctionObjArgs(g_alloc_type, nb, mem, NULL);
    if (!al || PyObject_SetAttr(al, s_ref, PyTuple_GET_ITEM(spec, 1)) < 0 ||
        PyObject_SetAttr(al, s_tables, g_one) < 0 || PyDict_SetItem(hd, out_h, al) < 0) {
        /* (out of memory making one object): give the charges back, report it */
        PyObject *exc = take_exc();
        if (uncharge(mem, nbytes) < 0) PyErr_Clear();
        if (host != Py_None && uncharge(host, g_handle_cost) < 0) PyErr_Clear();
        if (exc) give_exc(exc);
        goto out;
    }
    double t = now_s();
    int e = run_and_bind(s, st, rec, plan, handles, ins, n_in, slots, out_h, al, out_keys, flags, ud);
    if (e < 0) { /* reporting failed: drop this client alone (as execute) */
        PyObject *exc = take_exc();
        PyObject *r = exc ? PyObject_CallFunctionObjArgs(g_cannot_report, s, exc, NULL) : NULL;
        Py_XDECREF(exc);
        if (!r) goto out;
        Py_DECREF(r);
    }
    /* _ran */
    double t1 = now_s();
    PyObject *dt = PyFloat_FromDouble(t1 - t);
    PyObject *drain_t = dt ? GET(s, s_drain_t) : NULL;
    PyObject *obs = NULL;
    int bad = !dt || !drain_t || add_to(st, s_busy_s, dt) < 0 || add_to(st, s_ops_done, g_one) < 0 ||
              add_to(s, s_launches, g_one) < 0;
    if (!bad) {
        double d0 = PyFloat_AsDouble(drain_t);
        if (d0 == -1.0 && PyErr_Occurred()) bad = 1;
        else {
            PyObject *lat = PyFloat_FromDouble(t1 - d0);
            obs = lat ? PyObject_CallMethodObjArgs(s, s_latency_observe, lat, NULL) : NULL;
            Py_XDECREF(lat);
            bad = obs == NULL;
        }
    }
    Py_XDECREF(dt);
    Py_XDECREF(drain_t);
    Py_XDECREF(obs);
    rc = bad ? ERR : DONE;
out:
    for (Py_ssize_t k = 0; k < n_in_got; k++) Py_DECREF(ins[k]);
    Py_XDECREF(n_in_o);
    Py_XDECREF(slots);
    Py_XDECREF(outputs);
    Py_XDECREF(out_keys);
    Py_XDECREF(table);
    Py_XDECREF(hd);
    Py_XDECREF(ds);
    Py_XDECREF(mem);
    Py_XDECREF(host);
    Py_XDECREF(al);
    return rc;
}

/* run_hot(s, st, rec) -> bool: launch.py run_hot, in C */
static PyObject *run_hot(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    if (!g_ready) {
        PyErr_SetString(PyExc_RuntimeError, "hot path not configured");
        return NULL;
    }
    if (nargs != 3 || !PyTuple_Check(args[2]) || PyTuple_GET_SIZE(args[2]) < 6) Py_RETURN_FALSE;
    PyObject *s = args[0], *st = args[1], *rec = args[2];
    long long flags, off, n;
    if (!get_ll(PyTuple_GET_ITEM(rec, 1), &flags) || !get_ll(PyTuple_GET_ITEM(rec, 4), &off) ||
        !get_ll(PyTuple_GET_ITEM(rec, 5), &n) || n > g_plan_max)
        Py_RETURN_FALSE;
    PyObject *payload = payload_of(s, off, n);
    if (!payload) Py_RETURN_FALSE; /* the generic path reports it */
    const char *p = PyBytes_AS_STRING(payload);
    if (n >= 9 && (memcmp(p + 2, "aclnn::", 7) == 0 || memcmp(p + 2, "aclop::", 7) == 0)) {
        Py_DECREF(payload);
        Py_RETURN_FALSE; /* the native front end's operators: the Python path */
    }
    PyObject *plans = GET(s, s_plans), *split = NULL, *plan = NULL, *res = NULL;
    if (!plans) goto out;
    if (!PyDict_CheckExact(plans)) {
        res = Py_NewRef(Py_False);
        goto out;
    }
    PyObject *sargs[2] = {payload, Py_False};
    split = PyObject_Vectorcall(g_split, sargs, 2, NULL);
    if (!split) goto out;
    if (!PyTuple_CheckExact(split) || PyTuple_GET_SIZE(split) < 2) {
        res = Py_NewRef(Py_False);
        goto out;
    }
    plan = PyDict_GetItemWithError(plans, PyTuple_GET_ITEM(split, 0));
    if (!plan) {
        if (!PyErr_Occurred()) res = Py_NewRef(Py_False);
        goto out;
    }
    Py_INCREF(plan);
    int truth = PyObject_IsTrue(plan);
    if (truth <= 0) {
        if (truth == 0) res = Py_NewRef(Py_False);
        goto out;
    }
    /* _run_now: s.dead drops the launch, as there */
    PyObject *dead = GET(s, s_dead);
    if (!dead) goto out;
    int is_dead = PyObject_IsTrue(dead);
    Py_DECREF(dead);
    if (is_dead < 0) goto out;
    if (is_dead) {
        res = Py_NewRef(Py_True);
        goto out;
    }
    PyObject *handles = PyTuple_GET_ITEM(split, 1);
    int rc = run_now(s, st, rec, plan, handles, flags, PyTuple_GET_ITEM(rec, 3));
    if (rc == TO_PYTHON) {
        PyObject *r = PyObject_CallFunctionObjArgs(g_run_now, s, st, rec, plan, handles, NULL);
        if (!r) goto out;
        Py_DECREF(r);
    } else if (rc == ERR) {
        goto out;
    }
    res = Py_NewRef(Py_True);
out:
    Py_DECREF(payload);
    Py_XDECREF(plans);
    Py_XDECREF(split);
    Py_XDECREF(plan);
    return res;
}

/* drain_batch(s, buf, n) -> None: Session.drain's loop over the n records in buf, with
 * Session.prepare's hot case (a launch on an existing stream, nothing queued or captured on it,
 * a live session) taken here: run_hot, and s.fail(...) for what it raises, as prepare does.
 * Every other record, and a launch run_hot declines, goes to s.prepare(record). */
static PyObject *drain_batch(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    if (!g_ready) {
        PyErr_SetString(PyExc_RuntimeError, "hot path not configured");
        return NULL;
    }
    if (nargs != 3) {
        PyErr_SetString(PyExc_TypeError, "drain_batch(session, buffer, n)");
        return NULL;
    }
    PyObject *s = args[0], *buf = args[1];
    Py_ssize_t n = PyLong_AsSsize_t(args[2]);
    if (n == -1 && PyErr_Occurred()) return NULL;
    PyObject *prepare = GET(s, s_prepare);
    if (!prepare) return NULL;
    PyObject *streams = NULL;
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *off = PyLong_FromSsize_t(i * (Py_ssize_t)g_sqe_size);
        if (!off) goto error;
        PyObject *uargs[2] = {buf, off};
        PyObject *rec = PyObject_Vectorcall(g_unpack, uargs, 2, NULL);
        Py_DECREF(off);
        if (!rec) goto error;
        int handled = 0;
        long long op;
        if (PyTuple_CheckExact(rec) && PyTuple_GET_SIZE(rec) >= 6 && get_ll(PyTuple_GET_ITEM(rec, 0), &op) &&
            op == g_launch_op) {
            PyObject *kill = GET(s, s_kill);
            if (!kill) goto error_rec;
            int live = kill == Py_None;
            Py_DECREF(kill);
            if (!live) { /* prepare drops every record of a client being disconnected */
                Py_DECREF(rec);
                continue;
            }
            Py_XSETREF(streams, GET(s, s_streams));
            if (!streams) goto error_rec;
            PyObject *st = PyDict_CheckExact(streams) ? PyDict_GetItemWithError(streams, PyTuple_GET_ITEM(rec, 2))
                                                      : NULL;
            if (!st && PyErr_Occurred()) goto error_rec;
            if (st) {
                Py_INCREF(st);
                PyObject *cap = GET(st, s_capturing), *q = cap ? GET(st, s_queue) : NULL;
                int idle = -1;
                if (q) {
                    int c = PyObject_IsTrue(cap);
                    Py_ssize_t ql = PyObject_Length(q);
                    idle = (c < 0 || ql < 0) ? -1 : (!c && ql == 0);
                }
                Py_XDECREF(cap);
                Py_XDECREF(q);
                if (idle < 0) {
                    Py_DECREF(st);
                    goto error_rec;
                }
                if (idle) {
                    PyObject *hargs[3] = {s, st, rec};
                    PyObject *r = run_hot(NULL, hargs, 3);
                    if (!r) { /* the client's error, as prepare reports it */
                        PyObject *exc = take_exc();
                        long long flags = 0;
                        get_ll(PyTuple_GET_ITEM(rec, 1), &flags);
                        PyObject *f = exc ? PyObject_CallMethodObjArgs(s, s_fail, PyTuple_GET_ITEM(rec, 3),
                                                                        (flags & g_flag_sync) ? Py_True : Py_False,
                                                                        st, exc, NULL)
                                          : NULL;
                        Py_XDECREF(exc);
                        Py_DECREF(st);
                        if (!f) goto error_rec;
                        Py_DECREF(f);
                        handled = 1;
                    } else {
                        handled = r == Py_True;
                        Py_DECREF(r);
                        Py_DECREF(st);
                    }
                } else {
                    Py_DECREF(st);
                }
            }
        }
        if (!handled) {
            PyObject *r = PyObject_CallOneArg(prepare, rec);
            if (!r) goto error_rec;
            Py_DECREF(r);
        }
        Py_DECREF(rec);
        continue;
    error_rec:
        Py_DECREF(rec);
        goto error;
    }
    Py_XDECREF(streams);
    Py_DECREF(prepare);
    Py_RETURN_NONE;
error:
    Py_XDECREF(streams);
    Py_DECREF(prepare);
    return NULL;
}

static PyObject *cfg_item(PyObject *cfg, const char *name) {
    PyObject *v = PyDict_GetItemString(cfg, name); /* borrowed */
    if (!v) PyErr_Format(PyExc_KeyError, "hot path config: %s missing", name);
    return v;
}

static int cfg_ll(PyObject *cfg, const char *name, long long *out) {
    PyObject *v = cfg_item(cfg, name);
    if (!v) return -1;
    *out = PyLong_AsLongLong(v);
    return (*out == -1 && PyErr_Occurred()) ? -1 : 0;
}

static PyObject *configure(PyObject *self, PyObject *cfg) {
    if (!PyDict_Check(cfg)) {
        PyErr_SetString(PyExc_TypeError, "configure(dict)");
        return NULL;
    }
    struct {
        PyObject **slot;
        const char *name;
    } objs[] = {
        {&g_split, "launch_split"},     {&g_run_now, "run_now"},     {&g_failed, "failed"},
        {&g_bind, "bind"},              {&g_cannot_report, "cannot_report"},
        {&g_ready_buf, "ready_buf"},    {&g_alloc_type, "alloc_type"},
        {&g_account_type, "account_type"}, {&g_unpack, "unpack"},
    };
    for (size_t i = 0; i < sizeof objs / sizeof objs[0]; i++) {
        PyObject *v = cfg_item(cfg, objs[i].name);
        if (!v) return NULL;
        Py_XSETREF(*objs[i].slot, Py_NewRef(v));
    }
    long long plan_max, max_handles;
    if (cfg_ll(cfg, "plan_max_payload", &plan_max) < 0 || cfg_ll(cfg, "max_handles", &max_handles) < 0 ||
        cfg_ll(cfg, "max_handle", &g_max_handle) < 0 || cfg_ll(cfg, "handle_cost", &g_handle_cost) < 0 ||
        cfg_ll(cfg, "max_alloc", &g_max_alloc) < 0 || cfg_ll(cfg, "flag_sync", &g_flag_sync) < 0 ||
        cfg_ll(cfg, "launch_op", &g_launch_op) < 0 || cfg_ll(cfg, "sqe_size", &g_sqe_size) < 0)
        return NULL;
    g_plan_max = (Py_ssize_t)plan_max;
    g_max_handles = (Py_ssize_t)max_handles;
    if (!g_one && !(g_one = PyLong_FromLong(1))) return NULL;
    g_ready = 1;
    Py_RETURN_NONE;
}

static PyMethodDef methods[] = {
    {"run_hot", (PyCFunction)(void (*)(void))run_hot, METH_FASTCALL,
     "run_hot(session, stream, record) -> bool: handlers/launch.py run_hot, in C"},
    {"drain_batch", (PyCFunction)(void (*)(void))drain_batch, METH_FASTCALL,
     "drain_batch(session, buffer, n): Session.drain's loop, its hot launches in C"},
    {"configure", configure, METH_O, "configure(dict): the objects the hot path works on"},
    {NULL, NULL, 0, NULL},
};

static int intern_names(void) {
    struct {
        PyObject **slot;
        const char *name;
    } names[] = {
        {&s_seg, "seg"},
        {&s_arena, "_arena"},
        {&s_plans, "plans"},
        {&s_dead, "dead"},
        {&s_n_in, "n_in"},
        {&s_slots, "slots"},
        {&s_outputs, "outputs"},
        {&s_out_keys, "out_keys"},
        {&s_handles, "handles"},
        {&s_h, "_h"},
        {&s_device_stream, "device_stream"},
        {&s_mem, "mem"},
        {&s_account, "account"},
        {&s_limit, "limit"},
        {&s_used, "used"},
        {&s_peak, "peak"},
        {&s_parent, "parent"},
        {&s_ref, "ref"},
        {&s_tables, "tables"},
        {&s_buf, "buf"},
        {&s_result, "result"},
        {&s_view, "view"},
        {&s_mutable, "mutable"},
        {&s_key, "key"},
        {&s_daemon, "daemon"},
        {&s_backend, "backend"},
        {&s_run_plan, "run_plan"},
        {&s_alloc, "alloc"},
        {&s_failed, "failed"},
        {&s_reply_sync, "reply_sync"},
        {&s_busy_s, "busy_s"},
        {&s_ops_done, "ops_done"},
        {&s_launches, "launches"},
        {&s_latency_observe, "latency_observe"},
        {&s_drain_t, "_drain_t"},
        {&s_uncharge, "uncharge"},
        {&s_kill, "kill"},
        {&s_streams, "streams"},
        {&s_capturing, "capturing"},
        {&s_queue, "queue"},
        {&s_fail, "fail"},
        {&s_prepare, "prepare"},
    };
    for (size_t i = 0; i < sizeof names / sizeof names[0]; i++) {
        if (*names[i].slot) continue;
        *names[i].slot = PyUnicode_InternFromString(names[i].name);
        if (!*names[i].slot) return -1;
    }
    return 0;
}

static int install(PyObject *ns) {
    if (!PyDict_Check(ns) || intern_names() < 0) return -1;
    for (PyMethodDef *m = methods; m->ml_name; m++) {
        PyObject *f = PyCFunction_New(m, NULL);
        if (!f || PyDict_SetItemString(ns, m->ml_name, f) < 0) {
            Py_XDECREF(f);
            return -1;
        }
        Py_DECREF(f);
    }
    return 0;
}

/* cffi calls this with the GIL released: take it */
int fxh_install(uint64_t dict_addr) {
    PyGILState_STATE g = PyGILState_Ensure();
    int rc = install((PyObject *)(uintptr_t)dict_addr);
    if (rc < 0) PyErr_Clear();
    PyGILState_Release(g);
    return rc;
}
