// One decode step of Tiny's language model (bf16 weights, one token of one sequence) on a CPU with
// AVX512-BF16, in one call: every layer's norms, attention over the cache, router, chosen routed
// experts and shared experts (or dense MLP), then the final norm and lm_head.
//
// Why it exists (measured, model/cpu/native.py): TorchInductor widens each bf16 weight to fp32
// before multiplying and its one-row products top out near 37 GB/s even from cache, and a step of
// 13 compiled calls spends a fifth of its time in Python between them. Here every product is
// `vdpbf16ps` (bf16 pairs multiplied and accumulated in fp32, no widening) and the step is one
// OpenMP parallel region, so its time is the time to stream the weights it reads.
//
// Rounding follows transformers' DeepseekOcr2 text decoder in bf16: every linear output, norm,
// rotary product and sum, SiLU, SwiGLU product and residual add is rounded to bf16 where the stock
// decoder rounds it; the router, softmaxes and the routed experts' mix run in fp32 as there.
//
// Built by model/cpu/native.py with gcc (-O3 -ffp-contract=off -mavx512f -mavx512bw -mavx512vl
// -mavx512bf16 -fopenmp; no contraction, so that a product and a sum round separately as in torch);
// the OpenMP runtime is then the one torch has already loaded.

#include <immintrin.h>
#include <omp.h>
#include <math.h>
#include <stdint.h>
#include <string.h>

typedef struct {
  const uint16_t *input_norm, *post_norm;
  float input_eps, post_eps;
  const uint16_t *q, *k, *v, *o;  // [heads * head_dim, hidden]; o: [hidden, heads * head_dim]
  const float *router;            // [experts, hidden] in fp32; NULL in a dense layer
  // The dense MLP, or in an MoE layer its shared experts: gate/up [width, hidden], down [hidden, width].
  const uint16_t *mlp_gate, *mlp_up, *mlp_down;
  int64_t mlp_width;
  // Each routed expert's gate/up [expert_width, hidden] and down [hidden, expert_width].
  const uint16_t *const *expert_gate, *const *expert_up, *const *expert_down;
} vl2_layer;

typedef struct {
  int64_t n_layers, hidden, heads, head_dim, experts, top_k, expert_width, vocab;
  float attention_scale, routed_scaling, final_eps;
  const vl2_layer *layers;
  const uint16_t *final_norm, *lm_head;  // lm_head: [vocab, hidden]
} vl2_model;

typedef struct {
  uint16_t *keys;    // [heads, capacity, head_dim]
  uint16_t *values;  // [heads, head_dim, capacity] (dimension-major)
  int64_t capacity;
} vl2_cache_layer;

enum { MAX_TOP_K = 64 };

// Built with -DVL2_PROFILE (python -m bench.decode_parts --native), each phase's time is summed into
// vl2_phase_seconds: at the end of a phase the threads meet and the main one notes the time.
#ifdef VL2_PROFILE
double vl2_phase_seconds[16];
#define PHASE(i)                                         \
  do {                                                   \
    _Pragma("omp barrier") _Pragma("omp master") {       \
      const double now_ = omp_get_wtime();               \
      vl2_phase_seconds[i] += now_ - phase_start_;       \
      phase_start_ = now_;                               \
    }                                                    \
  } while (0)
#else
#define PHASE(i) \
  do {           \
  } while (0)
#endif

static inline float from_bf16(uint16_t h) {
  uint32_t u = (uint32_t)h << 16;
  float f;
  memcpy(&f, &u, 4);
  return f;
}

static inline uint16_t to_bf16(float f) {  // round to nearest even, as torch rounds
  uint32_t u;
  memcpy(&u, &f, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40);  // quiet NaN
  u += 0x7fffu + ((u >> 16) & 1u);
  return (uint16_t)(u >> 16);
}

static inline float round_bf16(float f) { return from_bf16(to_bf16(f)); }

static inline __mmask16 tail_mask16(int64_t n) { return n >= 16 ? 0xffff : (__mmask16)((1u << n) - 1); }

static inline __m256bh load_bh16(const uint16_t *p, __mmask16 mask) {
  return (__m256bh)_mm256_maskz_loadu_epi16(mask, p);
}

