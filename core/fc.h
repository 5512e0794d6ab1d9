/* fc.h - the helper layer every fireclaw C module uses.
 *
 * Conventions (keep them everywhere):
 * - Misuse and failures raise a Lua error through fc_error()/fc_errno_error(); the message
 *   names the operation and the object, and ends with errno text when there is one.
 * - Userdata are created with fc_new() on a class registered with fc_class(); every class
 *   has an idempotent close (also its __gc), so `obj:close()` twice is harmless.
 * - Every wait goes through fc_poll(): it wakes on SIGINT/SIGTERM and raises
 *   "interrupted", so recipes unwind and clean up instead of hanging.
 */
#ifndef FC_H
#define FC_H

#define _GNU_SOURCE
#include <poll.h>
#include <signal.h>
#include <stddef.h>
#include <stdint.h>
#include <termios.h>

#include <lauxlib.h>
#include <lua.h>
#include <lualib.h>

#define FC_VERSION "0.1.0"

/* ---- errors ---- */

/* Raise a Lua error with a printf-style message (no position prefix). Never returns. */
int fc_error(lua_State *L, const char *fmt, ...) __attribute__((format(printf, 2, 3), noreturn));
/* Same, with ": strerror(err)" appended. */
int fc_errno_error(lua_State *L, int err, const char *fmt, ...)
	__attribute__((format(printf, 3, 4), noreturn));

/* ---- userdata classes ---- */

/* Register metatable `tname` with the given methods (available through __index).
 * A method named "close" also becomes __gc; "__tostring" etc. go on the metatable. */
void fc_class(lua_State *L, const char *tname, const luaL_Reg *methods);
/* New zero-filled userdata of class tname, pushed on the stack. */
void *fc_new(lua_State *L, size_t size, const char *tname);
/* Check argument idx is of class tname (argument error otherwise). */
void *fc_check(lua_State *L, int idx, const char *tname);

/* An fd owned by the Lua stack while a C function may still raise: pushes a guard whose
 * __gc closes the fd. fc_fd_release() takes the fd back (guard disarmed) and returns it. */
int *fc_fd_guard(lua_State *L, int fd);
int fc_fd_release(int *guard);

/* ---- options tables: fields of the table at index t, with defaults ---- */

/* Raise "WHERE: unknown option 'x' (did you mean 'y'?)" if the table at index t (nil is
 * fine) has a key not in known (NULL-terminated); fireclaw.opts.check does the work. */
void fc_opt_check(lua_State *L, int t, const char *where, const char *const known[]);

/* A string option (nil = def; anything but a string raises). The pointer stays valid as
 * long as the table at t lives, however the value was made (__index). */
const char *fc_opt_string(lua_State *L, int t, const char *key, const char *def);
const char *fc_opt_lstring(lua_State *L, int t, const char *key, const char *def, size_t *len);
double fc_opt_number(lua_State *L, int t, const char *key, double def);
int fc_opt_bool(lua_State *L, int t, const char *key, int def);

/* Pop the string or number on top of the stack and return it as a string that stays valid
 * as long as the table at `owner` lives (kept in a weak-keyed registry table under it). A
 * pointer from lua_tostring is only valid while its stack slot holds the string — and for
 * a number, lua_tostring converts that slot only. NULL (nothing popped) for other types. */
const char *fc_keep_string(lua_State *L, int owner, size_t *len);

/* ---- time ---- */

/* Monotonic clock in milliseconds (fractional). */
double fc_now_ms(void);
/* Milliseconds left until deadline (monotonic ms), clamped to [0, INT_MAX]; -1 if no
 * deadline (deadline < 0). For poll() timeouts. */
int fc_ms_left(double deadline);

/* ---- interrupts (SIGINT/SIGTERM) ---- */

/* Install the handlers; called once by main with the main Lua state. */
void fc_signals_init(lua_State *L);
/* The signal that interrupted the run (0 if none). */
int fc_signal_received(void);
/* What a second Ctrl-C leaves behind, said on stderr before exiting (copied; NULL or ""
 * for nothing): "VM 1a2b3c (namespace fc-1a2b3c, …)". Kept current by fireclaw.state. */
void fc_signals_note(const char *text);
/* Forget a handled interrupt (the REPL goes on after Ctrl-C). */
void fc_signals_reset(void);
/* Raise "interrupted by SIGINT" if a signal is pending (and clear it). */
void fc_check_interrupt(lua_State *L);
/* poll() that also wakes on SIGINT/SIGTERM (raising "interrupted by …"), retries EINTR
 * and takes its timeout in ms (-1 = forever). fds may be NULL with n == 0 (a sleep). */
