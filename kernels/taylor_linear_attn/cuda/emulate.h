// CPU emulation of the CUDA features based_fwd.cu uses, so that its index math, masks, fragment layouts and
// barrier placement can run on a machine without a GPU (tests/kernels/test_la_cuda.py):
//   g++ -std=c++17 -O1 -shared -fPIC -DBASED_LA_EMULATE -include emulate.h -x c++ based_fwd.cu -o emu.so
// Each CUDA thread is a ucontext coroutine; one CTA runs at a time, its threads switch only at barriers and
// warp collectives (ldmatrix, stmatrix, mma.sync, shuffles, __syncwarp), in an order set by
// BASED_LA_EMU_ORDER ("forward", "reverse": a race between warps shows up as a difference between the two).
// cp.async copies land only at the wait, so a read before the wait sees stale data. Fragment layouts follow
// the PTX ISA (mma.m16n8k16, ldmatrix .x4 with and without .trans, stmatrix .x4 .trans); ldmatrix, stmatrix
// and cp.async check that their shared addresses are 16-byte aligned and inside the CTA's shared memory. Not
// a model of timing or of memory ordering.

#pragma once

#include <ucontext.h>

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <utility>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__
#define __launch_bounds__(...)
#define __grid_constant__
#define LA_DEV inline
#define LA_UNROLL
#define LA_SMEM(name) unsigned char* name = emu::g_cta->smem.data()

typedef void* cudaStream_t;

struct uint4 {
  uint32_t x, y, z, w;
};
struct float4 {
  float x, y, z, w;
};
inline uint4 make_uint4(uint32_t x, uint32_t y, uint32_t z, uint32_t w) { return uint4{x, y, z, w}; }
using std::min;

namespace emu {

struct Dim {
  unsigned x = 0, y = 0, z = 0;
};

struct Pending {
  void* dst;
  const void* src;
  int bytes;
  bool valid;
};

struct Thread {
  ucontext_t ctx;
  std::vector<char> stack;
  Dim idx;
  bool done = false;
  std::vector<Pending> pending;
};

struct Barrier {
  int count = 0;
  unsigned gen = 0;
  int acc = 0, result = 0;
};

struct WarpSlots {
  Barrier bar;
  const void* ptr[32];
  uint32_t a[32][4];
  uint32_t b[32][2];
  float f[32];
};

struct Cta {
  std::vector<Thread> th;
  std::vector<unsigned char> smem;
  Barrier bar;
  std::vector<WarpSlots> warps;
};

inline Cta* g_cta = nullptr;
inline int g_cur = 0;
inline Dim g_block;
inline ucontext_t g_sched;
inline std::function<void()> g_body;
inline long long g_yields = 0;
inline int g_error = 0;

inline void fail(const char* what) {
  std::fprintf(stderr, "emulate.h: %s (block %u, thread %d)\n", what, g_block.x, g_cur);
  std::abort();
}

inline void yield() {
  if (++g_yields > 4000000000LL) fail("no progress (deadlock?)");
  swapcontext(&g_cta->th[g_cur].ctx, &g_sched);
}

inline int arrive(Barrier& b, int size, int pred) {
  const unsigned gen = b.gen;
  b.acc |= pred;
  if (++b.count == size) {
    b.result = b.acc;
    b.acc = 0;
    b.count = 0;
    ++b.gen;
  } else {
    while (b.gen == gen) yield();
  }
  return b.result;
}

inline WarpSlots& warp_slots() { return g_cta->warps[g_cur / 32]; }
inline int lane_id() { return g_cur % 32; }
inline void warp_barrier() { arrive(warp_slots().bar, 32, 0); }

inline void check_smem(const void* p, int bytes) {
  const unsigned char* c = static_cast<const unsigned char*>(p);
  const unsigned char* lo = g_cta->smem.data();
  if (c < lo || c + bytes > lo + g_cta->smem.size()) fail("shared address out of range");
  if (reinterpret_cast<uintptr_t>(c) % (bytes < 16 ? bytes : 16) != 0) fail("misaligned shared address");
}

inline void entry() {
  g_body();
  g_cta->th[g_cur].done = true;
}

inline bool reverse_order() {
  const char* order = std::getenv("BASED_LA_EMU_ORDER");
  return order && std::strcmp(order, "reverse") == 0;
}

inline int launch(int grid, int threads, int smem_bytes, std::function<void()> body) {
  const bool reverse = reverse_order();
  for (int block = 0; block < grid; ++block) {
    Cta cta;
    cta.th.resize(threads);
    // NaN bytes, so that a read of shared memory nobody wrote shows up
    cta.smem.assign(smem_bytes, 0xff);
    cta.warps.resize((threads + 31) / 32);
    g_cta = &cta;
    g_block.x = block;
    g_body = body;
    for (int t = 0; t < threads; ++t) {
      Thread& th = cta.th[t];
      th.idx.x = t;
      th.stack.resize(1 << 18);
      getcontext(&th.ctx);
      th.ctx.uc_stack.ss_sp = th.stack.data();
      th.ctx.uc_stack.ss_size = th.stack.size();
      th.ctx.uc_link = &g_sched;
      makecontext(&th.ctx, entry, 0);
    }
    for (bool running = true; running;) {
      running = false;
      for (int i = 0; i < threads; ++i) {
        const int t = reverse ? threads - 1 - i : i;
        if (cta.th[t].done) continue;
        running = true;
        g_cur = t;
        swapcontext(&g_sched, &cta.th[t].ctx);
      }
    }
    g_cta = nullptr;
  }
  return g_error;
}

inline const char* error_string(int code) { return code == 0 ? "no error" : "emulation error"; }

}  // namespace emu

