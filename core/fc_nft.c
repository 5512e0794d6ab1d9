/* fc_nft.c - libnftables, loaded when the first nftables script is applied.
 *
 * libnftables and the libraries it pulls in (libnftnl, libxtables, libjansson, libgmp)
 * cost dynamic loading and relocation at every start of fireclaw, yet only a VM with a
 * network policy (core/fc_egress.c) uses them. So fireclaw is not linked against it: these
 * definitions of the functions fc_egress.c calls dlopen("libnftables.so.1") on first use
 * and forward to it, as core/fc_curl.c does for libcurl (API and ABI are libnftables' own).
 */
#include "fc.h"


#include <nftables/libnftables.h>

#define LIBNFT "libnftables.so.1"

/* The resolved entry points. Set once, by fc_nft_load (fireclaw is single-threaded). */
static struct {
	void *handle;
	struct nft_ctx *(*ctx_new)(uint32_t);
	void (*ctx_free)(struct nft_ctx *);
	int (*buffer_output)(struct nft_ctx *);
	int (*buffer_error)(struct nft_ctx *);
	const char *(*error_buffer)(struct nft_ctx *);
	int (*run_cmd)(struct nft_ctx *, const char *);
} lib;

static const struct fc_dlsym SYMS[] = {
    {"nft_ctx_new", (void **)&lib.ctx_new},
    {"nft_ctx_free", (void **)&lib.ctx_free},
    {"nft_ctx_buffer_output", (void **)&lib.buffer_output},
    {"nft_ctx_buffer_error", (void **)&lib.buffer_error},
    {"nft_ctx_get_error_buffer", (void **)&lib.error_buffer},
    {"nft_run_cmd_from_buffer", (void **)&lib.run_cmd},
    {NULL, NULL},
};

const char *fc_nft_load(void)
{
	return fc_dl_load(&lib.handle, LIBNFT, "libnftables1", SYMS);
}

/* Callers start with nft_ctx_new (core/fc_egress.c does, after fc_nft_load for the
 * message), which loads the library; a failure to load is a NULL context. */
struct nft_ctx *nft_ctx_new(uint32_t flags)
{
	return fc_nft_load() ? NULL : lib.ctx_new(flags);
}

void nft_ctx_free(struct nft_ctx *ctx)
{
	if (lib.handle)
		lib.ctx_free(ctx);
}

int nft_ctx_buffer_output(struct nft_ctx *ctx)
{
	return lib.buffer_output(ctx);
}

int nft_ctx_buffer_error(struct nft_ctx *ctx)
{
	return lib.buffer_error(ctx);
}

const char *nft_ctx_get_error_buffer(struct nft_ctx *ctx)
{
	return lib.error_buffer(ctx);
}

int nft_run_cmd_from_buffer(struct nft_ctx *nft, const char *buf)
{
	return lib.run_cmd(nft, buf);
}
