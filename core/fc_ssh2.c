/* fc_ssh2.c - libssh2, loaded when the first SSH session is opened.
 *
 * libssh2 and libcrypto (which it pulls in) cost ~1 ms of dynamic loading and relocation
 * at every start of fireclaw, and libssh2_init (OpenSSL's initialisation) another ~0.5 ms,
 * yet a run through the guest agent never uses SSH. So fireclaw is not linked against
 * libssh2: these definitions of the libssh2 functions core/ssh.c, fc_ssh_exec.c and
 * fc_sftp.c call dlopen("libssh2.so.1") at the first ssh.connect (fc_ssh2_load) and
 * forward to it, as core/fc_curl.c does for libcurl. API and ABI are libssh2's own (same
 * header, same soname Debian ships), and libssh2's macros (libssh2_channel_read and the
 * like) keep working since they expand to the _ex functions defined here.
 *
 * The SHA-256 of host key fingerprints comes from the libcrypto that libssh2 itself is
 * linked against (looked up through libssh2's handle), so nothing else is loaded for it.
 */
#include "fc.h"

#include <dlfcn.h>

#include <libssh2.h>
#include <libssh2_sftp.h>
#include <openssl/evp.h>

#define LIBSSH2 "libssh2.so.1"

/* Every forwarded function: return type, name, parameters, arguments. Each definition
 * below is compiled against libssh2.h's prototype of the same name, so a mismatch is a
 * build error. libssh2_session_init_ex and the void ones are written out; libssh2_init is
 * called by fc_ssh2_load only. */