// out[r] = w[r, :] . x for `rows` rows of `w` (row stride `stride`), bf16 in, fp32 accumulation.
// One row at a time, so that a thread reads its weights as one sequential stream for the hardware
// prefetcher (two or four rows read side by side reached 0.6-0.85 of `sum`'s speed, one at a time
// about 1.0); eight accumulators along the row hide dpbf16's latency. 256-bit loads: on Zen 4 a
// stream of them reads memory 9-10 % faster than one of 512-bit loads (a plain read: 1.16 against
// 1.05 of `sum`; this product: 1.11 against 1.02). Software prefetching 1-4 KB ahead made whole
// steps 28-31 % slower (paired).
static void dot_rows(const uint16_t *w, int64_t stride, const uint16_t *x, int64_t k, int64_t rows, float *out) {
  for (int64_t r = 0; r < rows; ++r) {
    const uint16_t *row = w + r * stride;
    __m256 a[8];
    for (int j = 0; j < 8; ++j) a[j] = _mm256_setzero_ps();
    int64_t i = 0;
    for (; i + 128 <= k; i += 128) {
      for (int j = 0; j < 8; ++j)
        a[j] = _mm256_dpbf16_ps(a[j], load_bh16(row + i + 16 * j, 0xffff), load_bh16(x + i + 16 * j, 0xffff));
    }
    // The tail (under 128 values) in at most eight pieces, unrolled so that every index into `a` is
    // a constant: with a varying index the accumulators live on the stack, and reading them back
    // after every row stalls on store forwarding. That read lm_head at 0.45-0.78 of `sum` instead
    // of 0.89-0.94, and whole steps took 1.25x as long (paired).
#pragma GCC unroll 8
    for (int j = 0; j < 8; ++j) {
      if (i < k) {
        const __mmask16 m = tail_mask16(k - i);
        a[j] = _mm256_dpbf16_ps(a[j], load_bh16(row + i, m), load_bh16(x + i, m));
        i += 16;
      }
    }
    for (int j = 1; j < 8; ++j) a[0] = _mm256_add_ps(a[0], a[j]);
    __m128 half = _mm_add_ps(_mm256_castps256_ps128(a[0]), _mm256_extractf128_ps(a[0], 1));
    half = _mm_add_ps(half, _mm_movehl_ps(half, half));
    out[r] = _mm_cvtss_f32(_mm_add_ss(half, _mm_movehdup_ps(half)));
  }
}

static inline __m512 widen(const uint16_t *p, __mmask16 mask) {
  const __m256i h = _mm256_maskz_loadu_epi16(mask, p);
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

// sum_t p[t] * v[t] for fp32 `p` and bf16 `v` (attention's probabilities and one value dimension).
static float dot_f32_bf16(const float *p, const uint16_t *v, int64_t n) {
  __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps();
  int64_t t = 0;
  for (; t + 32 <= n; t += 32) {
    a0 = _mm512_fmadd_ps(_mm512_loadu_ps(p + t), widen(v + t, 0xffff), a0);
    a1 = _mm512_fmadd_ps(_mm512_loadu_ps(p + t + 16), widen(v + t + 16, 0xffff), a1);
  }
  for (; t < n; t += 16) {
    const __mmask16 m = tail_mask16(n - t);
    a0 = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(m, p + t), widen(v + t, m), a0);
  }
  return _mm512_reduce_add_ps(_mm512_add_ps(a0, a1));
}

// e^x for x <= 0: x = n ln2 + r with |r| <= ln2 / 2, e^r by its degree-7 Taylor polynomial
// (relative error below 1e-8 there), times 2^n; 0 below -87 (and for -inf, a masked position).
static inline __m512 exp_nonpositive(__m512 x) {
  const __mmask16 live = _mm512_cmp_ps_mask(x, _mm512_set1_ps(-87.0f), _CMP_GE_OQ);
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)), _MM_FROUND_TO_NEAREST_INT);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693145751953125f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(1.428606765330187045e-06f), r);
  __m512 p = _mm512_set1_ps(1.0f / 5040);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 720));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 120));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 24));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 6));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
  return _mm512_maskz_scalef_ps(live, p, n);
}

