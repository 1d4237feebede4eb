// The daemon's compiled executor for planned table launches (flexnpu/daemon/optable TablePlan).
//
// Python validates a launch structure once (make_plan) and, on a plan's first launch that
// writes its result in place, records the one ATen operator its entry calls (record, below).
// From then on a launch of that plan runs here: views of the client's allocations at this
// launch's offsets, the byte-range overlap test of the destination against every other
// tensor, the operator through the dispatcher. Nothing here reports an error: any launch
// this code is not sure of (an offset out of bounds or misaligned, a destination that
// overlaps an input, a buffer of another device or dtype) returns false and Python runs it
// on its own path, which has every check and every error message. So this file adds speed,
// never a decision.
#include <torch/extension.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/record_function.h>
#include <torch/csrc/autograd/python_variable.h>
#include <torch/csrc/jit/python/pybind_utils.h>

#include <cstdint>
#include <limits>
#include <optional>
#include <string>
#include <vector>

namespace py = pybind11;

namespace {

// One tensor of the launch (a TablePlan Slot): its layout; the storage offset comes per launch.
struct Slot {
  c10::ScalarType dtype;
  std::vector<int64_t> sizes, strides;
  int64_t itemsize;
  int64_t reach;  // elements from the first to the last the view touches
  bool empty;
};

// Where each schema argument of the operator comes from.
enum class Src { Fixed, Slot, SlotList };
struct Arg {
  Src src;
  c10::IValue fixed;          // Src::Fixed
  int64_t k = -1;             // Src::Slot
  std::vector<int64_t> ks;    // Src::SlotList
};

constexpr int64_t kMaxOffset = int64_t(1) << 48;  // optable._MAX_DIM's order: beyond, Python decides

// The ATen calls made while a plan's entry runs once (record): the outermost ones only, with
// every argument as the dispatcher boxed it (schema order, out= included). RecordFunction
// callbacks are plain function pointers, so the recording lives in thread-local state.
struct Call {
  std::optional<c10::OperatorName> name;
  std::vector<c10::IValue> inputs;
};
thread_local std::vector<Call>* t_calls = nullptr;
thread_local int t_depth = 0;

std::unique_ptr<at::ObserverContext> on_enter(const at::RecordFunction& fn) {
  if (t_calls != nullptr && t_depth++ == 0) {
    Call c;
    c.name = fn.operator_name();
    auto in = fn.inputs();
    c.inputs.assign(in.begin(), in.end());
    t_calls->push_back(std::move(c));
  }
  return nullptr;
}

void on_exit(const at::RecordFunction&, at::ObserverContext*) {
  if (t_calls != nullptr) t_depth--;
}

class Exec {
 public:
  Exec(c10::OperatorHandle op, std::vector<Slot> slots, std::vector<Arg> args, int64_t dest)
      : op_(std::move(op)), slots_(std::move(slots)), args_(std::move(args)), dest_(dest) {}

  // Run `run()` (the entry's in-place call over `views`, one per slot) once while recording the
  // ATen calls it makes. Returns (run's result, an Exec repeating the call, or None where it
  // cannot be repeated exactly): one outermost call, whose one written argument is
  // views[dest], whose every tensor argument is one of the views (by identity) or a number
  // torch wrapped for the call, and whose other arguments are values. (Composite operators
  // record as themselves: Matmul replays aten::matmul.out, which decomposes as it did.)
  static py::tuple record(py::object run, std::vector<at::Tensor> views, py::list layouts, int64_t dest) {
    std::vector<Call> calls;
    at::RecordFunctionCallback cb(on_enter, on_exit);
    cb.needsInputs(true).scopes({at::RecordScope::FUNCTION});
    t_calls = &calls;
    t_depth = 0;
    auto handle = at::addThreadLocalCallback(cb);
    py::object result;
    try {
      result = run();
    } catch (...) {
      at::removeCallback(handle);
      t_calls = nullptr;
      throw;
    }
    at::removeCallback(handle);
    t_calls = nullptr;
    std::optional<Exec> ex = of(calls, views, layouts, dest);
    return py::make_tuple(result, ex ? py::cast(std::move(*ex)) : py::none());
  }