#define SSH2_FUNCS(X)                                                                              \
	X(int, libssh2_channel_close, (LIBSSH2_CHANNEL * c), (c))                                  \
	X(int, libssh2_channel_eof, (LIBSSH2_CHANNEL * c), (c))                                    \
	X(int, libssh2_channel_free, (LIBSSH2_CHANNEL * c), (c))                                   \
	X(int, libssh2_channel_get_exit_signal,                                                    \
	  (LIBSSH2_CHANNEL * c, char **sig, size_t *sig_len, char **msg, size_t *msg_len,          \
	   char **lang, size_t *lang_len),                                                         \
	  (c, sig, sig_len, msg, msg_len, lang, lang_len))                                         \
	X(int, libssh2_channel_get_exit_status, (LIBSSH2_CHANNEL * c), (c))                        \
	X(LIBSSH2_CHANNEL *, libssh2_channel_open_ex,                                              \
	  (LIBSSH2_SESSION * s, const char *type, unsigned int type_len, unsigned int win,         \
	   unsigned int packet, const char *msg, unsigned int msg_len),                            \
	  (s, type, type_len, win, packet, msg, msg_len))                                          \
	X(int, libssh2_channel_process_startup,                                                    \
	  (LIBSSH2_CHANNEL * c, const char *req, unsigned int req_len, const char *msg,            \
	   unsigned int msg_len),                                                                  \
	  (c, req, req_len, msg, msg_len))                                                         \
	X(ssize_t, libssh2_channel_read_ex,                                                        \
	  (LIBSSH2_CHANNEL * c, int stream, char *buf, size_t len), (c, stream, buf, len))         \
	X(int, libssh2_channel_request_pty_ex,                                                     \
	  (LIBSSH2_CHANNEL * c, const char *term, unsigned int term_len, const char *modes,        \
	   unsigned int modes_len, int w, int h, int wpx, int hpx),                                \
	  (c, term, term_len, modes, modes_len, w, h, wpx, hpx))                                   \
	X(int, libssh2_channel_request_pty_size_ex,                                                \
	  (LIBSSH2_CHANNEL * c, int w, int h, int wpx, int hpx), (c, w, h, wpx, hpx))              \
	X(int, libssh2_channel_send_eof, (LIBSSH2_CHANNEL * c), (c))                               \
	X(int, libssh2_channel_wait_closed, (LIBSSH2_CHANNEL * c), (c))                            \
	X(int, libssh2_channel_wait_eof, (LIBSSH2_CHANNEL * c), (c))                               \
	X(unsigned long, libssh2_channel_window_write_ex,                                          \
	  (LIBSSH2_CHANNEL * c, unsigned long *initial), (c, initial))                             \
	X(ssize_t, libssh2_channel_write_ex,                                                       \
	  (LIBSSH2_CHANNEL * c, int stream, const char *buf, size_t len), (c, stream, buf, len))   \
	X(int, libssh2_poll_channel_read, (LIBSSH2_CHANNEL * c, int extended), (c, extended))      \
	X(int, libssh2_session_block_directions, (LIBSSH2_SESSION * s), (s))                       \
	X(int, libssh2_session_disconnect_ex,                                                      \
	  (LIBSSH2_SESSION * s, int reason, const char *desc, const char *lang),                   \
	  (s, reason, desc, lang))                                                                 \
	X(int, libssh2_session_free, (LIBSSH2_SESSION * s), (s))                                   \
	X(int, libssh2_session_handshake, (LIBSSH2_SESSION * s, libssh2_socket_t sock), (s, sock)) \
	X(const char *, libssh2_session_hostkey, (LIBSSH2_SESSION * s, size_t * len, int *type),   \
	  (s, len, type))                                                                          \
	X(int, libssh2_session_last_errno, (LIBSSH2_SESSION * s), (s))                             \
	X(int, libssh2_session_last_error,                                                         \
	  (LIBSSH2_SESSION * s, char **msg, int *msg_len, int want_buf),                           \
	  (s, msg, msg_len, want_buf))                                                             \
	X(int, libssh2_session_method_pref, (LIBSSH2_SESSION * s, int method, const char *prefs),  \
	  (s, method, prefs))                                                                      \
	X(int, libssh2_sftp_close_handle, (LIBSSH2_SFTP_HANDLE * h), (h))                          \
	X(int, libssh2_sftp_fstat_ex,                                                              \
	  (LIBSSH2_SFTP_HANDLE * h, LIBSSH2_SFTP_ATTRIBUTES * a, int setstat), (h, a, setstat))    \
	X(int, libssh2_sftp_fstatvfs, (LIBSSH2_SFTP_HANDLE * h, LIBSSH2_SFTP_STATVFS * st),        \
	  (h, st))                                                                                 \
	X(LIBSSH2_CHANNEL *, libssh2_sftp_get_channel, (LIBSSH2_SFTP * f), (f))                    \
	X(LIBSSH2_SFTP *, libssh2_sftp_init, (LIBSSH2_SESSION * s), (s))                           \
	X(unsigned long, libssh2_sftp_last_error, (LIBSSH2_SFTP * f), (f))                         \
	X(LIBSSH2_SFTP_HANDLE *, libssh2_sftp_open_ex,                                             \
	  (LIBSSH2_SFTP * f, const char *name, unsigned int name_len, unsigned long flags,         \
	   long mode, int type),                                                                   \
	  (f, name, name_len, flags, mode, type))                                                  \
	X(ssize_t, libssh2_sftp_read, (LIBSSH2_SFTP_HANDLE * h, char *buf, size_t len),            \
	  (h, buf, len))                                                                           \
	X(int, libssh2_sftp_shutdown, (LIBSSH2_SFTP * f), (f))                                     \
	X(int, libssh2_sftp_stat_ex,                                                               \
	  (LIBSSH2_SFTP * f, const char *path, unsigned int path_len, int type,                    \
	   LIBSSH2_SFTP_ATTRIBUTES *a),                                                            \
	  (f, path, path_len, type, a))                                                            \
	X(ssize_t, libssh2_sftp_write, (LIBSSH2_SFTP_HANDLE * h, const char *buf, size_t len),     \
	  (h, buf, len))                                                                           \
	X(int, libssh2_userauth_publickey_fromfile_ex,                                             \
	  (LIBSSH2_SESSION * s, const char *user, unsigned int user_len, const char *pub,          \
	   const char *priv, const char *pass),                                                    \
	  (s, user, user_len, pub, priv, pass))