#define threadIdx (emu::g_cta->th[emu::g_cur].idx)
#define blockIdx (emu::g_block)

inline float la_uint_as_float(uint32_t u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

inline float la_bf16_to_f32(uint32_t bits16) { return la_uint_as_float(bits16 << 16); }

inline uint16_t la_f32_to_bf16(float x) {
  uint32_t u;
  std::memcpy(&u, &x, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((u >> 16) | 0x40u);
  return static_cast<uint16_t>((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

inline uint32_t la_pack_bf16(float lo, float hi) {
  return static_cast<uint32_t>(la_f32_to_bf16(lo)) | (static_cast<uint32_t>(la_f32_to_bf16(hi)) << 16);
}

inline float la_lo(uint32_t r) { return la_bf16_to_f32(r & 0xffffu); }
inline float la_hi(uint32_t r) { return la_bf16_to_f32(r >> 16); }

// D = A B + C for one m16n8k16 tile: A row-major 16x16, B 16x8 ("col"), fragments as in the PTX ISA
inline void la_mma(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  emu::WarpSlots& w = emu::warp_slots();
  const int lane = emu::lane_id();
  std::memcpy(w.a[lane], a, sizeof(a));
  w.b[lane][0] = b0;
  w.b[lane][1] = b1;
  emu::warp_barrier();
  float A[16][16], B[16][8];
  for (int l = 0; l < 32; ++l) {
    const int g = l >> 2, t = l & 3;
    A[g][2 * t] = la_lo(w.a[l][0]), A[g][2 * t + 1] = la_hi(w.a[l][0]);
    A[g + 8][2 * t] = la_lo(w.a[l][1]), A[g + 8][2 * t + 1] = la_hi(w.a[l][1]);
    A[g][2 * t + 8] = la_lo(w.a[l][2]), A[g][2 * t + 9] = la_hi(w.a[l][2]);
    A[g + 8][2 * t + 8] = la_lo(w.a[l][3]), A[g + 8][2 * t + 9] = la_hi(w.a[l][3]);
    B[2 * t][g] = la_lo(w.b[l][0]), B[2 * t + 1][g] = la_hi(w.b[l][0]);
    B[2 * t + 8][g] = la_lo(w.b[l][1]), B[2 * t + 9][g] = la_hi(w.b[l][1]);
  }
  emu::warp_barrier();
  const int g = lane >> 2, t = lane & 3;
  for (int r = 0; r < 4; ++r) {
    const int row = g + 8 * (r >> 1), col = 2 * t + (r & 1);
    float acc = c[r];
    for (int kk = 0; kk < 16; ++kk) acc += A[row][kk] * B[kk][col];
    c[r] = acc;
  }
}

// ldmatrix / stmatrix: each lane's (checked) row address, seen by the whole warp after the returned slots fill
inline emu::WarpSlots& la_share_row_address(const void* p) {
  emu::check_smem(p, 16);
  emu::WarpSlots& w = emu::warp_slots();
  w.ptr[emu::lane_id()] = p;
  emu::warp_barrier();
  return w;
}

inline void la_ldsm(uint32_t (&r)[4], const uint16_t* p, bool trans) {
  const emu::WarpSlots& w = la_share_row_address(p);
  const int lane = emu::lane_id();
  for (int i = 0; i < 4; ++i) {
    const uint16_t* const* rows = reinterpret_cast<const uint16_t* const*>(w.ptr + 8 * i);
    if (!trans) {
      const uint16_t* row = rows[lane >> 2];
      r[i] = row[2 * (lane & 3)] | (static_cast<uint32_t>(row[2 * (lane & 3) + 1]) << 16);
    } else {
      const int col = lane >> 2;
      r[i] = rows[2 * (lane & 3)][col] | (static_cast<uint32_t>(rows[2 * (lane & 3) + 1][col]) << 16);
    }
  }
  emu::warp_barrier();
}

inline void la_ldsm_x4(uint32_t (&r)[4], const uint16_t* p) { la_ldsm(r, p, false); }
inline void la_ldsm_x4_t(uint32_t (&r)[4], const uint16_t* p) { la_ldsm(r, p, true); }

// stmatrix .x4 .trans: lane 8 i + j names row j of matrix i's transpose; register i of lane l holds (row l / 4,
// columns 2 (l % 4), +1) of matrix i, so its halves land in rows 2 (l % 4) and 2 (l % 4) + 1, at element l / 4
inline void la_stsm_x4_t(const uint32_t (&r)[4], uint16_t* p) {
  const emu::WarpSlots& w = la_share_row_address(p);
  const int lane = emu::lane_id();
  for (int i = 0; i < 4; ++i) {
    for (int h = 0; h < 2; ++h) {
      uint16_t* row = static_cast<uint16_t*>(const_cast<void*>(w.ptr[8 * i + 2 * (lane & 3) + h]));
      row[lane >> 2] = static_cast<uint16_t>(h ? r[i] >> 16 : r[i] & 0xffffu);
    }
  }
  emu::warp_barrier();
}

inline void la_cp_async16(void* dst, const void* src, bool valid) {
  emu::check_smem(dst, 16);
  emu::g_cta->th[emu::g_cur].pending.push_back({dst, src, 16, valid});
}

template <int N>
inline void la_cp_async_small(void* dst, const void* src, bool valid) {
  emu::check_smem(dst, N);
  emu::g_cta->th[emu::g_cur].pending.push_back({dst, src, N, valid});
}

inline void la_cp_commit() {}

inline void la_cp_wait_all() {
  for (const emu::Pending& p : emu::g_cta->th[emu::g_cur].pending) {
    if (p.valid)
      std::memcpy(p.dst, p.src, p.bytes);
    else
      std::memset(p.dst, 0, p.bytes);
  }
  emu::g_cta->th[emu::g_cur].pending.clear();
}

inline float la_shfl_xor(float v, int mask) {
  emu::WarpSlots& w = emu::warp_slots();
  const int lane = emu::lane_id();
  w.f[lane] = v;
  emu::warp_barrier();
  const float r = w.f[lane ^ mask];
  emu::warp_barrier();
  return r;
}

inline int la_sync_or(int pred) { return emu::arrive(emu::g_cta->bar, static_cast<int>(emu::g_cta->th.size()), pred != 0); }

inline void la_sync() { la_sync_or(0); }

inline void la_syncwarp() { emu::warp_barrier(); }
