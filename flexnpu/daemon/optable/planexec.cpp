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

#include "../recording.h"
#include <torch/csrc/jit/python/pybind_utils.h>

#include <cstdint>
#include <limits>
#include <optional>
#include <string>
#include <vector>

namespace py = pybind11;

namespace {

using flexnpu_recording::Arg;
using flexnpu_recording::Call;
using flexnpu_recording::Src;

// One tensor of the launch (a TablePlan Slot): its layout; the storage offset comes per launch.
struct Slot {
  c10::ScalarType dtype;
  std::vector<int64_t> sizes, strides;
  int64_t itemsize;
  int64_t reach;  // elements from the first to the last the view touches
  bool empty;
};

constexpr int64_t kMaxOffset = int64_t(1) << 48;  // optable._MAX_DIM's order: beyond, Python decides

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
    py::object result = flexnpu_recording::record_calls(run, calls);
    std::optional<Exec> ex = of(calls, views, layouts, dest);
    return py::make_tuple(result, ex ? py::cast(std::move(*ex)) : py::none());
  }

 private:
  static std::optional<Exec> of(const std::vector<Call>& calls, const std::vector<at::Tensor>& views,
                                py::list layouts, int64_t dest) {
    auto op = flexnpu_recording::single_call(calls);
    if (!op) return std::nullopt;
    const Call& c = calls[0];
    const auto& params = op->schema().arguments();
    if ((size_t)py::len(layouts) != views.size()) return std::nullopt;
    if (dest < 0 || dest >= (int64_t)views.size()) return std::nullopt;
    std::vector<Slot> slots;
    for (auto l : layouts) {
      auto t = l.cast<py::tuple>();
      Slot sl;
      sl.dtype = t[0].cast<at::ScalarType>();
      sl.sizes = t[1].cast<std::vector<int64_t>>();
      sl.strides = t[2].cast<std::vector<int64_t>>();
      sl.itemsize = c10::elementSize(sl.dtype);
      if (!flexnpu_recording::layout_reach(sl.sizes, sl.strides, sl.reach, sl.empty)) return std::nullopt;
      int64_t span = 0;
      if (__builtin_mul_overflow(sl.reach + 1, sl.itemsize, &span) || span > (int64_t(1) << 62)) return std::nullopt;
      slots.push_back(std::move(sl));
    }
    if (slots[dest].empty) return std::nullopt;
    auto slot_of = [&](const at::Tensor& t) { return flexnpu_recording::slot_of(views, t); };
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
    torch::jit::Stack stack = flexnpu_recording::build_stack(args_, views);
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
