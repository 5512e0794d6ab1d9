/* fc_sftp_opts.c - fireclaw.ssh: the options of session:put and session:get (mode, the
 * max_bytes and stall caps, the owner of a got file). See core/fc_sftp.c. */
#include "fc_ssh.h"

#include <errno.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include <libssh2.h>
#include <libssh2_sftp.h>

/* ---- options ---- */

/* fc_error formats like lua_pushfstring (no %g, %lo): these messages need printf's. */
static void __attribute__((noreturn, format(printf, 2, 3)))
opt_fail(lua_State *L, const char *fmt, ...)
{
	char msg[256];
	va_list ap;
	va_start(ap, fmt);
	vsnprintf(msg, sizeof msg, fmt, ap);
	va_end(ap);
	fc_error(L, "%s", msg);
}

static int parse_id(const char *s, long long *out)
{
	char *end;
	if (!s || *s < '0' || *s > '9')
		return 0;
	errno = 0;
	unsigned long long v = strtoull(s, &end, 10);
	if (errno || *end || v >= 4294967295ull)
		return 0;
	*out = (long long)v;
	return 1;
}

/* Run through sudo, a got file belongs to the user who ran sudo, not to root. */
static void sudo_owner(lua_State *L, struct xfer *t)
{
	const char *u = getenv("SUDO_UID"), *g = getenv("SUDO_GID");
	if (geteuid() != 0 || (!u && !g))
		return;
	if (!parse_id(u, &t->uid) || !parse_id(g, &t->gid))
		fc_error(L,
			 "ssh: get %s: SUDO_UID/SUDO_GID ('%s', '%s') are not user and group ids; "
			 "unset both to keep the file root's",
			 t->src, u ? u : "", g ? g : "");
}

static double default_stall_s(lua_State *L)
{
	const char *s = getenv("FIRECLAW_TRANSFER_STALL_S");
	if (!s || !*s)
		return DEFAULT_STALL_S;
	char *end;
	double v = strtod(s, &end);
	if (*end || !(v > 0) || v > 1e6)
		opt_fail(L, "FIRECLAW_TRANSFER_STALL_S must be a number of seconds > 0, got '%s'",
			 s);
	return v;
}

/* The 4th argument: a mode (number) or {mode =, max_bytes =, stall =, uid =, gid =}. */
void sftp_read_xfer_opts(lua_State *L, struct xfer *t, int idx)
{
	double mode = -1, max = (double)DEFAULT_MAX_BYTES, stall = -1, uid = -2, gid = -2;
	if (lua_type(L, idx) == LUA_TNUMBER) {
		mode = lua_tonumber(L, idx);
	} else if (lua_istable(L, idx)) {
		mode = fc_opt_number(L, idx, "mode", -1);
		max = fc_opt_number(L, idx, "max_bytes", max);
		stall = fc_opt_number(L, idx, "stall", -1);
		uid = fc_opt_number(L, idx, "uid", -2);
		gid = fc_opt_number(L, idx, "gid", -2);
	} else if (!lua_isnoneornil(L, idx)) {
		luaL_argerror(L, idx, "mode or options table expected");
	}
	long maxmode = t->op[0] == 'g' ? 0777 : 07777;
	if (mode != -1 && (mode < 0 || mode > maxmode || mode != (long)mode))
		opt_fail(L, "ssh: %s: bad mode %g (0 to 0%lo%s)", t->op, mode, maxmode,
			 maxmode == 0777 ? ": a got file is never setuid, setgid or sticky" : "");
	if (!(max >= 0 && max <= MAX_BYTES_LIMIT) || max != (double)(unsigned long long)max)
		opt_fail(L, "ssh: %s: max_bytes must be a byte count, got %g", t->op, max);
	if (stall != -1 && !(stall > 0 && stall <= 1e6))
		opt_fail(L, "ssh: %s: stall must be seconds > 0, got %g", t->op, stall);
	if ((uid == -2) != (gid == -2) ||
	    (uid != -2 && (uid < -1 || uid >= 4294967295.0 || gid < -1 || gid >= 4294967295.0 ||
			   uid != (long long)uid || gid != (long long)gid)))
		fc_error(L, "ssh: %s: uid and gid go together, as ids (or -1: ours)", t->op);
	t->mode = (long)mode;
	t->max_bytes = (unsigned long long)max;
	t->stall_ms = (stall == -1 ? default_stall_s(L) : stall) * 1e3;
	t->uid = t->gid = -1;
	if (uid != -2) {
		t->uid = (long long)uid;
		t->gid = (long long)gid;
	} else if (t->op[0] == 'g') {
		sudo_owner(L, t);
	}
}