 private:
  static std::optional<Exec> of(const std::vector<Call>& calls, const std::vector<at::Tensor>& views,
                                py::list layouts, int64_t dest) {
    if (calls.size() != 1 || !calls[0].name) return std::nullopt;
    const Call& c = calls[0];
    auto op = c10::Dispatcher::singleton().findOp(*c.name);
    if (!op) return std::nullopt;
    const auto& params = op->schema().arguments();
    if (params.size() != c.inputs.size() || (size_t)py::len(layouts) != views.size()) return std::nullopt;
    if (dest < 0 || dest >= (int64_t)views.size()) return std::nullopt;
    std::vector<Slot> slots;
    for (auto l : layouts) {
      auto t = l.cast<py::tuple>();
      Slot sl;
      sl.dtype = t[0].cast<at::ScalarType>();
      sl.sizes = t[1].cast<std::vector<int64_t>>();
      sl.strides = t[2].cast<std::vector<int64_t>>();
      sl.itemsize = c10::elementSize(sl.dtype);
      sl.reach = 0;
      sl.empty = false;
      if (sl.sizes.size() != sl.strides.size()) return std::nullopt;
      for (size_t i = 0; i < sl.sizes.size(); i++) {
        // (Python validated these layouts: check_view_bounds. Checked again, so that no
        // layout can make the per-launch bounds arithmetic overflow.)
        if (sl.sizes[i] < 0 || sl.strides[i] < 0) return std::nullopt;
        if (sl.sizes[i] == 0) sl.empty = true;
        int64_t step = 0;
        if (sl.sizes[i] > 1 && (__builtin_mul_overflow(sl.sizes[i] - 1, sl.strides[i], &step) ||
                                __builtin_add_overflow(sl.reach, step, &sl.reach)))
          return std::nullopt;
      }
      int64_t span = 0;
      if (__builtin_mul_overflow(sl.reach + 1, sl.itemsize, &span) || span > (int64_t(1) << 62)) return std::nullopt;
      slots.push_back(std::move(sl));
    }
    if (slots[dest].empty) return std::nullopt;
    auto slot_of = [&](const at::Tensor& t) -> int64_t {
      for (size_t k = 0; k < views.size(); k++)
        if (views[k].unsafeGetTensorImpl() == t.unsafeGetTensorImpl()) return (int64_t)k;
      return -1;
    };
    std::vector<Arg> args;
    int written = 0;
    for (size_t i = 0; i < params.size(); i++) {
      const c10::IValue& v = c.inputs[i];
      const auto* alias = params[i].alias_info();
      if (alias != nullptr && alias->isWrite()) {
        if (!v.isTensor() || slot_of(v.toTensor()) != dest) return std::nullopt;
        written++;
      }
      Arg a;
      if (v.isTensor()) {
        const at::Tensor& t = v.toTensor();
        int64_t k = slot_of(t);
        if (k >= 0) {
          a.src = Src::Slot;
          a.k = k;
        } else if (t.unsafeGetTensorImpl()->is_wrapped_number()) {
          a.src = Src::Fixed;  // a Python number torch wrapped for the call (Muls' scalar)
          a.fixed = v;
        } else {
          return std::nullopt;  // a tensor the entry made: not per launch
        }
      } else if (v.isTensorList()) {
        a.src = Src::SlotList;
        for (const at::Tensor& t : v.toTensorVector()) {
          int64_t k = slot_of(t);
          if (k < 0) return std::nullopt;
          a.ks.push_back(k);
        }
      } else if (v.isIntList() || v.isDoubleList() || v.isBoolList()) {
        a.src = Src::Fixed;  // (Mean's dims)
        a.fixed = v;
      } else if (v.isList() || v.isGenericDict() || v.isTuple() || v.isObject() || v.isOptionalTensorList()) {
        return std::nullopt;  // (containers that might hold tensors: not repeated)
      } else {
        a.src = Src::Fixed;
        a.fixed = v;
      }
      args.push_back(std::move(a));
    }
    if (written != 1) return std::nullopt;
    return Exec(*op, std::move(slots), std::move(args), dest);
  }

