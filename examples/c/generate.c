/*
 * Minimal graft example: load a GGUF model, optionally a LoRA adapter, and stream a
 * greedy continuation of a prompt.
 *
 *   generate MODEL.gguf "prompt" [ADAPTER.gguf [SCALE]]
 */
#include "graft.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static bool print_piece(uint32_t token, const char *piece, size_t len, void *user) {
    (void)token;
    (void)user;
    fwrite(piece, 1, len, stdout);
    fflush(stdout);
    return true; /* false would stop generation */
}

static int fail(const char *what, graft_status st) {
    fprintf(stderr, "%s: %s: %s\n", what, graft_status_name(st), graft_last_error());
    return 1;
}

int main(int argc, char **argv) {
    if (argc < 3) {
        fprintf(stderr, "usage: %s MODEL.gguf PROMPT [ADAPTER.gguf [SCALE]]\n", argv[0]);
        return 2;
    }
    graft_model *model = NULL;
    graft_status st = graft_model_load(argv[1], NULL, &model);
    if (st != GRAFT_OK) return fail("load model", st);

    graft_session *session = NULL;
    st = graft_session_create(model, NULL, &session);
    if (st != GRAFT_OK) {
        graft_model_free(model);
        return fail("create session", st);
    }

    if (argc > 3) {
        st = graft_adapter_load(model, "adapter", argv[3], NULL);
        graft_adapter_ref ref = {"adapter", argc > 4 ? strtof(argv[4], NULL) : 1.0f};
        if (st == GRAFT_OK) st = graft_session_set_adapters(session, &ref, 1);
        if (st != GRAFT_OK) {
            graft_session_free(session);
            graft_model_free(model);
            return fail("adapter", st);
        }
    }

    /* Size query, then the tokens. */
    size_t n_prompt = 0;
    graft_tokenize(model, argv[2], strlen(argv[2]), true, false, NULL, 0, &n_prompt);
    uint32_t *prompt = malloc(n_prompt * sizeof *prompt);
    st = prompt ? graft_tokenize(model, argv[2], strlen(argv[2]), true, false, prompt,
                                 n_prompt, &n_prompt)
                : GRAFT_ERR_CAPACITY;
    if (st == GRAFT_OK) {
        graft_generate_params params = graft_generate_params_default();
        params.max_tokens = 32;
        graft_generate_result result;
        printf("%s", argv[2]);
        st = graft_generate(session, prompt, n_prompt, &params, print_piece, NULL, NULL, 0,
                            &result);
        printf("\n[%zu tokens]\n", result.n_tokens);
    }
    free(prompt);
    graft_session_free(session);
    graft_model_free(model);
    return st == GRAFT_OK ? 0 : fail("generate", st);
}