int fc_poll(lua_State *L, struct pollfd *fds, nfds_t n, int timeout_ms);
/* The same, but with take != 0 a SIGINT (the first Ctrl-C) is not raised: it returns -2
 * and the interrupt is forgotten, so the caller can pass it on (the agent forwards it to
 * the guest command, as a terminal would). A second Ctrl-C still exits at once. */
int fc_poll_sigint(lua_State *L, struct pollfd *fds, nfds_t n, int timeout_ms, int take);

/* ---- the local terminal of an interactive exec (shell, exec -it, run -it) ----
 *
 * Raw mode, so every key (Ctrl-C as the byte 0x03 included) goes to the guest's PTY, whose
 * line discipline makes it a signal for the guest program; and SIGWINCH caught, its
 * handler writing a byte to a process-wide pipe the exec polls (a handler has no context;
 * the pipe is made once and lives as long as the process). The caller runs fc_rawtty_end
 * on every way out (normal end, error, interrupt, __gc); a second signal, which exits at
 * once, restores the terminal itself. Zero-initialise. */
struct fc_rawtty {
	int fd, raw, winch; /* raw/winch: what fc_rawtty_end has to undo */
	struct termios saved;
	struct sigaction old_winch;
};
/* Make fd raw and catch SIGWINCH; raises "WHO: tty N is not a terminal" and the like. */
void fc_rawtty_start(lua_State *L, struct fc_rawtty *t, int fd, const char *who);
/* Undo fc_rawtty_start (the terminal as it was, SIGWINCH's old handler); never raises, a
 * second call does nothing. */
void fc_rawtty_end(struct fc_rawtty *t);
/* The pipe's read end to poll while t->winch; readable after a SIGWINCH. */
int fc_rawtty_winch_fd(void);
/* Empty that pipe (before reading the new size). */
void fc_rawtty_winch_drain(void);

/* ---- growable byte buffer ---- */

/* Bytes data[0..len), always NUL-terminated once anything was appended (data[len] == 0).
 * Zero-initialise ({0}); fc_buf_free releases it. Nothing here raises: out of memory is
 * -1, and the caller decides how to fail (a libcurl callback must not raise, say). */
struct fc_buf {
	char *data;
	size_t len, cap;
	size_t max; /* 0, or the most bytes it holds: it never allocates more than max + 1 */
};
/* Room for n more bytes (and the NUL) without another realloc: 0, or -1 out of memory
 * (or past max). */
int fc_buf_reserve(struct fc_buf *b, size_t n);
/* Append n bytes: 0, or -1 out of memory (b unchanged). */
int fc_buf_append(struct fc_buf *b, const char *s, size_t n);
void fc_buf_free(struct fc_buf *b);

/* ---- strings ---- */

/* Sort n C strings in place, bytewise (strcmp). */
void fc_sort_strings(const char **v, size_t n);

/* ---- namespaces ---- */

/* Open /run/netns/NAME (O_RDONLY|O_CLOEXEC); -1 with errno set on failure. */
int fc_netns_open(const char *name);
/* The one way fireclaw enters a network namespace and comes back: run fn(arg) with the
 * calling thread inside the namespace open at nsfd (FC_NETNS_NEW: a new one, unshared),
 * then return the thread to the namespace it was in. Returns fn's result, or -errno when
 * the namespace cannot be entered (fn not run). fn must not raise (a Lua error would leave
 * the thread in the other namespace). Going back cannot fail for a namespace the thread
 * was in a moment ago; if it does anyway, fireclaw says so on stderr and aborts, since
 * carrying on in the wrong namespace would be worse than stopping. (A forked child that
 * is about to exec, as proc.spawn's or nft's in core/fc_egress.c, enters with a plain
 * setns(): it never comes back.) */
#define FC_NETNS_NEW (-1)
int fc_netns_run(int nsfd, int (*fn)(void *), void *arg);
/* socket() created inside network namespace `netns` (NULL or "" = current one). The
 * calling thread switches into the namespace and back around socket(). Returns the fd, or
 * -1 with errno set. */
int fc_socket_in_netns(const char *netns, int domain, int type, int protocol);

/* Connect a TCP socket to host:port (IPv4 dotted quad) from inside network namespace
 * `netns` (NULL/"" = current), waiting at most timeout_ms (interruptible through
 * fc_poll). Returns a connected, blocking, O_CLOEXEC fd with TCP_NODELAY set (libssh2 and
 * small request/response protocols stall ~40-80 ms on Nagle + delayed ACK otherwise), or
 * -1 with a reason in err ("connection refused", "timed out", "no namespace fc-x: …"). */
