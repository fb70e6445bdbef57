// Causal normalized Taylor (Based) linear attention, forward, for feature dim F = 16 and bf16 inputs.
//
// One CTA per (row x head, value block of BV = 16 * NW columns) walks the sequence in 64-token chunks.
// Per chunk, with the state S^T [BV x 160] (value rows x symmetric feature rows, 153 used) in fp32 registers
// (warp w owns value rows 16w .. 16w+15, as mma.sync accumulators):
//   build (all threads): phi(q), phi(k)_w [64 x 160] bf16 in shared memory (plain elementwise products; _w:
//     keys outside the chunk's last document are zero rows), the fp32 normalizer partials phi(q) . z, and the
//     intra-chunk scores A = 1 + s + s^2/2 (s = q k^T / 4, causal, same document) [64 x 64] bf16 with their
//     fp32 row sums;
//   readout:  O^T  = S^T phi(q)^T                  (S^T as bf16 A fragments straight from the accumulators)
//   intra:    O^T += V^T A^T
//   update:   S^T  = carry * S^T + V^T phi(k)_w    (fp32 accumulate)
//   z:        z    = carry * z + colsum(phi(k)_w), from the Gram matrix of the chunk's [w, k/2] columns
//             (exact bf16 products, fp32 sums)
//   o = O * (1 / (den_intra + reads * phi(q).z + eps)) (one division per query and warp), staged in shared
//     memory with stmatrix.trans, written with 16-byte stores.
// Every BCR chunks the state is written (bf16, zero pad rows up to NP) for the Triton backward, which reads
// states[c] = the state before token c * 64 * BCR; z the same (fp32, value block 0 only).
// Documents: a query reads the carried state only when it is in the document of the token before the chunk;
// keys enter it only when they are in the chunk's last document; the state crosses a chunk only when the
// chunk's last token is in the document of the token before it (as reference.py's _chunk_step).
// The next chunk's q, k, v and doc ids are loaded with cp.async while the current chunk computes.
//
// Timing only: a runtime `skip` mask (la::Skip; 0 = the kernel above) leaves stages out so that one GPU run
// can say where the time goes without hardware counters; any other mask gives wrong results, but never reads
// or writes out of bounds nor deadlocks (the mask is uniform over the CTA). Every mma.sync, ldmatrix and
// cp.async is asm volatile, so the kept stages survive the compiler even when their results are dead.
//
// Everything the kernel needs from CUDA goes through the la_* wrappers below, so that the same source also
// compiles for the CPU against emulate.h (tests/kernels/test_la_cuda.py runs it there).

#ifndef BASED_LA_EMULATE
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <utility>

#define LA_DEV __device__ __forceinline__
#define LA_UNROLL _Pragma("unroll")
#define LA_SMEM(name) extern __shared__ __align__(16) unsigned char name[]

LA_DEV float la_bf16_to_f32(uint32_t bits16) { return __uint_as_float(bits16 << 16); }

// two floats -> one register of two bf16 (lo in the low half: the element with the lower index)
LA_DEV uint32_t la_pack_bf16(float lo, float hi) {
  __nv_bfloat162 h = __floats2bfloat162_rn(lo, hi);
  return *reinterpret_cast<uint32_t*>(&h);
}

LA_DEV void la_mma(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%0,%1,%2,%3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

LA_DEV uint32_t la_smem_addr(const void* p) { return static_cast<uint32_t>(__cvta_generic_to_shared(p)); }

LA_DEV void la_ldsm_x4(uint32_t (&r)[4], const uint16_t* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(la_smem_addr(p)));
}

LA_DEV void la_ldsm_x4_t(uint32_t (&r)[4], const uint16_t* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(la_smem_addr(p)));
}

// 16 bytes global -> shared, zero-filled when !valid (src must still be a mapped address)
LA_DEV void la_cp_async16(void* dst, const void* src, bool valid) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(la_smem_addr(dst)), "l"(src),
               "r"(valid ? 16 : 0));
}

template <int N>
LA_DEV void la_cp_async_small(void* dst, const void* src, bool valid) {
  asm volatile("cp.async.ca.shared.global [%0], [%1], %2, %3;\n" ::"r"(la_smem_addr(dst)), "l"(src), "n"(N),
               "r"(valid ? N : 0));
}

LA_DEV void la_cp_commit() { asm volatile("cp.async.commit_group;\n" ::); }

LA_DEV void la_cp_wait_all() { asm volatile("cp.async.wait_group 0;\n" ::: "memory"); }

// Four 8x8 bf16 matrices from registers in the mma.sync fragment layout (register i of lane l: row l / 4, columns
// 2 (l % 4) and 2 (l % 4) + 1 of matrix i) to shared memory, transposed: lane 8 i + j gives the address of row j
// of matrix i's transpose (16-byte aligned). stmatrix on sm_90; elsewhere the same stores, one element at a time.
LA_DEV void la_stsm_x4_t(const uint32_t (&r)[4], uint16_t* p) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("stmatrix.sync.aligned.m8n8.x4.trans.shared.b16 [%0], {%1,%2,%3,%4};\n" ::"r"(la_smem_addr(p)),
               "r"(r[0]), "r"(r[1]), "r"(r[2]), "r"(r[3])
               : "memory");
#else
  const uint32_t mine = la_smem_addr(p);
  const int lane = threadIdx.x & 31;
  LA_UNROLL
  for (int i = 0; i < 4; ++i) {
    LA_UNROLL
    for (int h = 0; h < 2; ++h) {
      const uint32_t row = __shfl_sync(0xffffffffu, mine, 8 * i + 2 * (lane & 3) + h);
      const uint16_t val = static_cast<uint16_t>(h ? r[i] >> 16 : r[i] & 0xffffu);
      asm volatile("st.shared.u16 [%0], %1;\n" ::"r"(row + 2 * (lane >> 2)), "h"(val) : "memory");
    }
  }
