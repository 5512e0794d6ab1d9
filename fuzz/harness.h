/* harness.h - what the libFuzzer targets in fuzz/ share: a Lua state with fireclaw's
 * modules, and a unix socket "peer" thread that plays the VMM's side of a connection,
 * answering every connection with the current input. */
#ifndef FUZZ_HARNESS_H
#define FUZZ_HARNESS_H

#include <stddef.h>
#include <stdint.h>

#include "fc.h"

/* A fresh state with the standard libraries and fireclaw's modules on `require`. */
lua_State *fz_state(void);

/* Call the function on top of the stack with nargs arguments under lua_pcall; abort with
 * the message if it raised one that does not start with one of the NULL-terminated
 * prefixes (a raise with an unexpected message is a bug too). Returns 1 if it returned. */
int fz_call(lua_State *L, int nargs, int nres, const char *const *prefixes);

/* Run the Lua chunk `code` (named `name`) with require(module) and path as its arguments,
 * under fz_call with `prefixes`. */
void fz_session(lua_State *L, const char *name, const char *code, const char *module,
		const char *path, const char *const *prefixes);

/* One input for a client of a raw socket (no HTTP): a fresh state runs `code` (see
 * fz_session) against the peer serving the input, then everything is released. */
void fz_peer_session(const uint8_t *data, size_t size, const char *code, const char *module,
		     const char *const *prefixes);

/* Start the peer thread on a socket in a private temporary directory (once); returns the
 * socket path. `http` = read a request head (up to a blank line) before answering. */
const char *fz_peer_start(int http);

/* The bytes the peer sends on the next connection: written in pieces of sizes taken from
 * the input itself (so partial lines reach the client), then the peer shuts its side
 * down and reads until the client closes. The buffer must live until fz_peer_done(). */
void fz_peer_serve(const uint8_t *data, size_t size);

/* Wait until the peer has finished with the connection(s) of this input. */
void fz_peer_done(void);

#endif
