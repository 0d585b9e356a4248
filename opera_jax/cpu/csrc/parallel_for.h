// Spreading a kernel's independent items over XLA:CPU's intra-op threads (shared by the kernels in
// this folder; `cpu_kernels.py` rebuilds a kernel when this file changes).
#pragma once

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <functional>
#include <memory>
#include <thread>

#include "xla/ffi/api/ffi.h"

namespace opera {

// Runs f(0) .. f(items - 1) on the calling thread and the XLA:CPU intra-op pool. The caller claims items
// too, so the work finishes even if no pool thread ever starts; it returns once every claimed item is done.
inline void parallel_for(xla::ffi::ThreadPool& pool, long items, const std::function<void(long)>& f) {
  struct State {
    std::atomic<long> next{0}, done{0};
  };
  auto state = std::make_shared<State>();
  const long workers = std::min<long>(items, std::max<int64_t>(pool.num_threads(), 1)) - 1;
  auto work = [state, items, &f] {
    for (long i; (i = state->next.fetch_add(1)) < items;) {
      f(i);
      state->done.fetch_add(1, std::memory_order_release);
    }
  };
  for (long w = 0; w < workers; ++w) {
    pool.Schedule([state, items, work] {
      if (state->next.load() < items) work();
    });
  }
  work();
  while (state->done.load(std::memory_order_acquire) < items) std::this_thread::yield();
}

}  // namespace opera
