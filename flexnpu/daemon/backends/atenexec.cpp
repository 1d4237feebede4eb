// The daemon's compiled executor for planned aten launches (torch_exec.LaunchPlan: the Python
// front end's operators). Compiled into the same module as optable/planexec.cpp
// (daemon/compiled.py builds both).
//
// A plan's first launch runs in Python while torch's RecordFunction observer records the one
// ATen call it makes (record, below). If that call can be repeated exactly (every tensor
// argument one of the launch's views, by identity, or a number torch wrapped; every written
// argument a slot the plan marks mutable; the other arguments values), later launches of the
// plan run here: a view per slot over its allocation (or the producer's own result tensor,
// Alloc.view, as Python does), bounds and alignment checked, the operator through the
// dispatcher, and the results bound as pending when they are exactly the declared outputs.
// Nothing here decides an error of the client's: any launch it is not sure of returns None
// before anything ran and Python runs it with every check and message; results it is not sure
// of go back to Python's binding (run_plan) as a tuple. So this file adds speed, never a
// decision. Plans without sizes (torch_exec.SizedLaunchPlan: a decode loop's growing cat and
// attention) record the same way and repeat with each launch's own layouts (run_sized), every
// layout validated here before anything runs. Views over an allocation use a non-owning,
// non-resizable storage of exactly its bytes, as torch_exec._raw_storage does: an operator
// cannot resize or reach past them.
#include <torch/extension.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/record_function.h>
#include <torch/csrc/autograd/python_variable.h>

#include "../recording.h"

#include <algorithm>
#include <cstdint>
#include <optional>
#include <string>
#include <vector>

namespace py = pybind11;

namespace {

using flexnpu_recording::Arg;
using flexnpu_recording::Call;
using flexnpu_recording::Src;

struct ASlot {
  c10::ScalarType dtype;
  std::vector<int64_t> sizes, strides;
  int64_t offset = 0, itemsize = 1, reach = 0;
  bool empty = false, mut = false;
  py::object key;  // layout_key(ref): compared with a hint's (Alloc.view[1])
};

struct AOut {
  int64_t nbytes = 0;
  c10::ScalarType dtype;
  std::vector<int64_t> strides;
  int64_t offset = 0;
  std::vector<int64_t> sizes;  // checked only where check_sizes (a sized launch's declaration)
  bool check_sizes = false;
};

constexpr int64_t kMaxDim = int64_t(1) << 48;

// Python's torch_exec.is_dense, exactly
bool is_dense(const at::Tensor& t) {
  if (t.is_contiguous()) return true;
  std::vector<std::pair<int64_t, int64_t>> dims;  // (stride, size) of dimensions of size > 1
  for (int64_t d = 0; d < t.dim(); d++)
    if (t.size(d) > 1) dims.emplace_back(t.stride(d), t.size(d));
  std::sort(dims.begin(), dims.end());
  int64_t expected = 1;
  for (auto& [st, size] : dims) {
    if (st != expected) return false;
    expected *= size;
  }
  return true;
}

[[noreturn]] void rethrow(const std::exception& e) {
  // the exception types torch's own Python binding raises for the same errors
  if (auto* x = dynamic_cast<const c10::IndexError*>(&e)) throw py::index_error(x->what_without_backtrace());
  if (auto* x = dynamic_cast<const c10::ValueError*>(&e)) throw py::value_error(x->what_without_backtrace());
  if (auto* x = dynamic_cast<const c10::TypeError*>(&e)) throw py::type_error(x->what_without_backtrace());
  if (auto* x = dynamic_cast<const c10::NotImplementedError*>(&e)) {
    PyErr_SetString(PyExc_NotImplementedError, x->what_without_backtrace());
    throw py::error_already_set();
  }
  if (auto* x = dynamic_cast<const c10::Error*>(&e)) throw std::runtime_error(x->what_without_backtrace());
  throw std::runtime_error(e.what());
}

// A Python int in [0, kMaxDim] (not a bool, not a subclass), as check_view_bounds accepts.
bool exact_int(PyObject* o, int64_t& v) {
  if (!PyLong_CheckExact(o)) return false;
  int overflow = 0;
  long long x = PyLong_AsLongLongAndOverflow(o, &overflow);
  if (overflow || (x == -1 && PyErr_Occurred())) {
    PyErr_Clear();
    return false;
  }
  if (x < 0 || x > kMaxDim) return false;
  v = x;
  return true;
}

// A TensorRef's layout (shape, stride, offset), read from the object.
struct Layout {
  py::object dtype, shape, stride, offset;