// Softmax of s[0..n) in place, in fp32.
static void softmax(float *s, int64_t n) {
  __m512 top = _mm512_set1_ps(-INFINITY);
  for (int64_t t = 0; t < n; t += 16) top = _mm512_max_ps(top, _mm512_mask_loadu_ps(top, tail_mask16(n - t), s + t));
  const __m512 shift = _mm512_set1_ps(_mm512_reduce_max_ps(top));
  __m512 total = _mm512_setzero_ps();
  for (int64_t t = 0; t < n; t += 16) {
    const __mmask16 m = tail_mask16(n - t);
    const __m512 v = exp_nonpositive(_mm512_sub_ps(_mm512_maskz_loadu_ps(m, s + t), shift));
    _mm512_mask_storeu_ps(s + t, m, v);
    total = _mm512_add_ps(total, _mm512_maskz_mov_ps(m, v));
  }
  const __m512 inverse = _mm512_set1_ps(1.0f / _mm512_reduce_add_ps(total));
  for (int64_t t = 0; t < n; t += 16) {
    const __mmask16 m = tail_mask16(n - t);
    _mm512_mask_storeu_ps(s + t, m, _mm512_mul_ps(_mm512_maskz_loadu_ps(m, s + t), inverse));
  }
}

// fp32 router logits: w[e, :] . x with x widened from bf16 (transformers' router runs in fp32).
static float dot_f32(const float *w, const uint16_t *x, int64_t n) {
  __m512 a = _mm512_setzero_ps();
  for (int64_t i = 0; i < n; i += 16) {
    const __mmask16 m = tail_mask16(n - i);
    a = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(m, w + i), widen(x + i, m), a);
  }
  return _mm512_reduce_add_ps(a);
}

// transformers' RMSNorm: normalize in fp32, round to bf16, multiply by the bf16 weight, round.
static void rms_norm(const uint16_t *h, const uint16_t *weight, float eps, int64_t n, uint16_t *out) {
  float squares = 0.0f;
  for (int64_t i = 0; i < n; ++i) squares += from_bf16(h[i]) * from_bf16(h[i]);
  const float inverse = 1.0f / sqrtf(squares / (float)n + eps);
  for (int64_t i = 0; i < n; ++i) out[i] = to_bf16(from_bf16(weight[i]) * round_bf16(from_bf16(h[i]) * inverse));
}

// Rotate-half RoPE in bf16 arithmetic, as transformers' apply_rotary_pos_emb on bf16 tensors:
// (x * cos) + (rotate_half(x) * sin), each product and the sum rounded.
static void rotate(const uint16_t *x, const uint16_t *cos, const uint16_t *sin, int64_t d, uint16_t *out) {
  const int64_t half = d / 2;
  for (int64_t i = 0; i < d; ++i) {
    const float rotated = i < half ? -from_bf16(x[i + half]) : from_bf16(x[i - half]);
    const float a = round_bf16(from_bf16(x[i]) * from_bf16(cos[i]));
    const float b = round_bf16(rotated * from_bf16(sin[i]));
    out[i] = to_bf16(a + b);
  }
}

static inline float silu(float g) { return g / (1.0f + expf(-g)); }

// This thread's share of `n` rows: a contiguous range, so that it reads its part of a weight as one
// stream; the same rows every time for the same `n`, so that a thread can reuse its own results
// without a barrier.
static inline void my_rows(int64_t n, int64_t *begin, int64_t *end) {
  const int64_t t = omp_get_thread_num(), threads = omp_get_num_threads();
  const int64_t per = (n + threads - 1) / threads;
  *begin = t * per < n ? t * per : n;
  *end = *begin + per < n ? *begin + per : n;
}

// Rows [b, e) of `out` = round(w . x) for a weight [n, k].
static void product_rows(const uint16_t *w, const uint16_t *x, int64_t k, int64_t b, int64_t e, float *scratch,
                         uint16_t *out) {
  dot_rows(w + b * k, k, x, k, e - b, scratch + b);
  for (int64_t r = b; r < e; ++r) out[r] = to_bf16(scratch[r]);
}