#endif
}

LA_DEV float la_shfl_xor(float v, int mask) { return __shfl_xor_sync(0xffffffffu, v, mask); }

LA_DEV void la_syncwarp() { __syncwarp(); }

LA_DEV int la_sync_or(int pred) { return __syncthreads_or(pred); }

LA_DEV void la_sync() { __syncthreads(); }
#endif

namespace la {

constexpr int C = 64;      // tokens per chunk
constexpr int NS = 153;    // symmetric feature rows: 1 + F + F(F+1)/2 for F = 16
constexpr int NPI = 160;   // feature rows held on chip (10 k-steps of 16)
constexpr int QS = 24;     // row stride (elements) of the q, k tiles: 48 bytes, ldmatrix conflict-free
constexpr int PS = 168;    // row stride of the phi tiles: 336 bytes
constexpr int AS = 72;     // row stride of the intra-score tile: 144 bytes
constexpr int GS = 20;     // row stride (floats) of the Gram matrix
constexpr float C_DIAG = 0.17677669529663687f;  // 1 / sqrt(2F): coefficient of x_i^2
constexpr float C_OFF = 0.25f;                  // sqrt(2) / sqrt(2F): coefficient of x_i x_j, i < j
constexpr float C_ONE = 0.5f;                   // F^(-1/4): coefficient of x_j

// Stages that FwdArgs::skip leaves out (timing only; mirrored as cuda.SKIP in Python)
enum Skip : int {
  SKIP_FEATURES = 1,    // phi(q), phi(k)_w and the phi(q) . z partials (the tiles keep stale values)
  SKIP_INTRA = 2,       // the intra-chunk scores and O^T += V^T A^T
  SKIP_READOUT = 4,     // O^T = S^T phi(q)^T
  SKIP_UPDATE = 8,      // S^T update, the Gram product and z
  SKIP_NORMALIZE = 16,  // o = O / den into the staging tile
  SKIP_OUTPUT = 32,     // the global stores of o and den
  SKIP_STATES = 64,     // the global stores of states and zst (the start one too)
  SKIP_PREFETCH = 128,  // no cp.async overlap: each chunk is loaded, waited for and synchronized at its start
  SKIP_LOADS = 256,     // no loads after the first two chunks (each stage keeps its chunk)
  SKIP_BARRIERS = 512,  // the CTA barriers inside the chunk loop (the readout then always runs)
};

// symmetric row of the pair (i, j), i <= j (the order of triton_impl.Layout)
__host__ __device__ constexpr int pair_row(int i, int j) { return 17 + i * 16 - i * (i - 1) / 2 + (j - i); }

struct FwdArgs {
  const uint16_t* q;
  const uint16_t* k;
  const uint16_t* v;
  const void* docs;
  const float* s0;  // [BH, NP, DV] symmetric initial state, or null
  const float* z0;  // [BH, NP], or null
  uint16_t* o;
  float* den;       // [BH, T]: the normalizer + eps
  uint16_t* states; // [BH, NC, NP, DV] bf16
  float* zst;       // [BH, NC, NP]
  float* s_end;     // [BH, NP, DV] fp32, or null
  float* z_end;     // [BH, NP], or null
  long long sqb, sqt, sqh, skb, skt, skh, svb, svt, svh, sob, sot, soh, sdb;
  int T, H, DV, NV, NP, NC, BCR;
  float eps;
  int skip;  // la::Skip bits, 0 in real use
};

// byte offsets of the dynamic shared memory (all multiples of 16)
template <int NW>
struct Smem {
  static constexpr int BV = 16 * NW;
  static constexpr int VS = BV + 8;                     // v / o tile row stride: conflict-free ldmatrix
  static constexpr int QK = 0;                          // [2 stages][q, k][64][QS] bf16
  static constexpr int V = QK + 2 * 2 * C * QS * 2;     // [2 stages][64][VS] bf16
  static constexpr int PHI = V + 2 * C * VS * 2;        // [phi q, phi k][64][PS] bf16; state staging [160][VS]
  static constexpr int A = PHI + 2 * C * PS * 2;        // [64][AS] bf16
  static constexpr int OST = A + C * AS * 2;            // [64][VS] bf16: output staging
  static constexpr int DOC = OST + C * VS * 2;          // [2 stages][64] doc ids (4 or 8 bytes)
  static constexpr int Z = DOC + 2 * C * 8;             // [160] fp32
  static constexpr int DEN_I = Z + NPI * 4;             // [64] fp32: intra-chunk row sums
  static constexpr int DEN_E = DEN_I + C * 4;           // [2 parts][64] fp32: phi(q) . z partials
  static constexpr int DEN_O = DEN_E + 2 * C * 4;       // [64] fp32: the normalizer, staged
  static constexpr int INV = DEN_O + C * 4;             // [NW][64] fp32: each warp's 1 / normalizer
  static constexpr int GRAM = INV + NW * C * 4;         // [17][GS] fp32
  static constexpr int TAB = GRAM + 17 * GS * 4;        // [160] int: i | j << 8 of each pair row
  static constexpr int COEF = TAB + NPI * 4;            // [160] fp32
  static constexpr int BYTES = COEF + NPI * 4;
  static_assert(NPI * VS * 2 <= 2 * C * PS * 2, "state staging must fit in the phi tiles");
};

LA_DEV void unpack_row16(const uint16_t* row, float (&x)[16]) {
  const uint4 u0 = *reinterpret_cast<const uint4*>(row);
  const uint4 u1 = *reinterpret_cast<const uint4*>(row + 8);
  const uint32_t w[8] = {u0.x, u0.y, u0.z, u0.w, u1.x, u1.y, u1.z, u1.w};
  LA_UNROLL
  for (int i = 0; i < 8; ++i) {
    x[2 * i] = la_bf16_to_f32(w[i] & 0xffffu);
    x[2 * i + 1] = la_bf16_to_f32(w[i] >> 16);
  }
}

// (i, j) of symmetric row p (17 <= p < NS); -1 for the other rows
__host__ __device__ constexpr int pair_i(int p) {
  for (int i = 0; i < 16; ++i)
    for (int j = i; j < 16; ++j)
      if (pair_row(i, j) == p) return i;
  return -1;
}

__host__ __device__ constexpr int pair_j(int p) {
  for (int i = 0; i < 16; ++i)
    for (int j = i; j < 16; ++j)
      if (pair_row(i, j) == p) return j;
  return -1;
}

// phi_P(x) (fp32, unrounded): 1, x_j / F^(1/4), coef x_i x_j, or 0 in the pad rows
template <int P>
LA_DEV float feature(const float (&x)[16]) {
  if constexpr (P == 0) {
    return 1.f;
  } else if constexpr (P <= 16) {
    return x[P - 1] * C_ONE;
  } else if constexpr (P < NS) {
    constexpr int i = pair_i(P), j = pair_j(P);
    return (x[i] * x[j]) * (i == j ? C_DIAG : C_OFF);
  } else {
    return 0.f;
  }
}

// Rows P .. P+7 of phi(x) times w (0 or 1), stored as bf16 at row[P ..]; returns their sum_p phi_p z_p in fp32
// (unrounded phi, as the Triton kernel) when DEN
template <int P, bool DEN>
LA_DEV float feature_group(const float (&x)[16], float w, const float* z, uint16_t* row) {
  const float f[8] = {feature<P>(x), feature<P + 1>(x), feature<P + 2>(x), feature<P + 3>(x),
                      feature<P + 4>(x), feature<P + 5>(x), feature<P + 6>(x), feature<P + 7>(x)};
  float acc = 0.f;
  if constexpr (DEN) {
    const float4 z0 = *reinterpret_cast<const float4*>(z + P);
    const float4 z1 = *reinterpret_cast<const float4*>(z + P + 4);
    acc = f[0] * z0.x + f[1] * z0.y + f[2] * z0.z + f[3] * z0.w + f[4] * z1.x + f[5] * z1.y + f[6] * z1.z +
          f[7] * z1.w;
  }
  uint4 pk;
  pk.x = la_pack_bf16(f[0] * w, f[1] * w);
  pk.y = la_pack_bf16(f[2] * w, f[3] * w);
  pk.z = la_pack_bf16(f[4] * w, f[5] * w);
  pk.w = la_pack_bf16(f[6] * w, f[7] * w);
  *reinterpret_cast<uint4*>(row + P) = pk;
  return acc;
}

template <int P0, bool DEN, int... G>
LA_DEV float build_phi(std::integer_sequence<int, G...>, const float (&x)[16], float w, const float* z,
                       uint16_t* row) {
  float acc = 0.f;
  ((acc += feature_group<P0 + 8 * G, DEN>(x, w, z, row)), ...);
  return acc;
}

// this thread's part of the feature rows: one thread per token and 160 / (NW / 2) rows
template <int NW, bool DEN>
LA_DEV float build_phi_part(int part, const float (&x)[16], float w, const float* z, uint16_t* row) {
  if constexpr (NW == 2) {
    return build_phi<0, DEN>(std::make_integer_sequence<int, NPI / 8>(), x, w, z, row);
  } else {
    static_assert(NW == 4, "NW is 2 or 4");
    constexpr int half = NPI / 2;
    return part == 0 ? build_phi<0, DEN>(std::make_integer_sequence<int, half / 8>(), x, w, z, row)
                     : build_phi<half, DEN>(std::make_integer_sequence<int, half / 8>(), x, w, z, row);
  }
}

LA_DEV float poly(float s) {
  const float x = s * 0.25f;  // q.k / sqrt(F)
  return 1.0f + x + 0.5f * x * x;
}

template <int NW, typename DocT>
struct Cta {
  static constexpr int NT = 32 * NW;
  static constexpr int BV = Smem<NW>::BV;
  static constexpr int VS = Smem<NW>::VS;
  static constexpr int VCH = BV / 8;  // 16-byte chunks per tile row of v / o / states