  bool of(PyObject* ref) {
    static PyObject* s_dtype = PyUnicode_InternFromString("dtype");
    static PyObject* s_shape = PyUnicode_InternFromString("shape");
    static PyObject* s_stride = PyUnicode_InternFromString("stride");
    static PyObject* s_offset = PyUnicode_InternFromString("offset");
    PyObject* v[4] = {PyObject_GetAttr(ref, s_dtype), PyObject_GetAttr(ref, s_shape), PyObject_GetAttr(ref, s_stride),
                      PyObject_GetAttr(ref, s_offset)};
    dtype = py::reinterpret_steal<py::object>(v[0]);
    shape = py::reinterpret_steal<py::object>(v[1]);
    stride = py::reinterpret_steal<py::object>(v[2]);
    offset = py::reinterpret_steal<py::object>(v[3]);
    if (!v[0] || !v[1] || !v[2] || !v[3]) {
      PyErr_Clear();
      return false;
    }
    return true;
  }

  // whether `key` (an Alloc.view's layout key) is (dtype, shape, stride, offset); -1: unsure
  int is_key(PyObject* key) const {
    if (!PyTuple_CheckExact(key) || PyTuple_GET_SIZE(key) != 4) return 0;
    PyObject* mine[4] = {dtype.ptr(), shape.ptr(), stride.ptr(), offset.ptr()};
    for (int i = 0; i < 4; i++) {
      int same = PyObject_RichCompareBool(PyTuple_GET_ITEM(key, i), mine[i], Py_EQ);
      if (same < 0) {
        PyErr_Clear();
        return -1;
      }
      if (!same) return 0;
    }
    return 1;
  }

  // the shape and stride as ints, as many of each, at most 64 (torch_exec._MAX_NDIM)
  bool ints(std::vector<int64_t>& sizes, std::vector<int64_t>& strides) const {
    if (!PyTuple_CheckExact(shape.ptr()) || !PyTuple_CheckExact(stride.ptr())) return false;
    Py_ssize_t nd = PyTuple_GET_SIZE(shape.ptr());
    if (nd != PyTuple_GET_SIZE(stride.ptr()) || nd > 64) return false;
    sizes.resize(nd);
    strides.resize(nd);
    for (Py_ssize_t i = 0; i < nd; i++)
      if (!exact_int(PyTuple_GET_ITEM(shape.ptr(), i), sizes[i]) ||
          !exact_int(PyTuple_GET_ITEM(stride.ptr(), i), strides[i]))
        return false;
    return true;
  }
};

class AtenExec {
 public:
  AtenExec(c10::OperatorHandle op, std::vector<ASlot> slots, std::vector<Arg> args, std::vector<AOut> outs)
      : op_(std::move(op)), slots_(std::move(slots)), args_(std::move(args)), outs_(std::move(outs)) {}

  // Run `run()` (the plan's operator over `views`, one fresh view per slot) once, recording the
  // ATen calls it makes: (run's result, an AtenExec repeating it, or None). `slots`: per slot
  // (dtype, shape, stride, offset, mutable, layout key); `outs`: per declared output (nbytes,
  // dtype, stride, offset).
  static py::tuple record(py::object run, std::vector<at::Tensor> views, py::list slots, py::list outs) {
    std::vector<Call> calls;
    py::object result = flexnpu_recording::record_calls(run, calls);
    std::optional<AtenExec> ex = of(calls, views, slots, outs);
    return py::make_tuple(result, ex ? py::cast(std::move(*ex)) : py::none());
  }

