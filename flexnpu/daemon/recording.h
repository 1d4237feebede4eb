// What the daemon's two compiled executors share (optable/planexec.cpp, backends/atenexec.cpp):
// recording the ATen calls a Python callable makes, once, with torch's RecordFunction observer;
// where each argument of a recorded call comes from and the boxed stack that repeats it; the
// bounds arithmetic of a view's layout. Header-only, included by both translation units of the
// one module daemon/compiled.py builds.
#pragma once

#include <torch/extension.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/record_function.h>

#include <optional>
#include <vector>

namespace flexnpu_recording {

// One outermost ATen call: the operator and every argument as the dispatcher boxed it (schema
// order, out= included).
struct Call {
  std::optional<c10::OperatorName> name;
  std::vector<c10::IValue> inputs;
};

// RecordFunction callbacks are plain function pointers, so the recording lives in
// thread-local state (inline: one instance for the whole module).
inline thread_local std::vector<Call>* t_calls = nullptr;
inline thread_local int t_depth = 0;

inline std::unique_ptr<at::ObserverContext> on_enter(const at::RecordFunction& fn) {
  if (t_calls != nullptr && t_depth++ == 0) {
    Call c;
    c.name = fn.operator_name();
    auto in = fn.inputs();
    c.inputs.assign(in.begin(), in.end());
    t_calls->push_back(std::move(c));
  }
  return nullptr;
}

inline void on_exit(const at::RecordFunction&, at::ObserverContext*) {
  if (t_calls != nullptr) t_depth--;
}

// Run `run()` once while recording the outermost ATen calls it makes into `calls`; returns its
// result (an exception from run() propagates, the observer removed).
inline pybind11::object record_calls(pybind11::object run, std::vector<Call>& calls) {
  at::RecordFunctionCallback cb(on_enter, on_exit);
  cb.needsInputs(true).scopes({at::RecordScope::FUNCTION});
  t_calls = &calls;
  t_depth = 0;
  auto handle = at::addThreadLocalCallback(cb);
  pybind11::object result;
  try {
    result = run();
  } catch (...) {
    at::removeCallback(handle);
    t_calls = nullptr;
    throw;
  }
  at::removeCallback(handle);
  t_calls = nullptr;
  return result;
}

// The one outermost call recorded, if there was exactly one, of an operator the dispatcher
// knows, with one value per schema argument.
inline std::optional<c10::OperatorHandle> single_call(const std::vector<Call>& calls) {
  if (calls.size() != 1 || !calls[0].name) return std::nullopt;
  auto op = c10::Dispatcher::singleton().findOp(*calls[0].name);
  if (!op || op->schema().arguments().size() != calls[0].inputs.size()) return std::nullopt;
  return op;
}

// Which of `views` `t` is (by identity), or -1.
inline int64_t slot_of(const std::vector<at::Tensor>& views, const at::Tensor& t) {
  for (size_t k = 0; k < views.size(); k++)
    if (views[k].unsafeGetTensorImpl() == t.unsafeGetTensorImpl()) return (int64_t)k;
  return -1;
}

// How many elements past its first a layout reaches, and whether it is empty; false where the
// ranks differ, a size or stride is negative, or the arithmetic would overflow. (Python
// validated the layouts, check_view_bounds; checked again so that no layout can make the
// per-launch bounds arithmetic overflow.)
inline bool layout_reach(const std::vector<int64_t>& sizes, const std::vector<int64_t>& strides, int64_t& reach,
                         bool& empty) {
  reach = 0;
  empty = false;
  if (sizes.size() != strides.size()) return false;
  for (size_t i = 0; i < sizes.size(); i++) {
    if (sizes[i] < 0 || strides[i] < 0) return false;
    if (sizes[i] == 0) empty = true;
    int64_t step = 0;
    if (sizes[i] > 1 &&
        (__builtin_mul_overflow(sizes[i] - 1, strides[i], &step) || __builtin_add_overflow(reach, step, &reach)))
      return false;
  }
  return true;
}

// Where each schema argument of a repeated operator comes from: a value fixed at recording, the
// view of one slot, or a list of slots' views.
enum class Src { Fixed, Slot, SlotList };
struct Arg {
  Src src = Src::Fixed;
  c10::IValue fixed;        // Src::Fixed
  int64_t k = -1;           // Src::Slot
  std::vector<int64_t> ks;  // Src::SlotList
};

// The boxed arguments of one repetition: `args` with this launch's views in the slots.
inline torch::jit::Stack build_stack(const std::vector<Arg>& args, const std::vector<at::Tensor>& views) {
  torch::jit::Stack stack;
  stack.reserve(args.size());
  for (const Arg& a : args) {
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
  return stack;
}

}  // namespace flexnpu_recording