  const FwdArgs& a;
  unsigned char* smem;
  int tid, lane, warp, gid, tig, vb, bh, v0;
  const uint16_t* qg;
  const uint16_t* kg;
  const uint16_t* vg;
  const DocT* dg;
  uint16_t* og;

  LA_DEV uint16_t* q_tile(int buf) const { return reinterpret_cast<uint16_t*>(smem + Smem<NW>::QK) + buf * 2 * C * QS; }
  LA_DEV uint16_t* k_tile(int buf) const { return q_tile(buf) + C * QS; }
  LA_DEV uint16_t* v_tile(int buf) const { return reinterpret_cast<uint16_t*>(smem + Smem<NW>::V) + buf * C * VS; }
  LA_DEV uint16_t* phi_q() const { return reinterpret_cast<uint16_t*>(smem + Smem<NW>::PHI); }
  LA_DEV uint16_t* phi_k() const { return phi_q() + C * PS; }
  LA_DEV uint16_t* a_tile() const { return reinterpret_cast<uint16_t*>(smem + Smem<NW>::A); }
  LA_DEV uint16_t* o_stage() const { return reinterpret_cast<uint16_t*>(smem + Smem<NW>::OST); }
  LA_DEV DocT* doc_tile(int buf) const { return reinterpret_cast<DocT*>(smem + Smem<NW>::DOC) + buf * C; }
  LA_DEV float* z_s() const { return reinterpret_cast<float*>(smem + Smem<NW>::Z); }
  LA_DEV float* den_i() const { return reinterpret_cast<float*>(smem + Smem<NW>::DEN_I); }
  LA_DEV float* den_e() const { return reinterpret_cast<float*>(smem + Smem<NW>::DEN_E); }
  LA_DEV float* den_o() const { return reinterpret_cast<float*>(smem + Smem<NW>::DEN_O); }
  LA_DEV float* inv_w() const { return reinterpret_cast<float*>(smem + Smem<NW>::INV) + warp * C; }
  LA_DEV float* gram() const { return reinterpret_cast<float*>(smem + Smem<NW>::GRAM); }
  LA_DEV int* tab() const { return reinterpret_cast<int*>(smem + Smem<NW>::TAB); }
  LA_DEV float* coef() const { return reinterpret_cast<float*>(smem + Smem<NW>::COEF); }