 private:
  static std::optional<AtenExec> of(const std::vector<Call>& calls, const std::vector<at::Tensor>& views,
                                    py::list slots_in, py::list outs_in) {
    auto op = flexnpu_recording::single_call(calls);
    if (!op) return std::nullopt;
    const Call& c = calls[0];
    const auto& params = op->schema().arguments();
    if ((size_t)py::len(slots_in) != views.size()) return std::nullopt;
    std::vector<ASlot> slots;
    for (auto l : slots_in) {
      auto t = l.cast<py::tuple>();
      ASlot sl;
      sl.dtype = t[0].cast<at::ScalarType>();
      sl.sizes = t[1].cast<std::vector<int64_t>>();
      sl.strides = t[2].cast<std::vector<int64_t>>();
      sl.offset = t[3].cast<int64_t>();
      sl.mut = t[4].cast<bool>();
      sl.key = t[5];
      sl.itemsize = c10::elementSize(sl.dtype);
      if (sl.offset < 0 || sl.offset > kMaxDim) return std::nullopt;
      if (!flexnpu_recording::layout_reach(sl.sizes, sl.strides, sl.reach, sl.empty)) return std::nullopt;
      for (size_t i = 0; i < sl.sizes.size(); i++)
        if (sl.sizes[i] > kMaxDim || sl.strides[i] > kMaxDim) return std::nullopt;
      int64_t span = 0;
      if (__builtin_add_overflow(sl.offset, sl.reach, &span) || __builtin_mul_overflow(span + 1, sl.itemsize, &span) ||
          span > (int64_t(1) << 62))
        return std::nullopt;
      slots.push_back(std::move(sl));
    }
    std::vector<AOut> outs;
    for (auto l : outs_in) {
      auto t = l.cast<py::tuple>();
      AOut o;
      o.nbytes = t[0].cast<int64_t>();
      o.dtype = t[1].cast<at::ScalarType>();
      o.strides = t[2].cast<std::vector<int64_t>>();
      o.offset = t[3].cast<int64_t>();
      outs.push_back(std::move(o));
    }
    auto slot_of = [&](const at::Tensor& t) { return flexnpu_recording::slot_of(views, t); };
    std::vector<Arg> args;
    std::vector<bool> used(views.size(), false);
    for (size_t i = 0; i < params.size(); i++) {
      const c10::IValue& v = c.inputs[i];
      const auto* alias = params[i].alias_info();
      bool written = alias != nullptr && alias->isWrite();
      Arg a;
      if (v.isTensor()) {
        const at::Tensor& t = v.toTensor();
        int64_t k = slot_of(t);
        if (k >= 0) {
          if (written && !slots[k].mut) return std::nullopt;
          a.src = Src::Slot;
          a.k = k;
          used[k] = true;
        } else if (!written && t.unsafeGetTensorImpl()->is_wrapped_number()) {
          a.src = Src::Fixed;
          a.fixed = v;
        } else {
          return std::nullopt;  // a tensor made for the call: not per launch
        }
      } else if (v.isTensorList()) {
        if (written) return std::nullopt;
        a.src = Src::SlotList;
        for (const at::Tensor& t : v.toTensorVector()) {
          int64_t k = slot_of(t);
          if (k < 0) return std::nullopt;
          a.ks.push_back(k);
          used[k] = true;
        }
      } else if (written) {
        return std::nullopt;  // a written argument that is not a slot
      } else if (v.isIntList() || v.isDoubleList() || v.isBoolList()) {
        a.src = Src::Fixed;
        a.fixed = v;
      } else if (v.isList() || v.isGenericDict() || v.isTuple() || v.isObject() || v.isOptionalTensorList()) {
        return std::nullopt;  // (containers that might hold tensors: not repeated)
      } else {
        a.src = Src::Fixed;
        a.fixed = v;
      }
      args.push_back(std::move(a));
    }
    for (bool u : used)
      if (!u) return std::nullopt;  // a slot the call never read: not what Python passed
    return AtenExec(*op, std::move(slots), std::move(args), std::move(outs));
  }

