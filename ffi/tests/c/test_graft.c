/*
 * C test of graft's ABI: every function, success and error paths.
 *
 *   test_graft [MODELS_DIR [TMP_DIR]]
 *
 * MODELS_DIR defaults to ../shared/conformance/models (run from the repo root),
 * TMP_DIR (where a truncated model copy is written) to $TMPDIR or /tmp.
 * Exits 0 when every check passes; prints each failure.
 */
#include "graft.h"

#include <math.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

static int failures = 0;
static int checks = 0;

#define CHECK(cond, ...)                                                     \
    do {                                                                     \
        checks++;                                                            \
        if (!(cond)) {                                                       \
            failures++;                                                      \
            fprintf(stderr, "FAIL %s:%d: %s: ", __FILE__, __LINE__, #cond);  \
            fprintf(stderr, __VA_ARGS__);                                    \
            fprintf(stderr, "\n");                                           \
        }                                                                    \
    } while (0)

/* A call expected to fail with `want` and leave a non-empty message. */
#define EXPECT_ERR(call, want)                                               \
    do {                                                                     \
        graft_status st_ = (call);                                           \
        const char *msg_ = graft_last_error();                               \
        CHECK(st_ == (want), "got %s, want %s (%s)", graft_status_name(st_), \
              graft_status_name(want), msg_);                                \
        CHECK(msg_ != NULL && msg_[0] != '\0', "empty error message");       \
    } while (0)

#define EXPECT_OK(call)                                                      \
    do {                                                                     \
        graft_status st_ = (call);                                           \
        CHECK(st_ == GRAFT_OK, "got %s: %s", graft_status_name(st_),         \
              graft_last_error());                                           \
        CHECK(graft_last_error()[0] == '\0', "message after success");       \
    } while (0)

static char models_dir[1024];

static const char *model_path(const char *name) {
    static char buf[4][2048];
    static int next = 0;
    char *b = buf[next++ % 4];
    snprintf(b, sizeof buf[0], "%s/%s", models_dir, name);
    return b;
}

/* Writes the first `keep` bytes of `src` to `dst`; returns 0 on success. */
static int truncated_copy(const char *src, const char *dst, long keep) {
    FILE *in = fopen(src, "rb");
    if (!in) return -1;
    FILE *out = fopen(dst, "wb");
    if (!out) {
        fclose(in);
        return -1;
    }
    char chunk[4096];
    long left = keep;
    while (left > 0) {
        size_t want = left < (long)sizeof chunk ? (size_t)left : sizeof chunk;
        size_t got = fread(chunk, 1, want, in);
        if (got == 0) break;
        fwrite(chunk, 1, got, out);
        left -= (long)got;
    }
    fclose(in);
    return fclose(out) == 0 ? 0 : -1;
}

/* ---- generation helpers ---- */

typedef struct {
    size_t calls;
    size_t stop_after;          /* return false at this call (0 = never) */
    const graft_session *cancel_session; /* call graft_session_cancel at stop_after */
    graft_status busy_status;   /* status of a re-entrant call made from the callback */
    int piece_ok;
} cb_state;

static bool on_token(uint32_t token, const char *piece, size_t piece_len, void *user) {
    cb_state *s = (cb_state *)user;
    (void)token;
    s->calls++;
    if (piece == NULL || strlen(piece) != piece_len) s->piece_ok = 0;
    if (s->cancel_session != NULL) {
        size_t len = 0;
        /* Re-entrant use of the same session is refused, never a deadlock. */
        s->busy_status = graft_session_seq_len(s->cancel_session, 0, &len);
        if (s->calls == s->stop_after) graft_session_cancel(s->cancel_session);
        return true;
    }
    return s->stop_after == 0 || s->calls < s->stop_after;
}

#define MAX_GEN 16

/* Greedy generation of MAX_GEN tokens (ignoring EOS); returns the count. */
static size_t greedy(const graft_session *s, const uint32_t *prompt, size_t n_prompt,
                     uint32_t *out) {
    graft_generate_params p = graft_generate_params_default();
    p.max_tokens = MAX_GEN;
    p.ignore_eos = true;
    graft_generate_result r = {0, GRAFT_FINISH_STOP};
    cb_state cb = {0, 0, NULL, GRAFT_OK, 1};
    EXPECT_OK(graft_generate(s, prompt, n_prompt, &p, on_token, &cb, out, MAX_GEN, &r));
    CHECK(r.n_tokens == MAX_GEN, "generated %zu tokens", r.n_tokens);
    CHECK(r.finish == GRAFT_FINISH_LENGTH, "finish %d", (int)r.finish);
    CHECK(cb.calls == r.n_tokens, "callback ran %zu times for %zu tokens", cb.calls, r.n_tokens);
    CHECK(cb.piece_ok, "pieces are NUL-terminated with the right length");
    return r.n_tokens;
}

static int same_tokens(const uint32_t *a, const uint32_t *b, size_t n) {
    return memcmp(a, b, n * sizeof *a) == 0;
}

/* ---- tests ---- */

static void test_version(void) {
    CHECK(graft_abi_version() == GRAFT_ABI_VERSION, "abi %u", graft_abi_version());
    const char *v = graft_version();
    CHECK(v != NULL && strlen(v) > 0, "version string");
    CHECK(strcmp(graft_status_name(GRAFT_ERR_IO), "GRAFT_ERR_IO") == 0, "status name");
    CHECK(graft_last_error() != NULL && graft_last_error()[0] == '\0', "no error yet");
}

static void test_load_errors(const char *tmp_dir) {
    graft_model *m = (graft_model *)0x1; /* must be reset to NULL on failure */
    EXPECT_ERR(graft_model_load(NULL, NULL, &m), GRAFT_ERR_INVALID_ARGUMENT);
    CHECK(m == NULL, "out reset on failure");
    EXPECT_ERR(graft_model_load(model_path("llama-gqa-Q8_0.gguf"), NULL, NULL),
               GRAFT_ERR_INVALID_ARGUMENT);
    EXPECT_ERR(graft_model_load(model_path("does-not-exist.gguf"), NULL, &m), GRAFT_ERR_IO);
    CHECK(m == NULL, "no handle for a missing file");

    char bad[2048];
    snprintf(bad, sizeof bad, "%s/graft_test_truncated_%ld.gguf", tmp_dir, (long)getpid());
    CHECK(truncated_copy(model_path("llama-gqa-Q8_0.gguf"), bad, 100000) == 0,
          "cannot write %s", bad);
    EXPECT_ERR(graft_model_load(bad, NULL, &m), GRAFT_ERR_FORMAT);
    CHECK(m == NULL, "no handle for a truncated file");
    /* A file cut inside the header. */
    CHECK(truncated_copy(model_path("llama-gqa-Q8_0.gguf"), bad, 10) == 0, "write");
    EXPECT_ERR(graft_model_load(bad, NULL, &m), GRAFT_ERR_FORMAT);
    remove(bad);

    graft_model_options o = graft_model_options_default();
    o.provider = "onnxruntime";
    EXPECT_ERR(graft_model_load(model_path("llama-gqa-Q8_0.gguf"), &o, &m), GRAFT_ERR_UNSUPPORTED);
    o = graft_model_options_default();
    o.use_mmap = false;
    EXPECT_ERR(graft_model_load(model_path("llama-gqa-Q8_0.gguf"), &o, &m), GRAFT_ERR_UNSUPPORTED);
    CHECK(m == NULL, "no handle");
}

static void test_info_and_tokens(const graft_model *m) {
    graft_model_info info;
    EXPECT_OK(graft_model_get_info(m, &info));
    CHECK(info.n_vocab > 0 && info.n_layer > 0 && info.n_embd > 0, "info %u %u %u",
          info.n_vocab, info.n_layer, info.n_embd);
    EXPECT_ERR(graft_model_get_info(NULL, &info), GRAFT_ERR_INVALID_ARGUMENT);
    EXPECT_ERR(graft_model_get_info(m, NULL), GRAFT_ERR_INVALID_ARGUMENT);
    if (info.eos >= 0) CHECK(graft_token_is_eog(m, (uint32_t)info.eos), "eos is eog");
    CHECK(!graft_token_is_eog(NULL, 0), "NULL model");

    const char *text = "Hello world, this is graft.";
    size_t n = 0;
    EXPECT_OK(graft_tokenize(m, text, strlen(text), true, false, NULL, 0, &n));
    CHECK(n > 2, "token count %zu", n);
    uint32_t small[1];
    size_t n2 = 0;
    EXPECT_ERR(graft_tokenize(m, text, strlen(text), true, false, small, 1, &n2),
               GRAFT_ERR_BUFFER_TOO_SMALL);
    CHECK(n2 == n, "required count reported");
    uint32_t toks[64];
    EXPECT_OK(graft_tokenize(m, text, strlen(text), true, false, toks, 64, &n2));
    CHECK(n2 == n, "same count");
    if (info.bos >= 0) CHECK(toks[0] == (uint32_t)info.bos, "BOS first");
    EXPECT_ERR(graft_tokenize(m, "\xff\xfe", 2, true, false, toks, 64, &n2),
               GRAFT_ERR_INVALID_ARGUMENT);
    EXPECT_ERR(graft_tokenize(m, NULL, 5, true, false, toks, 64, &n2), GRAFT_ERR_INVALID_ARGUMENT);
    EXPECT_ERR(graft_tokenize(m, text, 5, true, false, toks, 64, NULL), GRAFT_ERR_INVALID_ARGUMENT);
    EXPECT_ERR(graft_tokenize(NULL, text, 5, true, false, toks, 64, &n2), GRAFT_ERR_INVALID_ARGUMENT);
    EXPECT_ERR(graft_tokenize(m, text, 5, true, false, NULL, 64, &n2), GRAFT_ERR_INVALID_ARGUMENT);

    size_t len = 0;
    EXPECT_OK(graft_detokenize(m, toks, n, false, NULL, 0, &len));
    char *buf = malloc(len + 1);
    CHECK(buf != NULL, "malloc");
    size_t len2 = 0;
    EXPECT_ERR(graft_detokenize(m, toks, n, false, buf, len, &len2), GRAFT_ERR_BUFFER_TOO_SMALL);
    CHECK(len2 == len, "required length reported");
    EXPECT_OK(graft_detokenize(m, toks, n, false, buf, len + 1, &len2));
    CHECK(len2 == len && strlen(buf) == len, "length %zu", len2);
    CHECK(strstr(buf, "Hello world, this is graft.") != NULL, "round trip: \"%s\"", buf);
    free(buf);
    uint32_t bad_tok = info.n_vocab + 5;
    EXPECT_ERR(graft_detokenize(m, &bad_tok, 1, false, NULL, 0, &len), GRAFT_ERR_INVALID_ARGUMENT);
    EXPECT_ERR(graft_detokenize(m, NULL, 3, false, NULL, 0, &len), GRAFT_ERR_INVALID_ARGUMENT);
    EXPECT_ERR(graft_detokenize(m, toks, n, false, NULL, 0, NULL), GRAFT_ERR_INVALID_ARGUMENT);
    EXPECT_ERR(graft_detokenize(NULL, toks, n, false, NULL, 0, &len), GRAFT_ERR_INVALID_ARGUMENT);
}

static void test_sessions_and_generation(graft_model *m, const uint32_t *prompt, size_t n_prompt) {
    graft_session *s = (graft_session *)0x1;
    graft_session_options so = graft_session_options_default();
    EXPECT_ERR(graft_session_create(NULL, &so, &s), GRAFT_ERR_INVALID_ARGUMENT);
    CHECK(s == NULL, "out reset");
    EXPECT_ERR(graft_session_create(m, &so, NULL), GRAFT_ERR_INVALID_ARGUMENT);
    so.n_ctx = 0;
    EXPECT_ERR(graft_session_create(m, &so, &s), GRAFT_ERR_INVALID_ARGUMENT);
    so = graft_session_options_default();
    so.kv_type = 7;
    EXPECT_ERR(graft_session_create(m, &so, &s), GRAFT_ERR_INVALID_ARGUMENT);
    so = graft_session_options_default();
    so.n_ctx = 256;
    EXPECT_OK(graft_session_create(m, &so, &s));
    CHECK(s != NULL, "session");

    /* Greedy generation is deterministic. */
    uint32_t a[MAX_GEN], b[MAX_GEN];
    greedy(s, prompt, n_prompt, a);
    greedy(s, prompt, n_prompt, b);
    CHECK(same_tokens(a, b, MAX_GEN), "two greedy runs differ");
    size_t len = 0;
    EXPECT_OK(graft_session_seq_len(s, GRAFT_GENERATE_SEQ, &len));
    CHECK(len == n_prompt + MAX_GEN - 1, "seq len %zu", len);

    /* Cancellation from the callback. */
    graft_generate_params p = graft_generate_params_default();
    p.max_tokens = MAX_GEN;
    p.ignore_eos = true;
    graft_generate_result r;
    cb_state cb = {0, 3, NULL, GRAFT_OK, 1};
    uint32_t c[MAX_GEN];
    EXPECT_ERR(graft_generate(s, prompt, n_prompt, &p, on_token, &cb, c, MAX_GEN, &r),
               GRAFT_ERR_CANCELLED);
    CHECK(r.n_tokens == 3 && r.finish == GRAFT_FINISH_CANCELLED, "stopped after %zu", r.n_tokens);
    CHECK(cb.calls == 3, "callback calls %zu", cb.calls);
    CHECK(same_tokens(a, c, 3), "cancelled run starts like the full one");

    /* Cancellation through graft_session_cancel (made from the callback here), and
     * re-entrant calls refused with BUSY. */
    cb_state cb2 = {0, 2, s, GRAFT_OK, 1};
    EXPECT_ERR(graft_generate(s, prompt, n_prompt, &p, on_token, &cb2, NULL, 0, &r),
               GRAFT_ERR_CANCELLED);
    CHECK(r.n_tokens == 2, "stopped after %zu", r.n_tokens);
    CHECK(cb2.busy_status == GRAFT_ERR_BUSY, "re-entrant call gave %s",
          graft_status_name(cb2.busy_status));
    /* A stale cancel request does not affect the next call. */
    EXPECT_OK(graft_session_cancel(s));
    greedy(s, prompt, n_prompt, c);
    CHECK(same_tokens(a, c, MAX_GEN), "generation after a cancel");
    EXPECT_ERR(graft_session_cancel(NULL), GRAFT_ERR_INVALID_ARGUMENT);

    /* Argument errors. */
    EXPECT_ERR(graft_generate(NULL, prompt, n_prompt, &p, NULL, NULL, NULL, 0, &r),
               GRAFT_ERR_INVALID_ARGUMENT);
    EXPECT_ERR(graft_generate(s, prompt, 0, &p, NULL, NULL, NULL, 0, &r), GRAFT_ERR_INVALID_ARGUMENT);
    EXPECT_ERR(graft_generate(s, NULL, 4, &p, NULL, NULL, NULL, 0, &r), GRAFT_ERR_INVALID_ARGUMENT);
    EXPECT_ERR(graft_generate(s, prompt, n_prompt, &p, NULL, NULL, NULL, 5, &r),
               GRAFT_ERR_INVALID_ARGUMENT);
    uint32_t bad_prompt[2] = {1, 0xFFFFFFF0u};
    EXPECT_ERR(graft_generate(s, bad_prompt, 2, &p, NULL, NULL, NULL, 0, &r),
               GRAFT_ERR_INVALID_ARGUMENT);
    graft_generate_params bad = p;
    bad.top_p = 7.0f;
    bad.temperature = 1.0f;
    EXPECT_ERR(graft_generate(s, prompt, n_prompt, &bad, NULL, NULL, NULL, 0, &r),
               GRAFT_ERR_INVALID_ARGUMENT);
    graft_generate_params big = p;
    big.max_tokens = 100000;
    EXPECT_ERR(graft_generate(s, prompt, n_prompt, &big, NULL, NULL, NULL, 0, &r),
               GRAFT_ERR_CAPACITY);
    /* NULL params and result are allowed. */
    EXPECT_OK(graft_generate(s, prompt, n_prompt, NULL, NULL, NULL, NULL, 0, NULL));

    graft_session_free(s);
    graft_session_free(NULL);
}

static void test_adapters(graft_model *m, const uint32_t *prompt, size_t n_prompt) {
    const char *lora = model_path("llama-gqa-lora-all-r8.gguf");
    uint64_t gen = 0, gen2 = 0;
    EXPECT_ERR(graft_adapter_load(NULL, "a", lora, &gen), GRAFT_ERR_INVALID_ARGUMENT);
    EXPECT_ERR(graft_adapter_load(m, NULL, lora, &gen), GRAFT_ERR_INVALID_ARGUMENT);
    EXPECT_ERR(graft_adapter_load(m, "a", NULL, &gen), GRAFT_ERR_INVALID_ARGUMENT);
    EXPECT_ERR(graft_adapter_load(m, "", lora, &gen), GRAFT_ERR_INVALID_ARGUMENT);
    EXPECT_ERR(graft_adapter_load(m, "a", model_path("missing-lora.gguf"), &gen), GRAFT_ERR_IO);
    EXPECT_ERR(graft_adapter_load(m, "q", model_path("qwen2-lora-all-r8.gguf"), &gen),
               GRAFT_ERR_INCOMPATIBLE);
    CHECK(graft_adapter_count(m) == 0, "nothing loaded after errors");
    EXPECT_OK(graft_adapter_load(m, "a", lora, &gen));
    CHECK(gen > 0, "generation %llu", (unsigned long long)gen);
    CHECK(graft_adapter_count(m) == 1, "one adapter");
    CHECK(graft_adapter_count(NULL) == 0, "NULL model");

    graft_session *s = NULL;
    EXPECT_OK(graft_session_create(m, NULL, &s));
    uint32_t base[MAX_GEN], adapted[MAX_GEN], out[MAX_GEN];
    greedy(s, prompt, n_prompt, base);

    graft_adapter_ref on = {"a", 1.0f};
    EXPECT_OK(graft_session_set_adapters(s, &on, 1));
    greedy(s, prompt, n_prompt, adapted);
    CHECK(!same_tokens(base, adapted, MAX_GEN), "the adapter changes the output");

    graft_adapter_ref zero = {"a", 0.0f};
    EXPECT_OK(graft_session_set_adapters(s, &zero, 1));
    greedy(s, prompt, n_prompt, out);
    CHECK(same_tokens(base, out, MAX_GEN), "scale 0 gives the base output");

    EXPECT_OK(graft_session_set_adapters(s, NULL, 0));
    greedy(s, prompt, n_prompt, out);
    CHECK(same_tokens(base, out, MAX_GEN), "no adapters gives the base output");

    graft_adapter_ref missing = {"nope", 1.0f};
    EXPECT_ERR(graft_session_set_adapters(s, &missing, 1), GRAFT_ERR_NOT_FOUND);
    graft_adapter_ref null_name = {NULL, 1.0f};
    EXPECT_ERR(graft_session_set_adapters(s, &null_name, 1), GRAFT_ERR_INVALID_ARGUMENT);
    graft_adapter_ref nan_scale = {"a", NAN};
    EXPECT_ERR(graft_session_set_adapters(s, &nan_scale, 1), GRAFT_ERR_INVALID_ARGUMENT);
    EXPECT_ERR(graft_session_set_adapters(s, NULL, 2), GRAFT_ERR_INVALID_ARGUMENT);
    EXPECT_ERR(graft_session_set_adapters(NULL, &on, 1), GRAFT_ERR_INVALID_ARGUMENT);

    /* The session keeps the version it activated across replace and unload. */
    EXPECT_OK(graft_session_set_adapters(s, &on, 1));
    EXPECT_OK(graft_adapter_replace(m, "a", lora, &gen2));
    CHECK(gen2 > gen, "replace gives a newer generation (%llu > %llu)",
          (unsigned long long)gen2, (unsigned long long)gen);
    EXPECT_ERR(graft_adapter_replace(m, "zzz", lora, &gen2), GRAFT_ERR_NOT_FOUND);
    EXPECT_ERR(graft_adapter_replace(m, "a", model_path("qwen2-lora-all-r8.gguf"), &gen2),
               GRAFT_ERR_INCOMPATIBLE);
    EXPECT_ERR(graft_adapter_replace(m, "a", NULL, &gen2), GRAFT_ERR_INVALID_ARGUMENT);
    EXPECT_OK(graft_adapter_unload(m, "a"));
    CHECK(graft_adapter_count(m) == 0, "unloaded");
    greedy(s, prompt, n_prompt, out);
    CHECK(same_tokens(adapted, out, MAX_GEN), "activated version outlives the unload");
    EXPECT_ERR(graft_adapter_unload(m, "a"), GRAFT_ERR_NOT_FOUND);
    EXPECT_ERR(graft_adapter_unload(m, NULL), GRAFT_ERR_INVALID_ARGUMENT);
    EXPECT_ERR(graft_adapter_unload(NULL, "a"), GRAFT_ERR_INVALID_ARGUMENT);
    EXPECT_ERR(graft_session_set_adapters(s, &on, 1), GRAFT_ERR_NOT_FOUND);
    graft_session_free(s);
}

/* Decodes `n` tokens of one sequence alone and copies the last token's logits. */
static void decode_alone(const graft_session *s, uint32_t seq, const uint32_t *toks, size_t n,
                         float *logits, size_t n_vocab) {
    graft_batch_token batch[64];
    for (size_t i = 0; i < n; i++) {
        batch[i].token = toks[i];
        batch[i].seq = seq;
        batch[i].logits = i + 1 == n;
    }
    EXPECT_OK(graft_decode(s, batch, n));
    const float *row = NULL;
    size_t nv = 0;
    EXPECT_OK(graft_get_logits(s, n - 1, &row, &nv));
    CHECK(nv == n_vocab && row != NULL, "logits row");
    if (row && nv == n_vocab) memcpy(logits, row, n_vocab * sizeof(float));
}

static float max_abs_diff(const float *a, const float *b, size_t n) {
    float d = 0.0f;
    for (size_t i = 0; i < n; i++) {
        float x = fabsf(a[i] - b[i]);
        if (x > d || isnan(x)) d = isnan(x) ? INFINITY : x;
    }
    return d;
}

static void test_batched_decode(const graft_model *m, const uint32_t *pa, size_t na,
                                const uint32_t *pb, size_t nb, size_t n_vocab) {
    graft_session_options so = graft_session_options_default();
    so.n_ctx = 256;
    graft_session *s = NULL;
    EXPECT_OK(graft_session_create(m, &so, &s));
    float *la = malloc(n_vocab * sizeof(float));
    float *lb = malloc(n_vocab * sizeof(float));
    CHECK(la && lb, "malloc");

    decode_alone(s, 1, pa, na, la, n_vocab);
    EXPECT_OK(graft_session_seq_remove(s, 1));
    decode_alone(s, 2, pb, nb, lb, n_vocab);
    EXPECT_OK(graft_session_seq_remove(s, 2));

    /* Both sequences in one batch, interleaved. */
    graft_batch_token batch[128];
    size_t n = 0, ia = 0, ib = 0, last_a = 0, last_b = 0;
    while (ia < na || ib < nb) {
        if (ia < na) {
            batch[n] = (graft_batch_token){pa[ia], 1, ia + 1 == na};
            if (ia + 1 == na) last_a = n;
            n++, ia++;
        }
        if (ib < nb) {
            batch[n] = (graft_batch_token){pb[ib], 2, ib + 1 == nb};
            if (ib + 1 == nb) last_b = n;
            n++, ib++;
        }
    }
    EXPECT_OK(graft_decode(s, batch, n));
    const float *row = NULL;
    size_t nv = 0;
    EXPECT_OK(graft_get_logits(s, last_a, &row, &nv));
    if (row) CHECK(max_abs_diff(row, la, n_vocab) < 1e-3f, "seq 1 batched vs alone: %g",
                   max_abs_diff(row, la, n_vocab));
    EXPECT_OK(graft_get_logits(s, last_b, &row, &nv));
    if (row) CHECK(max_abs_diff(row, lb, n_vocab) < 1e-3f, "seq 2 batched vs alone: %g",
                   max_abs_diff(row, lb, n_vocab));
    size_t len = 0;
    EXPECT_OK(graft_session_seq_len(s, 1, &len));
    CHECK(len == na, "seq 1 len %zu", len);
    EXPECT_OK(graft_session_seq_len(s, 2, &len));
    CHECK(len == nb, "seq 2 len %zu", len);
    EXPECT_ERR(graft_session_seq_len(s, 2, NULL), GRAFT_ERR_INVALID_ARGUMENT);
    EXPECT_ERR(graft_session_seq_len(NULL, 2, &len), GRAFT_ERR_INVALID_ARGUMENT);

    /* Logits access errors. */
    EXPECT_ERR(graft_get_logits(s, 0, &row, &nv), GRAFT_ERR_NOT_FOUND); /* no logits asked */
    EXPECT_ERR(graft_get_logits(s, n + 10, &row, &nv), GRAFT_ERR_NOT_FOUND);
    EXPECT_ERR(graft_get_logits(s, last_a, NULL, &nv), GRAFT_ERR_INVALID_ARGUMENT);
    EXPECT_ERR(graft_get_logits(s, last_a, &row, NULL), GRAFT_ERR_INVALID_ARGUMENT);
    EXPECT_ERR(graft_get_logits(NULL, last_a, &row, &nv), GRAFT_ERR_INVALID_ARGUMENT);

    /* Decode errors. */
    graft_batch_token bad = {(uint32_t)n_vocab, 1, true};
    EXPECT_ERR(graft_decode(s, &bad, 1), GRAFT_ERR_INVALID_ARGUMENT);
    EXPECT_ERR(graft_decode(s, batch, 0), GRAFT_ERR_INVALID_ARGUMENT);
    EXPECT_ERR(graft_decode(s, NULL, 3), GRAFT_ERR_INVALID_ARGUMENT);
    EXPECT_ERR(graft_decode(NULL, batch, 1), GRAFT_ERR_INVALID_ARGUMENT);
    EXPECT_OK(graft_session_seq_len(s, 1, &len));
    CHECK(len == na, "failed decodes leave seq 1 at %zu", len);
    EXPECT_ERR(graft_session_seq_remove(NULL, 1), GRAFT_ERR_INVALID_ARGUMENT);
    graft_session_free(s);

    /* A cache too small for the batch: CAPACITY, and nothing changes. */
    so.n_ctx = 16;
    EXPECT_OK(graft_session_create(m, &so, &s));
    graft_batch_token many[100];
    for (size_t i = 0; i < 100; i++) many[i] = (graft_batch_token){pa[i % na], 0, false};
    EXPECT_ERR(graft_decode(s, many, 100), GRAFT_ERR_CAPACITY);
    EXPECT_OK(graft_session_seq_len(s, 0, &len));
    CHECK(len == 0, "refused batch left %zu tokens", len);
    graft_session_free(s);
    free(la);
    free(lb);
}

/* ---- training ---- */

typedef struct {
    size_t calls;
    size_t last_step;
    size_t cancel_at; /* return false at this step (0 = never) */
    int ordered;
    int finite;
    int same_thread;
    pthread_t caller;
} train_state;

static bool on_train_step(const graft_train_progress *p, void *user) {
    train_state *t = (train_state *)user;
    t->calls++;
    if (p->step != t->last_step + 1 || p->step > p->steps) t->ordered = 0;
    if (!isfinite(p->loss) || !(p->lr > 0.0f)) t->finite = 0;
    if (!pthread_equal(pthread_self(), t->caller)) t->same_thread = 0;
    t->last_step = p->step;
    return t->cancel_at == 0 || p->step < t->cancel_at;
}

static int file_exists(const char *path) { return access(path, F_OK) == 0; }

/* Writes a small "reverse the words" task as JSONL; returns 0 on success. */
static int write_task(const char *path) {
    static const char *words[] = {"red", "blue", "cat", "dog", "sun", "moon", "tree", "sea"};
    FILE *f = fopen(path, "w");
    if (!f) return -1;
    for (int i = 0; i < 48; i++) {
        const char *a = words[i % 8], *b = words[(i / 8 + i) % 8], *c = words[(i * 3 + 1) % 8];
        fprintf(f, "{\"prompt\": \"reverse: %s %s %s =\", \"completion\": \" %s %s %s\"}\n", a, b,
                c, c, b, a);
    }
    return fclose(f) == 0 ? 0 : -1;
}

static void test_training(graft_model *m, const char *tmp, const uint32_t *prompt, size_t n_prompt) {
    char data[1100], bad_data[1100], out[1100], ck[1100], missing[1100];
    snprintf(data, sizeof data, "%s/graft-c-train.jsonl", tmp);
    snprintf(bad_data, sizeof bad_data, "%s/graft-c-bad.jsonl", tmp);
    snprintf(out, sizeof out, "%s/graft-c-lora.gguf", tmp);
    snprintf(ck, sizeof ck, "%s/graft-c-ck.safetensors", tmp);
    snprintf(missing, sizeof missing, "%s/graft-c-missing.jsonl", tmp);
    CHECK(write_task(data) == 0, "write %s", data);
    FILE *f = fopen(bad_data, "w");
    CHECK(f != NULL, "write %s", bad_data);
    if (f) {
        fputs("{\"prompt\": \"a\", \"completion\": \"b\"}\n{\"prompt\": 3}\n", f);
        fclose(f);
    }
    remove(out);
    remove(ck);

    graft_train_params p = graft_train_params_default(GRAFT_TRAIN_LORA);
    CHECK(p.rank == 8 && p.steps == 200 && p.batch == 8, "defaults %zu %zu %zu", p.rank, p.steps,
          p.batch);
    p.data_path = data;
    p.out_path = out;
    p.steps = 4;
    p.batch = 4;
    p.rank = 4;
    p.eval_max = 2;
    p.lr = 5e-3f;

    /* Wrong arguments: nothing trains, nothing is written. */
    graft_train_report r;
    EXPECT_ERR(graft_train(NULL, &p, NULL, NULL, &r), GRAFT_ERR_INVALID_ARGUMENT);
    EXPECT_ERR(graft_train(m, NULL, NULL, NULL, &r), GRAFT_ERR_INVALID_ARGUMENT);
    graft_train_params q = p;
    q.data_path = NULL;
    EXPECT_ERR(graft_train(m, &q, NULL, NULL, &r), GRAFT_ERR_INVALID_ARGUMENT);
    q = p;
    q.out_path = NULL;
    EXPECT_ERR(graft_train(m, &q, NULL, NULL, &r), GRAFT_ERR_INVALID_ARGUMENT);
    q = p;
    q.method = 99;
    EXPECT_ERR(graft_train(m, &q, NULL, NULL, &r), GRAFT_ERR_INVALID_ARGUMENT);
    q = p;
    q.format = "onnx";
    EXPECT_ERR(graft_train(m, &q, NULL, NULL, &r), GRAFT_ERR_INVALID_ARGUMENT);
    q = p;
    q.method = GRAFT_TRAIN_SARA;
    q.format = "peft";
    EXPECT_ERR(graft_train(m, &q, NULL, NULL, &r), GRAFT_ERR_INVALID_ARGUMENT);
    q = p;
    q.rps_scaler = 7;
    EXPECT_ERR(graft_train(m, &q, NULL, NULL, &r), GRAFT_ERR_INVALID_ARGUMENT);
    q = p;
    q.targets = "q,nonsense";
    EXPECT_ERR(graft_train(m, &q, NULL, NULL, &r), GRAFT_ERR_INVALID_ARGUMENT);
    q = p;
    q.data_path = missing;
    EXPECT_ERR(graft_train(m, &q, NULL, NULL, &r), GRAFT_ERR_IO);
    CHECK(strstr(graft_last_error(), "graft-c-missing.jsonl") != NULL, "names the file: %s",
          graft_last_error());
    q = p;
    q.data_path = bad_data;
    EXPECT_ERR(graft_train(m, &q, NULL, NULL, &r), GRAFT_ERR_FORMAT);
    CHECK(strstr(graft_last_error(), "graft-c-bad.jsonl:2") != NULL, "names file:line: %s",
          graft_last_error());
    CHECK(!file_exists(out), "failed runs wrote %s", out);

    /* A LoRA: progress per step, a report, a file that loads and changes generation. */
    train_state t = {0, 0, 0, 1, 1, 1, pthread_self()};
    memset(&r, 0, sizeof r);
    EXPECT_OK(graft_train(m, &p, on_train_step, &t, &r));
    CHECK(t.calls == 4 && t.last_step == 4 && t.ordered && t.finite, "progress %zu %zu %d %d",
          t.calls, t.last_step, t.ordered, t.finite);
    CHECK(t.same_thread, "the callback ran on another thread than graft_train's caller");
    CHECK(r.steps == 4 && r.trainable_params > 0, "report %zu %zu", r.steps, r.trainable_params);
    CHECK(isfinite(r.train_loss) && isfinite(r.eval_loss), "losses %f %f", r.train_loss,
          r.eval_loss);
    CHECK(r.eval_records == 2 && r.eval_exact_match >= 0.0 && r.eval_exact_match <= 1.0,
          "exact match %f over %zu", r.eval_exact_match, r.eval_records);
    CHECK(r.out_bytes > 0 && file_exists(out), "wrote %llu bytes", (unsigned long long)r.out_bytes);
    uint64_t gen = 0;
    EXPECT_OK(graft_adapter_load(m, "trained", out, &gen));
    graft_session *s = NULL;
    EXPECT_OK(graft_session_create(m, NULL, &s));
    uint32_t base[MAX_GEN], adapted[MAX_GEN];
    greedy(s, prompt, n_prompt, base);
    graft_adapter_ref ref = {"trained", 1.0f};
    EXPECT_OK(graft_session_set_adapters(s, &ref, 1));
    greedy(s, prompt, n_prompt, adapted);
    graft_session_free(s);
    EXPECT_OK(graft_adapter_unload(m, "trained"));

    /* Cancel from the callback at step 2: CANCELLED, a checkpoint, no result. */
    remove(out);
    t = (train_state){0, 0, 2, 1, 1, 1, pthread_self()};
    p.checkpoint_path = ck;
    EXPECT_ERR(graft_train(m, &p, on_train_step, &t, &r), GRAFT_ERR_CANCELLED);
    CHECK(t.calls == 2 && r.steps == 2, "cancelled after %zu calls, report %zu", t.calls, r.steps);
    CHECK(!file_exists(out) && file_exists(ck), "cancel wrote out=%d ck=%d", file_exists(out),
          file_exists(ck));
    /* ... and resuming finishes the remaining steps. */
    p.resume_path = ck;
    t = (train_state){0, 2, 0, 1, 1, 1, pthread_self()};
    EXPECT_OK(graft_train(m, &p, on_train_step, &t, &r));
    CHECK(t.calls == 2 && r.steps == 4 && file_exists(out), "resumed %zu calls, %zu steps",
          t.calls, r.steps);
    p.checkpoint_path = NULL;
    p.resume_path = NULL;

    /* SaRA, RPS and full training write what the loaders take. */
    const unsigned methods[] = {GRAFT_TRAIN_SARA, GRAFT_TRAIN_RPS, GRAFT_TRAIN_FULL};
    const char *names[] = {"sara.safetensors", "rps", "full.gguf"};
    for (int i = 0; i < 3; i++) {
        graft_train_params mp = graft_train_params_default(methods[i]);
        char mout[1100];
        snprintf(mout, sizeof mout, "%s/graft-c-train.%s", tmp, names[i]);
        remove(mout);
        mp.data_path = data;
        mp.out_path = mout;
        mp.steps = 2;
        mp.batch = 2;
        mp.eval_max = 0;
        mp.rps_rho = 0.5;
        memset(&r, 0, sizeof r);
        EXPECT_OK(graft_train(m, &mp, NULL, NULL, &r));
        CHECK(r.steps == 2 && r.eval_exact_match == -1.0 && r.out_bytes > 0,
              "%s: %zu steps, em %f, %llu bytes", names[i], r.steps, r.eval_exact_match,
              (unsigned long long)r.out_bytes);
        if (methods[i] == GRAFT_TRAIN_FULL) {
            graft_model *full = NULL;
            EXPECT_OK(graft_model_load(mout, NULL, &full));
            graft_model_free(full);
        } else {
            EXPECT_OK(graft_adapter_load(m, names[i], mout, &gen));
            EXPECT_OK(graft_adapter_unload(m, names[i]));
        }
        remove(mout);
    }
    remove(out);
    remove(ck);
    remove(data);
    remove(bad_data);
}

int main(int argc, char **argv) {
    snprintf(models_dir, sizeof models_dir, "%s",
             argc > 1 ? argv[1] : "../shared/conformance/models");
    const char *tmp = argc > 2 ? argv[2] : (getenv("TMPDIR") ? getenv("TMPDIR") : "/tmp");

    test_version();
    test_load_errors(tmp);

    graft_model_options o = graft_model_options_default();
    o.n_threads = 2;
    o.provider = "cpu";
    graft_model *m = NULL;
    EXPECT_OK(graft_model_load(model_path("llama-gqa-Q8_0.gguf"), &o, &m));
    if (m == NULL) {
        fprintf(stderr, "cannot load the model from %s: %s\n", models_dir, graft_last_error());
        return 1;
    }
    test_info_and_tokens(m);
    graft_model_info info;
    EXPECT_OK(graft_model_get_info(m, &info));

    const char *ta = "The quick brown fox";
    const char *tb = "Once upon a time, in a land far away";
    uint32_t pa[32], pb[32];
    size_t na = 0, nb = 0;
    EXPECT_OK(graft_tokenize(m, ta, strlen(ta), true, false, pa, 32, &na));
    EXPECT_OK(graft_tokenize(m, tb, strlen(tb), true, false, pb, 32, &nb));

    test_sessions_and_generation(m, pa, na);
    test_adapters(m, pa, na);
    test_batched_decode(m, pa, na, pb, nb, info.n_vocab);
    test_training(m, tmp, pa, na);

    /* A session outlives its model handle. */
    graft_session *s = NULL;
    EXPECT_OK(graft_session_create(m, NULL, &s));
    graft_model_free(m);
    graft_model_free(NULL);
    uint32_t out[MAX_GEN];
    greedy(s, pa, na, out);
    graft_session_free(s);

    printf("%d checks, %d failures\n", checks, failures);
    return failures == 0 ? 0 : 1;
}