int fc_tcp_connect(lua_State *L, const char *netns, const char *host, int port, int timeout_ms,
		   char *err, size_t errlen);

/* A library loaded on first use rather than linked (libcurl, libnftables, libedit, libssh2,
 * libext2fs: their dynamic loading cost every start): one entry point each, its name and
 * where to put it; the table ends with {NULL, NULL}. */
struct fc_dlsym {
	const char *name;
	void **slot;
};
/* dlopen `soname` once (*handle set when every symbol resolved): NULL on success, else a
 * message (static, valid until the next call) naming what failed and `pkg` to install. */
const char *fc_dl_load(void **handle, const char *soname, const char *pkg,
		       const struct fc_dlsym *syms);

/* Load libcurl (core/fc_curl.c): NULL on success, else why not. fireclaw is not linked
 * against libcurl; only the Firecracker driver needs it. */
const char *fc_curl_load(void);
/* Load libnftables (core/fc_nft.c): NULL on success, else why not. Likewise not linked:
 * only a VM with a network policy needs it (libedit, for the REPL: core/fc_edit.c). */
const char *fc_nft_load(void);
/* Load libssh2 and initialise it (core/fc_ssh2.c): NULL on success, else why not. Likewise
 * not linked: only SSH sessions need it, and a run through the guest agent has none. */
const char *fc_ssh2_load(void);
/* SHA-256 of data into out, with the libcrypto libssh2 is linked against: 0, or -1 if
 * libssh2 is not loaded or its libcrypto has no EVP_Digest. */
int fc_ssh2_sha256(const void *data, size_t len, unsigned char out[32]);
/* Load libext2fs and libcom_err (core/fc_ext2fs.c): NULL on success, else why not. Likewise
 * not linked: only the ext2/3/4 editor of fireclaw.rootfs needs them, a disk copy does not. */
const char *fc_ext2fs_load(void);

/* ---- base64 (core/fc_base64.c, RFC 4648 with padding) ---- */

/* Encode n bytes into out (room for 4 * ((n + 2) / 3) + 1 bytes, NUL-terminated); returns
 * the length without the NUL. */
size_t fc_base64_encode(char *out, const unsigned char *in, size_t n);
/* Decode n characters, strictly: n a multiple of 4, only the alphabet, '=' only as the last
 * one or two characters, unused bits zero. Returns the byte count, or -1 when in is not
 * such base64 or the result would not fit in cap bytes. */
long fc_base64_decode(unsigned char *out, size_t cap, const char *in, size_t n);

/* ---- the log sink (core/fc_logsink.c) ---- */

/* `fireclaw --log-sink CAP PATH…`: copy pipes 3… into capped files (proc.spawn's
 * {log = path} outputs start it). Runs before any Lua state exists; returns the status. */
int fc_log_sink_main(int argc, char **argv);
/* `fireclaw --port-forward GUESTIP GUESTPORT [VMDIR]` (core/fc_forward.c): relay
 * connections accepted on fd 3 to GUESTIP:GUESTPORT. */
int fc_port_forward_main(int argc, char **argv);

/* ---- embedded Lua sources (generated by tools/embed.lua) ---- */

enum fc_embed_kind { FC_EMBED_MODULE = 1, FC_EMBED_RECIPE = 2 };
struct fc_embedded {
	int kind;
	const char *name;  /* "fireclaw.vm" or "run" */
	const char *chunk; /* "@lua/fireclaw/vm.lua" */
	const char *src;   /* LuaJIT bytecode with debug info */
	size_t len;
	const char *description; /* a recipe's first comment line */
};
extern const struct fc_embedded fc_embedded[];

/* Register embedded and C modules in package.preload and the search path's loader, and
 * take the working directory off package.path/cpath (core/runtime.c). */
void fc_runtime_install(lua_State *L);
/* Registry key of the array of --recipes directories (set by main before any require). */
#define FC_RECIPES_DIRS_KEY "fireclaw.recipes_dirs"

/* The end of a process: runtime.exit_unclosed() asks that main skip lua_close (freeing a
 * ~1 MiB Lua state object by object: ~0.7 ms of a restored run's CPU), which main does only
 * when no finalizer has work left: no process object with a running child or log sink
 * (core/proc.c), no open ext4 image (core/rootfs.c). */
extern int fc_exit_unclosed;
int fc_proc_pending(void);
int fc_rootfs_open_images(void);

/* C modules, generated from the core sources by the Makefile: {"vm", luaopen_fireclaw_vm}, … */
extern const luaL_Reg fc_cmodules[];

#endif