 public:
  // One launch: bufs[k] the allocation of slot k (a 1-D uint8 tensor, or the pending result
  // that hints[k] names), hints[k] its Alloc.view. None: nothing ran (Python's path runs it).
  // A list of (None, result) pairs: ran, every result bound as the declared output, pending.
  // A tuple of result tensors: ran, Python binds them (run_plan).
  py::object run(py::handle bufs_obj, py::handle hints_obj) {
    const size_t n = slots_.size();
    py::object bseq = py::reinterpret_steal<py::object>(PySequence_Fast(bufs_obj.ptr(), "bufs"));
    py::object hseq = py::reinterpret_steal<py::object>(PySequence_Fast(hints_obj.ptr(), "hints"));
    if (!bseq || !hseq) {
      PyErr_Clear();
      return py::none();
    }
    if ((size_t)PySequence_Fast_GET_SIZE(bseq.ptr()) != n || (size_t)PySequence_Fast_GET_SIZE(hseq.ptr()) != n)
      return py::none();
    PyObject** bitems = PySequence_Fast_ITEMS(bseq.ptr());
    PyObject** hitems = PySequence_Fast_ITEMS(hseq.ptr());
    std::vector<at::Tensor> views;
    views.reserve(n);
    std::vector<std::pair<uintptr_t, uintptr_t>> ranges;  // the inputs' bytes (run_plan's in_ptrs)
    ranges.reserve(n + outs_.size());
    for (size_t k = 0; k < n; k++) {
      const ASlot& sl = slots_[k];
      const at::Tensor* bt = input_buffer(bitems[k], ranges);
      if (bt == nullptr) return py::none();
      const at::Tensor& b = *bt;
      auto bp = reinterpret_cast<uintptr_t>(b.data_ptr());
      PyObject* h = hitems[k];
      if (!sl.mut && PyTuple_CheckExact(h) && PyTuple_GET_SIZE(h) == 3 && PyTuple_GET_ITEM(h, 0) == bitems[k]) {
        int same = PyObject_RichCompareBool(PyTuple_GET_ITEM(h, 1), sl.key.ptr(), Py_EQ);
        if (same < 0) {
          PyErr_Clear();
          return py::none();
        }
        if (same && THPVariable_Check(PyTuple_GET_ITEM(h, 2))) {
          views.push_back(THPVariable_Unpack(PyTuple_GET_ITEM(h, 2)));  // the producer's result
          continue;
        }
      }
      if (b.scalar_type() != at::kByte || b.dim() != 1 || !b.is_contiguous()) return py::none();
      int64_t nbytes = b.numel();
      int64_t end = (sl.empty ? sl.offset : sl.offset + sl.reach + 1) * sl.itemsize;
      if (end > nbytes || bp % (uintptr_t)sl.itemsize) return py::none();
      c10::Storage st(c10::Storage::use_byte_size_t(), nbytes, c10::DataPtr(b.data_ptr(), b.device()), nullptr,
                      /*resizable=*/false);
      auto impl = c10::make_intrusive<c10::TensorImpl>(std::move(st), b.key_set(), c10::scalarTypeToTypeMeta(sl.dtype));
      impl->set_sizes_and_strides(sl.sizes, sl.strides, sl.offset);
      views.emplace_back(std::move(impl));
    }
    return call(views, ranges, outs_);
  }