  LA_DEV Cta(const FwdArgs& args, unsigned char* sm, int block) : a(args), smem(sm) {
    tid = threadIdx.x;
    lane = tid & 31;
    warp = tid >> 5;
    gid = lane >> 2;
    tig = lane & 3;
    vb = block % a.NV;
    bh = block / a.NV;
    v0 = vb * BV;
    const int b = bh / a.H, h = bh % a.H;
    qg = a.q + b * a.sqb + h * a.sqh;
    kg = a.k + b * a.skb + h * a.skh;
    vg = a.v + b * a.svb + h * a.svh;
    dg = static_cast<const DocT*>(a.docs) + b * a.sdb;
    og = a.o + b * a.sob + h * a.soh;
  }

  // q, k, v and doc ids of chunk c into stage buf (rows past T and columns past DV zero-filled)
  LA_DEV void issue_loads(int c, int buf) const {
    const int t0 = c * C, nv = min(C, a.T - t0);
    uint16_t* qk = q_tile(buf);
    for (int idx = tid; idx < 4 * C; idx += NT) {
      const int which = idx >> 7, r = (idx >> 1) & (C - 1), cc = idx & 1;
      const bool valid = r < nv;
      const uint16_t* src = which ? kg + (t0 + r) * a.skt : qg + (t0 + r) * a.sqt;
      la_cp_async16(qk + which * C * QS + r * QS + 8 * cc, valid ? src + 8 * cc : a.q, valid);
    }
    uint16_t* vt = v_tile(buf);
    for (int idx = tid; idx < C * VCH; idx += NT) {
      const int r = idx / VCH, cc = idx % VCH, col = v0 + 8 * cc;
      const bool valid = r < nv && col < a.DV;
      la_cp_async16(vt + r * VS + 8 * cc, valid ? vg + (t0 + r) * a.svt + col : a.v, valid);
    }
    DocT* dt = doc_tile(buf);
    for (int r = tid; r < C; r += NT) {
      const bool valid = r < nv;
      la_cp_async_small<sizeof(DocT)>(dt + r, valid ? dg + t0 + r : dg, valid);
    }
    la_cp_commit();
  }

  // phi(q), phi(k)_w, the phi(q) . z partials, then the intra-chunk scores and their row sums
  LA_DEV void build(int buf, int nv, DocT doc_last) const {
    if (!(a.skip & SKIP_FEATURES)) {
      const int t = tid & (C - 1), part = tid / C;
      const DocT* dc = doc_tile(buf);
      float x[16];
      unpack_row16(q_tile(buf) + t * QS, x);
      den_e()[part * C + t] = build_phi_part<NW, true>(part, x, 1.f, z_s(), phi_q() + t * PS);
      unpack_row16(k_tile(buf) + t * QS, x);
      const float w = (t < nv && dc[t] == doc_last) ? 1.f : 0.f;
      build_phi_part<NW, false>(part, x, w, z_s(), phi_k() + t * PS);
    }
    if (!(a.skip & SKIP_INTRA)) {
      for (int mt = warp; mt < 4; mt += NW) scores(buf, nv, mt);
    }
  }

  // A rows 16 mt .. 16 mt + 15 (keys up to the diagonal block; the intra product never reads the rest)
  LA_DEV void scores(int buf, int nv, int mt) const {
    const uint16_t* qs = q_tile(buf);
    const uint16_t* ks = k_tile(buf);
    const DocT* dc = doc_tile(buf);
    uint32_t qa[4];
    la_ldsm_x4(qa, qs + (16 * mt + (lane & 7) + ((lane >> 3) & 1) * 8) * QS + (lane >> 4) * 8);
    float acc[8][4];
    LA_UNROLL
    for (int j = 0; j < 8; ++j) acc[j][0] = acc[j][1] = acc[j][2] = acc[j][3] = 0.f;
    LA_UNROLL
    for (int jp = 0; jp < 4; ++jp) {
      if (jp <= mt) {
        uint32_t kb[4];
        la_ldsm_x4(kb, ks + (16 * jp + (lane & 7) + ((lane >> 4) & 1) * 8) * QS + ((lane >> 3) & 1) * 8);
        la_mma(acc[2 * jp], qa, kb[0], kb[1]);
        la_mma(acc[2 * jp + 1], qa, kb[2], kb[3]);
      }
    }
    const int r0 = 16 * mt + gid, r1 = r0 + 8;
    const DocT d0 = dc[r0], d1 = dc[r1];
    float rs0 = 0.f, rs1 = 0.f;
    uint16_t* at = a_tile();
    LA_UNROLL
    for (int j = 0; j < 8; ++j) {
      if (j <= 2 * mt + 1) {
        float sim[4];
        LA_UNROLL
        for (int e = 0; e < 2; ++e) {
          const int key = 8 * j + 2 * tig + e;
          const bool kv = key < nv;
          const DocT dk = dc[key];
          sim[e] = (kv && key <= r0 && dk == d0) ? poly(acc[j][e]) : 0.f;
          sim[2 + e] = (kv && key <= r1 && dk == d1) ? poly(acc[j][2 + e]) : 0.f;
        }
        rs0 += sim[0] + sim[1];
        rs1 += sim[2] + sim[3];
        *reinterpret_cast<uint32_t*>(at + r0 * AS + 8 * j + 2 * tig) = la_pack_bf16(sim[0], sim[1]);
        *reinterpret_cast<uint32_t*>(at + r1 * AS + 8 * j + 2 * tig) = la_pack_bf16(sim[2], sim[3]);
      }
    }
    rs0 += la_shfl_xor(rs0, 1);
    rs0 += la_shfl_xor(rs0, 2);
    rs1 += la_shfl_xor(rs1, 1);
    rs1 += la_shfl_xor(rs1, 2);
    if (tig == 0) {
      den_i()[r0] = rs0;
      den_i()[r1] = rs1;
    }
  }