// This thread's rows of a SwiGLU's hidden activations [width]:
// round(silu(round(gate . x)) * round(up . x)), 64 rows of the gate, then the same of the up.
static void swiglu_hidden(const uint16_t *gate, const uint16_t *up, const uint16_t *x, int64_t k, int64_t width,
                          uint16_t *h) {
  int64_t b, e;
  my_rows(width, &b, &e);
  for (int64_t r = b; r < e; r += 64) {
    const int64_t n = e - r < 64 ? e - r : 64;
    float g[64], u[64];
    dot_rows(gate + r * k, k, x, k, n, g);
    dot_rows(up + r * k, k, x, k, n, u);
    for (int64_t j = 0; j < n; ++j) h[r + j] = to_bf16(round_bf16(silu(round_bf16(g[j]))) * round_bf16(u[j]));
  }
}

int64_t vl2_work16_size(const vl2_model *m) {
  const int64_t width = m->heads * m->head_dim;
  int64_t widest = 0;
  for (int64_t l = 0; l < m->n_layers; ++l)
    if (m->layers[l].mlp_width > widest) widest = m->layers[l].mlp_width;
  return 3 * width + width + m->top_k * m->expert_width + widest;
}

// fp32 scratch for one phase's rows: q, k and v; a down projection and the routed mix; or the
// logits.
static int64_t scratch_rows(const vl2_model *m) {
  int64_t n = 3 * m->heads * m->head_dim;
  if (2 * m->hidden > n) n = 2 * m->hidden;
  return m->vocab > n ? m->vocab : n;
}

int64_t vl2_work32_size(const vl2_model *m, int64_t length) {
  return m->experts + scratch_rows(m) + m->heads * length;
}