  // One launch of a plan without sizes (torch_exec.SizedLaunchPlan): as run, but each slot's
  // layout is this launch's, refs[k] (a TensorRef), and the one output is declared by out_ref
  // and out_nbytes. The call recorded at the plan's first launch repeats for any sizes: its
  // fixed arguments are the plan's own, which its structure key holds; only the tensors' sizes
  // change. Every layout is validated here as check_view_bounds does, or nothing runs.
  py::object run_sized(py::handle bufs_obj, py::handle hints_obj, py::handle refs_obj, py::handle out_ref,
                       int64_t out_nbytes) {
    const size_t n = slots_.size();
    if (outs_.size() != 1) return py::none();
    py::object bseq = py::reinterpret_steal<py::object>(PySequence_Fast(bufs_obj.ptr(), "bufs"));
    py::object hseq = py::reinterpret_steal<py::object>(PySequence_Fast(hints_obj.ptr(), "hints"));
    py::object rseq = py::reinterpret_steal<py::object>(PySequence_Fast(refs_obj.ptr(), "refs"));
    if (!bseq || !hseq || !rseq) {
      PyErr_Clear();
      return py::none();
    }
    if ((size_t)PySequence_Fast_GET_SIZE(bseq.ptr()) != n || (size_t)PySequence_Fast_GET_SIZE(hseq.ptr()) != n ||
        (size_t)PySequence_Fast_GET_SIZE(rseq.ptr()) != n)
      return py::none();
    PyObject** bitems = PySequence_Fast_ITEMS(bseq.ptr());
    PyObject** hitems = PySequence_Fast_ITEMS(hseq.ptr());
    PyObject** ritems = PySequence_Fast_ITEMS(rseq.ptr());
    std::vector<at::Tensor> views;
    views.reserve(n);
    std::vector<std::pair<uintptr_t, uintptr_t>> ranges;
    ranges.reserve(n + 1);
    std::vector<int64_t> sizes, strides;
    for (size_t k = 0; k < n; k++) {
      const ASlot& sl = slots_[k];
      const at::Tensor* bt = input_buffer(bitems[k], ranges);
      if (bt == nullptr) return py::none();
      const at::Tensor& b = *bt;
      auto bp = reinterpret_cast<uintptr_t>(b.data_ptr());
      Layout lay;
      if (!lay.of(ritems[k])) return py::none();
      PyObject* h = hitems[k];
      if (!sl.mut && PyTuple_CheckExact(h) && PyTuple_GET_SIZE(h) == 3 && PyTuple_GET_ITEM(h, 0) == bitems[k]) {
        int same = lay.is_key(PyTuple_GET_ITEM(h, 1));
        if (same < 0) return py::none();
        if (same && THPVariable_Check(PyTuple_GET_ITEM(h, 2))) {
          views.push_back(THPVariable_Unpack(PyTuple_GET_ITEM(h, 2)));  // the producer's result
          continue;
        }
      }
      if (b.scalar_type() != at::kByte || b.dim() != 1 || !b.is_contiguous()) return py::none();
      if (!lay.ints(sizes, strides)) return py::none();
      int64_t offset = 0, reach = 0, end = 0;
      bool empty = false;
      if (!exact_int(lay.offset.ptr(), offset) || !flexnpu_recording::layout_reach(sizes, strides, reach, empty) ||
          __builtin_add_overflow(offset, empty ? 0 : reach + 1, &end) || __builtin_mul_overflow(end, sl.itemsize, &end))
        return py::none();
      if (end > b.numel() || bp % (uintptr_t)sl.itemsize) return py::none();
      c10::Storage st(c10::Storage::use_byte_size_t(), b.numel(), c10::DataPtr(b.data_ptr(), b.device()), nullptr,
                      /*resizable=*/false);
      auto impl = c10::make_intrusive<c10::TensorImpl>(std::move(st), b.key_set(), c10::scalarTypeToTypeMeta(sl.dtype));
      impl->set_sizes_and_strides(sizes, strides, offset);
      views.emplace_back(std::move(impl));
    }
    Layout lay;
    std::vector<AOut> outs(1);
    AOut& o = outs[0];
    o.nbytes = out_nbytes;
    o.dtype = outs_[0].dtype;
    o.check_sizes = true;
    if (!lay.of(out_ref.ptr()) || !lay.ints(o.sizes, o.strides) || !exact_int(lay.offset.ptr(), o.offset))
      return py::none();
    return call(views, ranges, outs);
  }

  // Slot k's buffer, a CPU tensor (its bytes appended to `ranges`), or nullptr
  static const at::Tensor* input_buffer(PyObject* item, std::vector<std::pair<uintptr_t, uintptr_t>>& ranges) {
    if (!THPVariable_Check(item)) return nullptr;
    const at::Tensor& b = THPVariable_Unpack(item);
    if (!b.defined() || b.device().type() != c10::DeviceType::CPU) return nullptr;
    auto bp = reinterpret_cast<uintptr_t>(b.data_ptr());
    ranges.emplace_back(bp, bp + (uintptr_t)b.nbytes());
    return &b;
  }