 public:
  // One launch: bufs[k] is the 1-D uint8 allocation of tensor k, offsets[k] its element offset.
  // True: it ran. False: nothing ran; Python runs the launch on its own path. (Sequences of
  // Python objects, not converted vectors: an offset no int64 holds, or anything not a
  // tensor, is a launch for Python's checks to report, not a conversion error from here.)
  bool run(py::handle bufs_obj, py::handle offsets_obj) {
    const size_t n = slots_.size();
    py::object bseq = py::reinterpret_steal<py::object>(PySequence_Fast(bufs_obj.ptr(), "bufs"));
    py::object oseq = py::reinterpret_steal<py::object>(PySequence_Fast(offsets_obj.ptr(), "offsets"));
    if (!bseq || !oseq) {
      PyErr_Clear();
      return false;
    }
    if ((size_t)PySequence_Fast_GET_SIZE(bseq.ptr()) != n || (size_t)PySequence_Fast_GET_SIZE(oseq.ptr()) != n)
      return false;
    PyObject** bitems = PySequence_Fast_ITEMS(bseq.ptr());
    PyObject** oitems = PySequence_Fast_ITEMS(oseq.ptr());
    // (locals, not members: nothing here is shared between calls, even with the GIL released)
    std::vector<at::Tensor> views;
    views.reserve(n);
    std::vector<uintptr_t> lo(n), hi(n);
    for (size_t k = 0; k < n; k++) {
      const Slot& sl = slots_[k];
      if (!THPVariable_Check(bitems[k]) || !PyLong_CheckExact(oitems[k])) return false;
      const at::Tensor& b = THPVariable_Unpack(bitems[k]);
      int overflow = 0;
      long long off = PyLong_AsLongLongAndOverflow(oitems[k], &overflow);
      if (overflow) return false;
      if (!b.defined() || b.scalar_type() != at::kByte || b.dim() != 1 || !b.is_contiguous() ||
          b.device().type() != c10::DeviceType::CPU)
        return false;
      if (off < 0 || off > kMaxOffset) return false;
      int64_t nbytes = b.numel();
      int64_t end = (sl.empty ? off : off + sl.reach + 1) * sl.itemsize;
      if (end > nbytes) return false;
      int64_t byte_off = b.storage_offset() + off * sl.itemsize;
      if (byte_off % sl.itemsize) return false;
      // the view as set_ makes it, without set_'s trip through the dispatcher and a throwaway
      // empty tensor: a TensorImpl over the allocation's storage (same dispatch keys)
      auto impl = c10::make_intrusive<c10::TensorImpl>(c10::Storage(b.storage()), b.key_set(),
                                                       c10::scalarTypeToTypeMeta(sl.dtype));
      impl->set_sizes_and_strides(sl.sizes, sl.strides, byte_off / sl.itemsize);
      at::Tensor v(std::move(impl));
      auto p = reinterpret_cast<uintptr_t>(b.data_ptr()) + (uintptr_t)(off * sl.itemsize);
      lo[k] = p;
      hi[k] = sl.empty ? p : p + (uintptr_t)((sl.reach + 1) * sl.itemsize);
      views.push_back(std::move(v));
    }
    // Written in place, a destination that shares bytes with an input would be read after
    // being written: Python's path computes first and copies then.
    for (size_t k = 0; k < n; k++) {
      if ((int64_t)k == dest_ || slots_[k].empty) continue;
      if (lo[k] < hi[dest_] && lo[dest_] < hi[k]) return false;
    }
    torch::jit::Stack stack;
    stack.reserve(args_.size());
    for (const Arg& a : args_) {
      switch (a.src) {
        case Src::Fixed:
          stack.push_back(a.fixed);
          break;
        case Src::Slot:
          stack.emplace_back(views[a.k]);
          break;
        case Src::SlotList: {
          std::vector<at::Tensor> l;
          l.reserve(a.ks.size());
          for (auto k : a.ks) l.push_back(views[k]);
          stack.emplace_back(c10::List<at::Tensor>(std::move(l)));
          break;
        }
      }
    }
    {
      py::gil_scoped_release nogil;  // the control thread may run while the operator does
      op_.callBoxed(&stack);
    }
    runs_++;
    return true;
  }

  std::string name() const { return c10::toString(op_.operator_name()); }
  int64_t runs() const { return runs_; }

 private:
  c10::OperatorHandle op_;
  std::vector<Slot> slots_;
  std::vector<Arg> args_;
  int64_t dest_;
  int64_t runs_ = 0;
};

}  // namespace

// the planned aten launches' executor (flexnpu/daemon/backends/atenexec.cpp), in this module
void register_aten_exec(py::module_& m);

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "FlexNPU daemon: compiled execution of planned table and aten launches";
  register_aten_exec(m);
  py::class_<Exec>(m, "Exec")
      .def("run", &Exec::run, py::arg("bufs"), py::arg("offsets"))
      .def_property_readonly("name", &Exec::name)
      .def_property_readonly("runs", &Exec::runs);
  m.def("record", &Exec::record, py::arg("run"), py::arg("views"), py::arg("layouts"), py::arg("dest"));
}
