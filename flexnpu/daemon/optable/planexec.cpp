// The daemon's compiled executor for planned table launches (flexnpu/daemon/optable TablePlan).
//
// Python validates a launch structure once (make_plan) and, on a plan's first launch that
// writes its result in place, records the one ATen operator its entry calls (recorder.py).
// From then on a launch of that plan runs here: views of the client's allocations at this
// launch's offsets, the byte-range overlap test of the destination against every other
// tensor, the operator through the dispatcher. Nothing here reports an error: any launch
// this code is not sure of (an offset out of bounds or misaligned, a destination that
// overlaps an input, a buffer of another device or dtype) returns false and Python runs it
// on its own path, which has every check and every error message. So this file adds speed,
// never a decision.
#include <torch/extension.h>
#include <ATen/ScalarOps.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/csrc/autograd/python_variable.h>
#include <torch/csrc/jit/python/pybind_utils.h>

#include <cstdint>
#include <limits>
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

class Exec {
 public:
  Exec(const std::string& name, const std::string& overload, py::list slots, py::list args, int64_t dest)
      : op_(c10::Dispatcher::singleton().findSchemaOrThrow(name.c_str(), overload.c_str())), dest_(dest) {
    const auto& schema = op_.schema();
    for (auto s : slots) {
      auto t = s.cast<py::tuple>();
      Slot sl;
      sl.dtype = t[0].cast<at::ScalarType>();
      sl.sizes = t[1].cast<std::vector<int64_t>>();
      sl.strides = t[2].cast<std::vector<int64_t>>();
      sl.itemsize = c10::elementSize(sl.dtype);
      sl.reach = 0;
      sl.empty = false;
      for (size_t i = 0; i < sl.sizes.size(); i++) {
        if (sl.sizes[i] == 0) sl.empty = true;
        if (sl.sizes[i] > 1) sl.reach += (sl.sizes[i] - 1) * sl.strides[i];
      }
      slots_.push_back(std::move(sl));
    }
    if ((int64_t)schema.arguments().size() != (int64_t)py::len(args))
      throw std::invalid_argument("argument count differs from the schema's");
    if (dest_ < 0 || dest_ >= (int64_t)slots_.size() || slots_[dest_].empty)
      throw std::invalid_argument("no destination slot");
    size_t i = 0;
    for (auto a : args) {
      auto t = a.cast<py::tuple>();
      auto kind = t[0].cast<std::string>();
      Arg arg;
      if (kind == "slot") {
        arg.src = Src::Slot;
        arg.k = t[1].cast<int64_t>();
        check_slot(arg.k);
      } else if (kind == "slots") {
        arg.src = Src::SlotList;
        arg.ks = t[1].cast<std::vector<int64_t>>();
        for (auto k : arg.ks) check_slot(k);
      } else if (kind == "value") {
        arg.src = Src::Fixed;
        const auto& type = schema.arguments()[i].real_type();
        PyObject* v = t[1].ptr();
        if (type->kind() == c10::TypeKind::TensorType &&
            (PyFloat_Check(v) || PyLong_Check(v) || PyComplex_Check(v))) {
          // a Python number where the schema has a Tensor (Muls' scalar): wrapped as torch's
          // argument parser wraps it, so type promotion treats it as the scalar it is
          at::Tensor w = c10::scalar_to_tensor(torch::jit::toIValue(t[1], c10::NumberType::get()).toScalar());
          w.unsafeGetTensorImpl()->set_wrapped_number(true);
          arg.fixed = w;
        } else {
          arg.fixed = torch::jit::toIValue(t[1], type);
        }
      } else {
        throw std::invalid_argument("unknown argument kind " + kind);
      }
      args_.push_back(std::move(arg));
      i++;
    }
  }

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
    views_.clear();
    views_.reserve(n);
    lo_.resize(n);
    hi_.resize(n);
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
      at::Tensor v = at::empty({0}, b.options().dtype(sl.dtype));
      v.set_(b.storage(), byte_off / sl.itemsize, sl.sizes, sl.strides);
      auto p = reinterpret_cast<uintptr_t>(b.data_ptr()) + (uintptr_t)(off * sl.itemsize);
      lo_[k] = p;
      hi_[k] = sl.empty ? p : p + (uintptr_t)((sl.reach + 1) * sl.itemsize);
      views_.push_back(std::move(v));
    }
    // Written in place, a destination that shares bytes with an input would be read after
    // being written: Python's path computes first and copies then.
    for (size_t k = 0; k < n; k++) {
      if ((int64_t)k == dest_ || slots_[k].empty) continue;
      if (lo_[k] < hi_[dest_] && lo_[dest_] < hi_[k]) return false;
    }
    stack_.clear();
    stack_.reserve(args_.size());
    for (const Arg& a : args_) {
      switch (a.src) {
        case Src::Fixed:
          stack_.push_back(a.fixed);
          break;
        case Src::Slot:
          stack_.emplace_back(views_[a.k]);
          break;
        case Src::SlotList: {
          std::vector<at::Tensor> l;
          l.reserve(a.ks.size());
          for (auto k : a.ks) l.push_back(views_[k]);
          stack_.emplace_back(c10::List<at::Tensor>(std::move(l)));
          break;
        }
      }
    }
    {
      py::gil_scoped_release nogil;  // the control thread may run while the operator does
      op_.callBoxed(&stack_);
    }
    stack_.clear();
    views_.clear();
    runs_++;
    return true;
  }

  std::string name() const { return c10::toString(op_.operator_name()); }
  int64_t runs() const { return runs_; }

 private:
  void check_slot(int64_t k) const {
    if (k < 0 || k >= (int64_t)slots_.size()) throw std::invalid_argument("slot out of range");
  }

  c10::OperatorHandle op_;
  std::vector<Slot> slots_;
  std::vector<Arg> args_;
  int64_t dest_;
  int64_t runs_ = 0;
  // per launch, kept to reuse their capacity
  std::vector<at::Tensor> views_;
  std::vector<uintptr_t> lo_, hi_;
  torch::jit::Stack stack_;
};

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "FlexNPU daemon: compiled execution of planned table launches";
  py::class_<Exec>(m, "Exec")
      .def(py::init<const std::string&, const std::string&, py::list, py::list, int64_t>(), py::arg("name"),
           py::arg("overload"), py::arg("slots"), py::arg("args"), py::arg("dest"))
      .def("run", &Exec::run, py::arg("bufs"), py::arg("offsets"))
      .def_property_readonly("name", &Exec::name)
      .def_property_readonly("runs", &Exec::runs);
}