// One step. `hidden` [hidden] holds the token's embedding and is overwritten with the last layer's
// output; `cos`/`sin` [head_dim] are the token's rotary embedding (bf16); the new key and value go
// to position `slot` of each cache layer, and attention reads positions [0, length) of which
// `allowed` (NULL: all) says which are not padding. Writes bf16 logits [vocab].
void vl2_decode_step(const vl2_model *m, uint16_t *hidden, const uint16_t *cos, const uint16_t *sin, int64_t slot,
                     int64_t length, const uint8_t *allowed, const vl2_cache_layer *cache, uint16_t *logits,
                     uint16_t *work16, float *work32, int threads) {
  const int64_t H = m->hidden, D = m->head_dim, heads = m->heads, width = heads * D;
  const int64_t E = m->experts, K = m->top_k, I = m->expert_width;
  uint16_t *qkv = work16, *attended = qkv + 3 * width, *routed = attended + width;
  uint16_t *mlp = routed + K * I;
  // fp32 scratch: router logits; one phase's per-row products (each thread writes and reads only
  // its own rows, and a barrier ends every phase); attention scores.
  float *router_logits = work32, *rows = work32 + E, *scores = rows + scratch_rows(m);
  float *mixed = rows, *down = rows + H;
#ifdef VL2_PROFILE
  double phase_start_ = omp_get_wtime();
#endif

#pragma omp parallel num_threads(threads)
  {
    // Each thread normalizes the hidden state into its own copy and picks the experts itself
    // (the same bits in every thread): no thread waits while one does it alone.
    uint16_t x[H];
    int chosen[MAX_TOP_K];
    float mixing[MAX_TOP_K], probabilities[E];
    int64_t b, e;
    for (int64_t l = 0; l < m->n_layers; ++l) {
      const vl2_layer *layer = &m->layers[l];
      const vl2_cache_layer *kv = &cache[l];
      const int64_t capacity = kv->capacity;
      rms_norm(hidden, layer->input_norm, layer->input_eps, H, x);
      PHASE(0);

      my_rows(width, &b, &e);
      product_rows(layer->q, x, H, b, e, rows, qkv);
      product_rows(layer->k, x, H, b, e, rows + width, qkv + width);
      product_rows(layer->v, x, H, b, e, rows + 2 * width, qkv + 2 * width);
#pragma omp barrier
      PHASE(1);

      // Per head, on the thread that owns it: the rotary embedding, the new key and value written
      // into the cache, then attention over the cache in fp32 (as transformers' attention on the
      // CPU computes it).
      my_rows(heads, &b, &e);
      for (int64_t h = b; h < e; ++h) {
        uint16_t query[D];
        rotate(qkv + h * D, cos, sin, D, query);
        rotate(qkv + width + h * D, cos, sin, D, kv->keys + (h * capacity + slot) * D);
        for (int64_t i = 0; i < D; ++i) kv->values[(h * D + i) * capacity + slot] = qkv[2 * width + h * D + i];
        float *s = scores + h * length;
        dot_rows(kv->keys + h * capacity * D, D, query, D, length, s);
        for (int64_t t = 0; t < length; ++t) s[t] = allowed && !allowed[t] ? -INFINITY : s[t] * m->attention_scale;
        softmax(s, length);
        for (int64_t i = 0; i < D; ++i)
          attended[h * D + i] = to_bf16(dot_f32_bf16(s, kv->values + (h * D + i) * capacity, length));
      }
#pragma omp barrier
      PHASE(2);

      my_rows(H, &b, &e);
      dot_rows(layer->o + b * width, width, attended, width, e - b, down + b);
      for (int64_t r = b; r < e; ++r) hidden[r] = to_bf16(from_bf16(hidden[r]) + round_bf16(down[r]));
#pragma omp barrier
      PHASE(3);

      rms_norm(hidden, layer->post_norm, layer->post_eps, H, x);
      if (layer->router) {  // softmax over all experts, then the top K (greedy), in fp32
        my_rows(E, &b, &e);
        for (int64_t j = b; j < e; ++j) router_logits[j] = dot_f32(layer->router + j * H, x, H);
#pragma omp barrier
        float top = -INFINITY, total = 0.0f;
        for (int64_t j = 0; j < E; ++j)
          if (router_logits[j] > top) top = router_logits[j];
        for (int64_t j = 0; j < E; ++j) total += probabilities[j] = expf(router_logits[j] - top);
        // The K largest, largest first. A taken expert is marked -1 (probabilities are >= 0);
        // with NaN probabilities (as the stock decoder, the logits become NaN) the first
        // experts not taken are chosen, never an index out of range.
        for (int64_t s = 0; s < K; ++s) {
          int64_t best = 0;
          while (probabilities[best] < 0.0f) ++best;  // K <= E (native.py checks)
          for (int64_t j = best + 1; j < E; ++j)
            if (probabilities[j] > probabilities[best]) best = j;
          chosen[s] = (int)best;
          mixing[s] = probabilities[best] / total * m->routed_scaling;
          probabilities[best] = -1.0f;
        }
      }
      PHASE(4);

      // SwiGLU hidden activations: each chosen expert's, then the shared experts' (or the dense
      // MLP's); each thread streams through its rows of one weight at a time.
      if (layer->router)
        for (int64_t s = 0; s < K; ++s)
          swiglu_hidden(layer->expert_gate[chosen[s]], layer->expert_up[chosen[s]], x, H, I, routed + s * I);
      swiglu_hidden(layer->mlp_gate, layer->mlp_up, x, H, layer->mlp_width, mlp);
#pragma omp barrier
      PHASE(5);

      // Down projections: each routed expert's output rounded and mixed in fp32 (largest weight
      // first; the stock decoder adds them in torch.topk's unsorted order, so a sum may differ in
      // its last bit), the shared experts' output added, then the residual.
      my_rows(H, &b, &e);
      if (layer->router) {
        for (int64_t r = b; r < e; ++r) mixed[r] = 0.0f;
        for (int64_t s = 0; s < K; ++s) {
          dot_rows(layer->expert_down[chosen[s]] + b * I, I, routed + s * I, I, e - b, down + b);
          for (int64_t r = b; r < e; ++r) mixed[r] += round_bf16(down[r]) * mixing[s];
        }
      }
      dot_rows(layer->mlp_down + b * layer->mlp_width, layer->mlp_width, mlp, layer->mlp_width, e - b, down + b);
      for (int64_t r = b; r < e; ++r) {
        const float update = layer->router ? round_bf16(round_bf16(mixed[r]) + round_bf16(down[r])) : round_bf16(down[r]);
        hidden[r] = to_bf16(from_bf16(hidden[r]) + update);
      }
#pragma omp barrier
      PHASE(6);
    }

    rms_norm(hidden, m->final_norm, m->final_eps, H, x);
    my_rows(m->vocab, &b, &e);
    product_rows(m->lm_head, x, H, b, e, rows, logits);
  }
#ifdef VL2_PROFILE
  vl2_phase_seconds[7] += omp_get_wtime() - phase_start_;
#endif
}
