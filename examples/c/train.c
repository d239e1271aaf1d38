/*
 * graft example: train a LoRA adapter on the device, on the model as it is stored
 * (quantized or not), then load it and answer a prompt with it.
 *
 *   train MODEL.gguf DATA.jsonl OUT.gguf [STEPS] [PROMPT]
 *
 * DATA.jsonl holds {"prompt": .., "completion": ..} per line (`graft gen-data`
 * writes such files). Ctrl-C stops training cleanly after the current step.
 */
#include "graft.h"

#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static volatile sig_atomic_t interrupted = 0;

static void on_sigint(int sig) {
    (void)sig;
    interrupted = 1;
}

static bool show_step(const graft_train_progress *p, void *user) {
    (void)user;
    fprintf(stderr, "\rstep %zu/%zu  loss %.4f  lr %.2e  %.0f tok/s", p->step, p->steps, p->loss,
            (double)p->lr, p->tokens_per_s);
    return !interrupted; /* false cancels after this step */
}

static bool print_piece(uint32_t token, const char *piece, size_t len, void *user) {
    (void)token;
    (void)user;
    fwrite(piece, 1, len, stdout);
    return true;
}

static int fail(const char *what, graft_status st) {
    fprintf(stderr, "\n%s: %s: %s\n", what, graft_status_name(st), graft_last_error());
    return 1;
}

int main(int argc, char **argv) {
    if (argc < 4) {
        fprintf(stderr, "usage: %s MODEL.gguf DATA.jsonl OUT.gguf [STEPS] [PROMPT]\n", argv[0]);
        return 2;
    }
    graft_model *model = NULL;
    graft_status st = graft_model_load(argv[1], NULL, &model);
    if (st != GRAFT_OK) return fail("load model", st);

    graft_train_params params = graft_train_params_default(GRAFT_TRAIN_LORA);
    params.data_path = argv[2];
    params.out_path = argv[3];
    params.steps = argc > 4 ? (size_t)strtoul(argv[4], NULL, 10) : 200;
    params.lr = 3e-3f;
    params.batch = 16;
    params.rank = 16;
    params.alpha = 32.0f;
    signal(SIGINT, on_sigint);
    graft_train_report report;
    st = graft_train(model, &params, show_step, NULL, &report);
    if (st != GRAFT_OK) {
        graft_model_free(model);
        return fail("train", st);
    }
    fprintf(stderr, "\n%zu steps, eval loss %.4f, held-out exact match %.2f, %llu bytes -> %s\n",
            report.steps, report.eval_loss, report.eval_exact_match,
            (unsigned long long)report.out_bytes, argv[3]);

    if (argc > 5) {
        graft_session *session = NULL;
        graft_adapter_ref ref = {"trained", 1.0f};
        st = graft_adapter_load(model, "trained", argv[3], NULL);
        if (st == GRAFT_OK) st = graft_session_create(model, NULL, &session);
        if (st == GRAFT_OK) st = graft_session_set_adapters(session, &ref, 1);
        uint32_t prompt[256];
        size_t n_prompt = 0;
        if (st == GRAFT_OK)
            st = graft_tokenize(model, argv[5], strlen(argv[5]), true, false, prompt, 256,
                                &n_prompt);
        if (st == GRAFT_OK) {
            graft_generate_params gp = graft_generate_params_default();
            gp.max_tokens = 32;
            printf("%s", argv[5]);
            st = graft_generate(session, prompt, n_prompt, &gp, print_piece, NULL, NULL, 0, NULL);
            printf("\n");
        }
        graft_session_free(session);
        if (st != GRAFT_OK) {
            graft_model_free(model);
            return fail("generate", st);
        }
    }
    graft_model_free(model);
    return 0;
}