  // G = X^T X over the chunk's tokens, X = phi(k)_w columns 0..16 = [w, w k / 2]: rows and columns 0..16
  // (warp 0: G[0:16, 0:16]; warp 1: G[0:17, 16])
  LA_DEV void gram_product() const {
    const uint16_t* pk = phi_k();
    float* gr = gram();
    if (warp == 0) {
      float g[2][4] = {{0.f, 0.f, 0.f, 0.f}, {0.f, 0.f, 0.f, 0.f}};
      LA_UNROLL
      for (int kb = 0; kb < 4; ++kb) {
        uint32_t ga[4], gb[4];
        la_ldsm_x4_t(ga, pk + (16 * kb + (lane & 7) + ((lane >> 4) & 1) * 8) * PS + ((lane >> 3) & 1) * 8);
        la_ldsm_x4_t(gb, pk + (16 * kb + (lane & 7) + ((lane >> 3) & 1) * 8) * PS + ((lane >> 4) & 1) * 8);
        la_mma(g[0], ga, gb[0], gb[1]);
        la_mma(g[1], ga, gb[2], gb[3]);
      }
      LA_UNROLL
      for (int nt = 0; nt < 2; ++nt) {
        LA_UNROLL
        for (int hh = 0; hh < 2; ++hh) {
          gr[(gid + 8 * hh) * GS + 8 * nt + 2 * tig] = g[nt][2 * hh];
          gr[(gid + 8 * hh) * GS + 8 * nt + 2 * tig + 1] = g[nt][2 * hh + 1];
        }
      }
    } else if (warp == 1) {
      float g[2][4] = {{0.f, 0.f, 0.f, 0.f}, {0.f, 0.f, 0.f, 0.f}};
      LA_UNROLL
      for (int kb = 0; kb < 4; ++kb) {
        uint32_t gb[4];
        la_ldsm_x4_t(gb, pk + (16 * kb + (lane & 7) + ((lane >> 3) & 1) * 8) * PS + 16 + ((lane >> 4) & 1) * 8);
        LA_UNROLL
        for (int mt = 0; mt < 2; ++mt) {
          uint32_t ga[4];
          la_ldsm_x4_t(ga, pk + (16 * kb + (lane & 7) + ((lane >> 4) & 1) * 8) * PS + 16 * mt +
                               ((lane >> 3) & 1) * 8);
          la_mma(g[mt], ga, gb[0], gb[1]);
        }
      }
      if (tig == 0) {
        gr[gid * GS + 16] = g[0][0];
        gr[(gid + 8) * GS + 16] = g[0][2];
      }
      if (lane == 0) gr[16 * GS + 16] = g[1][0];
    }
  }

  // O^T (this warp's 16 value rows x 64 queries) = S^T phi(q)^T, then zero the queries that do not read
  LA_DEV void readout(float (&oacc)[8][4], const float (&sacc)[20][4], int buf, DocT doc_prev) const {
    const uint16_t* pq = phi_q();
    LA_UNROLL
    for (int kb = 0; kb < 10; ++kb) {
      const uint32_t sa[4] = {la_pack_bf16(sacc[2 * kb][0], sacc[2 * kb][1]),
                              la_pack_bf16(sacc[2 * kb][2], sacc[2 * kb][3]),
                              la_pack_bf16(sacc[2 * kb + 1][0], sacc[2 * kb + 1][1]),
                              la_pack_bf16(sacc[2 * kb + 1][2], sacc[2 * kb + 1][3])};
      LA_UNROLL
      for (int np = 0; np < 4; ++np) {
        uint32_t bq[4];
        la_ldsm_x4(bq, pq + (16 * np + (lane & 7) + ((lane >> 4) & 1) * 8) * PS + 16 * kb + ((lane >> 3) & 1) * 8);
        la_mma(oacc[2 * np], sa, bq[0], bq[1]);
        la_mma(oacc[2 * np + 1], sa, bq[2], bq[3]);
      }
    }
    const DocT* dc = doc_tile(buf);
    LA_UNROLL
    for (int n = 0; n < 8; ++n) {
      LA_UNROLL
      for (int e = 0; e < 2; ++e) {
        if (dc[8 * n + 2 * tig + e] != doc_prev) oacc[n][e] = oacc[n][2 + e] = 0.f;
      }
    }
  }