#define SLOT(ret, name, params, args) ret(*name) params;
#define SYM(ret, name, params, args) {#name, (void **)&lib.name},
#define FORWARD(ret, name, params, args)                                                           \
	ret name params                                                                            \
	{                                                                                          \
		return lib.name args;                                                              \
	}

/* The resolved entry points. Set once, by fc_ssh2_load (fireclaw is single-threaded). */
static struct {
	void *handle;
	SSH2_FUNCS(SLOT)
	int (*libssh2_init)(int flags);
	LIBSSH2_SESSION *(*libssh2_session_init_ex)(LIBSSH2_ALLOC_FUNC((*a)),
						    LIBSSH2_FREE_FUNC((*f)),
						    LIBSSH2_REALLOC_FUNC((*r)), void *abstract);
	void (*libssh2_free)(LIBSSH2_SESSION *s, void *p);
	void (*libssh2_session_set_blocking)(LIBSSH2_SESSION *s, int blocking);
} lib;

/* clang-format off */
static const struct fc_dlsym SYMS[] = {
    SSH2_FUNCS(SYM)
    {"libssh2_init", (void **)&lib.libssh2_init},
    {"libssh2_session_init_ex", (void **)&lib.libssh2_session_init_ex},
    {"libssh2_free", (void **)&lib.libssh2_free},
    {"libssh2_session_set_blocking", (void **)&lib.libssh2_session_set_blocking},
    {NULL, NULL},
};
/* clang-format on */

SSH2_FUNCS(FORWARD)

const char *fc_ssh2_load(void)
{
	static int ready;
	if (ready)
		return NULL;
	const char *err = fc_dl_load(&lib.handle, LIBSSH2, "libssh2-1", SYMS);
	if (err)
		return err;
	/* once per process; libssh2 counts calls, and never freeing it is harmless */
	if (lib.libssh2_init(0) != 0)
		return "libssh2_init failed (OpenSSL could not be initialised)";
	ready = 1;
	return NULL;
}

/* The first call of a session's life (core/ssh.c loads the library before it, for the
 * message): without the library there is no session. */
LIBSSH2_SESSION *libssh2_session_init_ex(LIBSSH2_ALLOC_FUNC((*a)), LIBSSH2_FREE_FUNC((*f)),
					 LIBSSH2_REALLOC_FUNC((*r)), void *abstract)
{
	return fc_ssh2_load() ? NULL : lib.libssh2_session_init_ex(a, f, r, abstract);
}

void libssh2_free(LIBSSH2_SESSION *s, void *p)
{
	lib.libssh2_free(s, p);
}

void libssh2_session_set_blocking(LIBSSH2_SESSION *s, int blocking)
{
	lib.libssh2_session_set_blocking(s, blocking);
}

int fc_ssh2_sha256(const void *data, size_t len, unsigned char out[32])
{
	static struct {
		void *tried;
		__typeof__(EVP_Digest) *digest;
		__typeof__(EVP_sha256) *sha256;
	} crypto;
	if (!lib.handle)
		return -1;
	if (!crypto.tried) {
		crypto.tried = lib.handle;
		/* dlsym on libssh2's handle also searches what libssh2 depends on */
		crypto.digest = (__typeof__(EVP_Digest) *)dlsym(lib.handle, "EVP_Digest");
		crypto.sha256 = (__typeof__(EVP_sha256) *)dlsym(lib.handle, "EVP_sha256");
	}
	unsigned int n = 0;
	if (!crypto.digest || !crypto.sha256 ||
	    !crypto.digest(data, len, out, &n, crypto.sha256(), NULL) || n != 32)
		return -1;
	return 0;
}