  // The recorded call over `views`, its results bound (bind_results)
  py::object call(const std::vector<at::Tensor>& views, std::vector<std::pair<uintptr_t, uintptr_t>>& ranges,
                  const std::vector<AOut>& outs) {
    torch::jit::Stack stack = flexnpu_recording::build_stack(args_, views);
    try {
      py::gil_scoped_release nogil;  // as torch's own binding of the operator
      op_.callBoxed(&stack);
    } catch (const py::error_already_set&) {
      throw;
    } catch (const std::exception& e) {
      rethrow(e);
    }
    runs_++;
    return bind_results(stack, ranges, outs);
  }

  // The results on `stack` after a call: a list of (None, result) pairs if each is exactly its
  // declared output in `outs` (storage its own, dense, in the declared layout: bound pending),
  // else a tuple of the result tensors for Python's binding. `ranges`: the inputs' bytes.
  static py::object bind_results(const torch::jit::Stack& stack, std::vector<std::pair<uintptr_t, uintptr_t>>& ranges,
                                 const std::vector<AOut>& outs) {
    std::vector<at::Tensor> results;
    for (const c10::IValue& v : stack) {
      if (v.isTensor()) {
        results.push_back(v.toTensor());
      } else if (v.isTensorList()) {
        for (const at::Tensor& t : v.toTensorVector()) results.push_back(t);
      }
    }
    if (outs.empty()) return py::list();
    bool fast = results.size() >= outs.size();
    std::vector<at::Tensor> bound;
    for (size_t i = 0; fast && i < outs.size(); i++) {
      const AOut& o = outs[i];
      const at::Tensor& r = results[i];
      if (!r.defined() || r.device().type() != c10::DeviceType::CPU || !r.has_storage()) {
        fast = false;
        break;
      }
      if (o.check_sizes && r.sizes().vec() != o.sizes) {
        fast = false;
        break;
      }
      const c10::Storage& st = r.storage();
      auto p = reinterpret_cast<uintptr_t>(st.data());
      auto size = (int64_t)st.nbytes();
      bool aliases = false;
      if (size)
        for (auto& [lo, hi] : ranges)
          if (p < hi && lo < p + (uintptr_t)size) aliases = true;
      if (aliases || size != o.nbytes || r.strides().vec() != o.strides || r.storage_offset() != o.offset ||
          r.scalar_type() != o.dtype || (int64_t)(r.numel() * r.element_size()) != o.nbytes || !is_dense(r)) {
        fast = false;
        break;
      }
      auto rp = reinterpret_cast<uintptr_t>(r.data_ptr());
      ranges.emplace_back(rp, rp + (uintptr_t)r.nbytes());  // outputs must not share
      bound.push_back(r);
    }
    if (!fast) {
      py::tuple t(results.size());
      for (size_t i = 0; i < results.size(); i++) t[i] = py::reinterpret_steal<py::object>(THPVariable_Wrap(results[i]));
      return std::move(t);
    }
    py::list out(outs.size());
    for (size_t i = 0; i < outs.size(); i++)
      out[i] = py::make_tuple(py::none(), py::reinterpret_steal<py::object>(THPVariable_Wrap(bound[i])));
    return std::move(out);
  }

  std::string name() const { return c10::toString(op_.operator_name()); }
  int64_t runs() const { return runs_; }

 private:
  c10::OperatorHandle op_;
  std::vector<ASlot> slots_;
  std::vector<Arg> args_;
  std::vector<AOut> outs_;
  int64_t runs_ = 0;
};

}  // namespace

void register_aten_exec(py::module_& m) {
  py::class_<AtenExec>(m, "AtenExec")
      .def("run", &AtenExec::run, py::arg("bufs"), py::arg("hints"))
      .def("run_sized", &AtenExec::run_sized, py::arg("bufs"), py::arg("hints"), py::arg("refs"), py::arg("out_ref"),
           py::arg("out_nbytes"))
      .def_property_readonly("name", &AtenExec::name)
      .def_property_readonly("runs", &AtenExec::runs);
  m.def("record_aten", &AtenExec::record, py::arg("run"), py::arg("views"), py::arg("slots"), py::arg("outs"));
}