  // O^T += V^T A^T (A is causal: k-step kb only meets the queries of n-tiles >= 2 kb)
  LA_DEV void intra(float (&oacc)[8][4], const uint32_t (&va)[4][4]) const {
    const uint16_t* at = a_tile();
    LA_UNROLL
    for (int kb = 0; kb < 4; ++kb) {
      LA_UNROLL
      for (int np = kb; np < 4; ++np) {
        uint32_t ba[4];
        la_ldsm_x4(ba, at + (16 * np + (lane & 7) + ((lane >> 4) & 1) * 8) * AS + 16 * kb + ((lane >> 3) & 1) * 8);
        la_mma(oacc[2 * np], va[kb], ba[0], ba[1]);
        la_mma(oacc[2 * np + 1], va[kb], ba[2], ba[3]);
      }
    }
  }

  // S^T = carry * S^T + V^T phi(k)_w
  LA_DEV void update(float (&sacc)[20][4], const uint32_t (&va)[4][4], bool carry) const {
    if (!carry) {
      LA_UNROLL
      for (int n = 0; n < 20; ++n) sacc[n][0] = sacc[n][1] = sacc[n][2] = sacc[n][3] = 0.f;
    }
    const uint16_t* pk = phi_k();
    LA_UNROLL
    for (int kb = 0; kb < 4; ++kb) {
      LA_UNROLL
      for (int np = 0; np < 10; ++np) {
        uint32_t bk[4];
        la_ldsm_x4_t(bk, pk + (16 * kb + (lane & 7) + ((lane >> 3) & 1) * 8) * PS + 16 * np + ((lane >> 4) & 1) * 8);
        la_mma(sacc[2 * np], va[kb], bk[0], bk[1]);
        la_mma(sacc[2 * np + 1], va[kb], bk[2], bk[3]);
      }
    }
  }

  // o = O / den into the staging tile: each warp takes the 64 reciprocals (two per lane) into its own slot,
  // then scales its O^T fragments and stores them transposed; den (with eps, as the Triton kernel stores it)
  // staged by warp 0
  LA_DEV void normalize(const float (&oacc)[8][4], int buf, DocT doc_prev) const {
    const DocT* dc = doc_tile(buf);
    float* inv = inv_w();
    LA_UNROLL
    for (int h = 0; h < 2; ++h) {
      const int qr = lane + 32 * h;
      float inter = 0.f;
      if (dc[qr] == doc_prev) {
        inter = den_e()[qr];
        if (NW == 4) inter += den_e()[C + qr];
      }
      const float dn = den_i()[qr] + (inter + a.eps);
      inv[qr] = 1.f / dn;
      if (warp == 0) den_o()[qr] = dn;
    }
    la_syncwarp();
    store_transposed<8>(oacc, o_stage(), inv);
  }

  // a warp's fragments, N tiles of 16 value rows x 8 columns (times scale[column] when given), as bf16 into
  // dst[column][value] (the warp's 16 value columns of a VS-stride tile), four tiles per stmatrix.trans
  template <int N>
  LA_DEV void store_transposed(const float (&acc)[N][4], uint16_t* dst, const float* scale) const {
    const int mat = lane >> 3, row = lane & 7;
    LA_UNROLL
    for (int n = 0; n < N; n += 2) {
      uint32_t r[4];
      LA_UNROLL
      for (int m = 0; m < 2; ++m) {
        const int col = 8 * (n + m) + 2 * tig;
        const float s0 = scale ? scale[col] : 1.f, s1 = scale ? scale[col + 1] : 1.f;
        r[2 * m] = la_pack_bf16(acc[n + m][0] * s0, acc[n + m][1] * s1);
        r[2 * m + 1] = la_pack_bf16(acc[n + m][2] * s0, acc[n + m][3] * s1);
      }
      la_stsm_x4_t(r, dst + (8 * (n + (mat >> 1)) + row) * VS + 16 * warp + 8 * (mat & 1));
    }
  }

  // z = carry * z + colsum(phi(k)_w), from the Gram matrix
  LA_DEV void z_update(bool carry) const {
    const float* gr = gram();
    float* z = z_s();
    for (int p = tid; p < NPI; p += NT) {
      float dz = 0.f;
      if (p <= 16) {
        dz = gr[p];
      } else if (p < NS) {
        const int ij = tab()[p], i = ij & 0xff, j = ij >> 8;
        dz = (4.f * gr[(1 + i) * GS + 1 + j]) * coef()[p];
      }
      z[p] = carry ? z[p] + dz : dz;
    }
  }

  // the output rows of chunk c from the staging tile; den by value block 0
  LA_DEV void flush_o(int c) const {
    const int t0 = c * C, nv = min(C, a.T - t0);
    const uint16_t* os = o_stage();
    for (int idx = tid; idx < C * VCH; idx += NT) {
      const int r = idx / VCH, cc = idx % VCH, col = v0 + 8 * cc;
      if (r < nv && col < a.DV)
        *reinterpret_cast<uint4*>(og + (t0 + r) * a.sot + col) = *reinterpret_cast<const uint4*>(os + r * VS + 8 * cc);
    }
    if (vb == 0) {
      for (int r = tid; r < nv; r += NT) a.den[static_cast<long long>(bh) * a.T + t0 + r] = den_o()[r];
    }
  }

  // states[cs] (bf16) through the staging tile over the phi tiles, and zst[cs] (value block 0). The caller
  // has synchronized after the last read of the phi tiles; this synchronizes before reading the staging.
  LA_DEV void store_state(const float (&sacc)[20][4], int cs) const {
    uint16_t* st = phi_q();
    store_transposed<20>(sacc, st, nullptr);
    if (!(a.skip & SKIP_BARRIERS)) la_sync();
    uint16_t* dst = a.states + (static_cast<long long>(bh) * a.NC + cs) * a.NP * a.DV;
    for (int idx = tid; idx < a.NP * VCH; idx += NT) {
      const int p = idx / VCH, cc = idx % VCH, col = v0 + 8 * cc;
      if (col < a.DV) {
        uint4 val = make_uint4(0u, 0u, 0u, 0u);
        if (p < NPI) val = *reinterpret_cast<const uint4*>(st + p * VS + 8 * cc);
        *reinterpret_cast<uint4*>(dst + static_cast<long long>(p) * a.DV + col) = val;
      }
    }
    if (vb == 0) {
      float* zd = a.zst + (static_cast<long long>(bh) * a.NC + cs) * a.NP;
      for (int p = tid; p < a.NP; p += NT) zd[p] = p < NPI ? z_s()[p] : 0.f;
    }
  }

  LA_DEV void init_tables() const {
    for (int p = tid; p < NPI; p += NT) {
      int ij = 0;
      float cf = 0.f;
      for (int i = 0; i < 16; ++i) {
        for (int j = i; j < 16; ++j) {
          if (pair_row(i, j) == p) {
            ij = i | (j << 8);
            cf = i == j ? C_DIAG : C_OFF;
          }
        }
      }
      tab()[p] = ij;
      coef()[p] = cf;
      z_s()[p] = a.z0 ? a.z0[static_cast<long long>(bh) * a.NP + p] : 0.f;
    }
  }

  LA_DEV void load_state(float (&sacc)[20][4]) const {
    LA_UNROLL
    for (int n = 0; n < 20; ++n) {
      LA_UNROLL
      for (int r = 0; r < 4; ++r) {
        const int p = 8 * n + 2 * tig + (r & 1), col = v0 + 16 * warp + gid + 8 * (r >> 1);
        sacc[n][r] = (a.s0 && col < a.DV) ? a.s0[(static_cast<long long>(bh) * a.NP + p) * a.DV + col] : 0.f;
      }
    }
  }

  LA_DEV void store_end(const float (&sacc)[20][4]) const {
    if (a.s_end) {
      float* dst = a.s_end + static_cast<long long>(bh) * a.NP * a.DV;
      LA_UNROLL
      for (int n = 0; n < 20; ++n) {
        LA_UNROLL
        for (int r = 0; r < 4; ++r) {
          const int p = 8 * n + 2 * tig + (r & 1), col = v0 + 16 * warp + gid + 8 * (r >> 1);
          if (col < a.DV) dst[static_cast<long long>(p) * a.DV + col] = sacc[n][r];
        }
      }
      for (int idx = tid; idx < (a.NP - NPI) * BV; idx += NT) {
        const int p = NPI + idx / BV, col = v0 + idx % BV;
        if (col < a.DV) dst[static_cast<long long>(p) * a.DV + col] = 0.f;
      }
    }
    if (a.z_end && vb == 0) {
      for (int p = tid; p < a.NP; p += NT) a.z_end[static_cast<long long>(bh) * a.NP + p] = p < NPI ? z_s()[p] : 0.f;
    }
  }

  // the loads of chunk c at the top of its iteration: the cp.async prefetch of chunk c + 1 (default), chunk c
  // itself waited for at once (SKIP_PREFETCH), or none (SKIP_LOADS: the two stages hold chunks 0 and 1)
  LA_DEV void chunk_loads(int c, int nci, int buf) const {
    const int skip = a.skip;
    const bool sync_loads = (skip & SKIP_PREFETCH) && !(skip & SKIP_LOADS);
    la_cp_wait_all();
    if (!(skip & SKIP_BARRIERS)) la_sync();
    if (sync_loads && c > 0) {
      issue_loads(c, buf);
      la_cp_wait_all();
      if (!(skip & SKIP_BARRIERS)) la_sync();
    }
    if (!(skip & (SKIP_PREFETCH | SKIP_LOADS)) && c + 1 < nci) issue_loads(c + 1, buf ^ 1);
  }

  LA_DEV void run() const {
    const int nci = (a.T + C - 1) / C, skip = a.skip;
    issue_loads(0, 0);
    if ((skip & SKIP_LOADS) && nci > 1) issue_loads(1, 1);
    init_tables();
    float sacc[20][4];
    load_state(sacc);
    la_sync();
    if (!(skip & SKIP_STATES)) store_state(sacc, 0);
    DocT doc_prev = 0;
    for (int c = 0; c < nci; ++c) {
      const int buf = c & 1, nv = min(C, a.T - c * C);
      chunk_loads(c, nci, buf);
      if (c > 0 && !(skip & SKIP_OUTPUT)) flush_o(c - 1);
      const DocT* dc = doc_tile(buf);
      if (c == 0) doc_prev = dc[0];
      const DocT doc_last = dc[nv - 1];
      const bool carry = doc_last == doc_prev;
      build(buf, nv, doc_last);
      const int t = tid & (C - 1);
      // without the barrier the readout runs (a per-thread answer could split a warp's mma.sync)
      const bool any_reads =
          (skip & SKIP_BARRIERS) ? true : la_sync_or(t < nv && dc[t] == doc_prev) != 0;
      if (!(skip & SKIP_UPDATE)) gram_product();
      float oacc[8][4];
      LA_UNROLL
      for (int n = 0; n < 8; ++n) oacc[n][0] = oacc[n][1] = oacc[n][2] = oacc[n][3] = 0.f;
      if (any_reads && !(skip & SKIP_READOUT)) readout(oacc, sacc, buf, doc_prev);
      uint32_t va[4][4];
      const uint16_t* vt = v_tile(buf);
      LA_UNROLL
      for (int kb = 0; kb < 4; ++kb)
        la_ldsm_x4_t(va[kb], vt + (16 * kb + (lane & 7) + ((lane >> 4) & 1) * 8) * VS + 16 * warp + ((lane >> 3) & 1) * 8);
      if (!(skip & SKIP_INTRA)) intra(oacc, va);
      if (!(skip & SKIP_UPDATE)) update(sacc, va, carry);
      if (!(skip & SKIP_NORMALIZE)) normalize(oacc, buf, doc_prev);
      if (!(skip & SKIP_BARRIERS)) la_sync();
      if (!(skip & SKIP_UPDATE)) z_update(carry);
      if (!(skip & SKIP_STATES) && (c + 1) % a.BCR == 0 && (c + 1) / a.BCR < a.NC)
        store_state(sacc, (c + 1) / a.BCR);
      doc_prev = doc_last;
    }
    la_sync();
    if (!(skip & SKIP_OUTPUT)) flush_o(nci - 1);
    store_end(sacc);
  }
};

template <int NW, typename DocT>
__global__ void __launch_bounds__(32 * NW, 2) based_fwd_kernel(const __grid_constant__ FwdArgs args) {
  LA_SMEM(smem);
  const Cta<NW, DocT> cta(args, smem, blockIdx.x);
  cta.run();
}

}  // namespace la

namespace {

template <int NW, typename DocT>
int launch(const la::FwdArgs& args, int grid, int device, cudaStream_t stream) {
  constexpr int bytes = la::Smem<NW>::BYTES;
#ifndef BASED_LA_EMULATE
  // the opt-in to more than 48 KB of shared memory, once per device (not a stream operation: allowed while
  // a CUDA graph is being captured)
  static bool opted_in[64] = {};
  if (device < 0 || device >= 64) return static_cast<int>(cudaErrorInvalidDevice);
  if (!opted_in[device]) {
    const cudaError_t err = cudaFuncSetAttribute(la::based_fwd_kernel<NW, DocT>,
                                                 cudaFuncAttributeMaxDynamicSharedMemorySize, bytes);
    if (err != cudaSuccess) return static_cast<int>(err);
    opted_in[device] = true;
  }
  la::based_fwd_kernel<NW, DocT><<<grid, 32 * NW, bytes, stream>>>(args);
  return static_cast<int>(cudaGetLastError());
#else
  (void)device;
  (void)stream;
  return emu::launch(grid, 32 * NW, bytes, [&] { la::based_fwd_kernel<NW, DocT>(args); });
#endif
}

}  // namespace

// Error codes are cudaError_t values; kInvalidValue for arguments this kernel does not take.
constexpr int kInvalidValue = 1;

extern "C" int based_la_fwd(const void* q, const void* k, const void* v, const void* docs, const float* s0,
                            const float* z0, void* o, float* den, void* states, float* zst, float* s_end,
                            float* z_end, long long sqb, long long sqt, long long sqh, long long skb, long long skt,
                            long long skh, long long svb, long long svt, long long svh, long long sob,
                            long long sot, long long soh, long long sdb, int batch, int seqlen, int heads,
                            int value_dim, int np, int nc, int bcr, float eps, int warps, int doc_bytes, int skip,
                            int device, void* stream) {
  if (seqlen < 1 || batch < 1 || heads < 1 || value_dim < 8 || value_dim % 8 != 0 || np < la::NPI || bcr < 1 ||
      nc != (seqlen + la::C * bcr - 1) / (la::C * bcr) || (warps != 2 && warps != 4) ||
      (doc_bytes != 4 && doc_bytes != 8) || skip < 0 || skip >= 2 * la::SKIP_BARRIERS)
    return kInvalidValue;
  la::FwdArgs a;
  a.q = static_cast<const uint16_t*>(q);
  a.k = static_cast<const uint16_t*>(k);
  a.v = static_cast<const uint16_t*>(v);
  a.docs = docs;
  a.s0 = s0;
  a.z0 = z0;
  a.o = static_cast<uint16_t*>(o);
  a.den = den;
  a.states = static_cast<uint16_t*>(states);
  a.zst = zst;
  a.s_end = s_end;
  a.z_end = z_end;
  a.sqb = sqb, a.sqt = sqt, a.sqh = sqh, a.skb = skb, a.skt = skt, a.skh = skh;
  a.svb = svb, a.svt = svt, a.svh = svh, a.sob = sob, a.sot = sot, a.soh = soh, a.sdb = sdb;
  a.T = seqlen, a.H = heads, a.DV = value_dim, a.NP = np, a.NC = nc, a.BCR = bcr, a.eps = eps;
  a.skip = skip;
  const int bv = 16 * warps;
  a.NV = (value_dim + bv - 1) / bv;
  const int grid = a.NV * batch * heads;
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  if (warps == 4) return doc_bytes == 4 ? launch<4, int32_t>(a, grid, device, s) : launch<4, int64_t>(a, grid, device, s);
  return doc_bytes == 4 ? launch<2, int32_t>(a, grid, device, s) : launch<2, int64_t>(a, grid, device, s);
}

extern "C" int based_la_smem_bytes(int warps) {
  return warps == 4 ? la::Smem<4>::BYTES : warps == 2 ? la::Smem<2>::BYTES : -1;
}

extern "C" const char* based_la_error_string(int code) {
  if (code == kInvalidValue) return "invalid argument (based_la_fwd: unsupported shape or setting)";
#ifndef BASED_LA_EMULATE
  return cudaGetErrorString(static_cast<cudaError_t>(code));
#else
  return emu::error_string(code);
#endif
}
