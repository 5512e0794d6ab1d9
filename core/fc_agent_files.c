/* fc_agent_files.c - fireclaw.core.agent: put, get, mkdir and list over the agent's channel
 * (the loop that drives them is core/fc_agent_ops.c's).
 *
 * Files from the guest are data: a got file is written to a new temporary file
 * (O_EXCL|O_NOFOLLOW) in the target's directory and renamed over the target at the end,
 * its mode the guest's permission bits & 0777 & ~umask (or opts.mode), its size capped by
 * max_bytes (announced and actual), a transfer making no progress for `stall` s fails, and
 * nothing partial is left behind. These are the SFTP path's rules (core/fc_sftp.c). A
 * directory entry's name must be one plain name.
 */
#include "fc_agent.h"
#include "fc_ssh.h" /* struct xfer + sftp_read_xfer_opts: the same put/get options */

#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/random.h>
#include <sys/stat.h>
#include <unistd.h>

void agent_build_put(lua_State *L, struct op *o, int t)
{
	struct xfer x = {.op = "put"};
	sftp_read_xfer_opts(L, &x, t);
	o->max_bytes = x.max_bytes;
	o->stall_ms = x.stall_ms;
	o->fd = open(o->src, O_RDONLY | O_CLOEXEC | O_NONBLOCK);
	struct stat st;
	if (o->fd < 0 || fstat(o->fd, &st) != 0)
		agent_fail(L, NULL, 0, "put %s: %s", o->src, strerror(errno));
	if (!S_ISREG(st.st_mode))
		agent_fail(L, NULL, 0,
			   "put %s: not a regular file (a directory: put a tar archive)", o->src);
	if ((unsigned long long)st.st_size > o->max_bytes)
		agent_fail(L, NULL, 0, "put %s: %lld bytes is over the cap of %llu (max_bytes)",
			   o->src, (long long)st.st_size, o->max_bytes);
	o->size = (unsigned long long)st.st_size;
	o->mode = x.mode >= 0 ? x.mode : (long)(st.st_mode & 07777);
	const char *slash = strrchr(o->src, '/');
	snprintf(o->base, sizeof o->base, "%.255s", slash ? slash + 1 : o->src);
	size_t dl = strlen(o->dst), bl = strlen(o->base);
	o->reqlen = 12 + dl + 1 + bl + 1;
	o->req = malloc(o->reqlen);
	if (!o->req)
		fc_error(L, "agent: out of memory");
	agp_put32(o->req, (uint32_t)o->mode);
	agp_put64(o->req + 4, o->size);
	memcpy(o->req + 12, o->dst, dl + 1);
	memcpy(o->req + 12 + dl + 1, o->base, bl + 1);
}

/* Open the local target's directory and name (a directory target gets the remote's name). */
void agent_build_get(lua_State *L, struct op *o, int t)
{
	struct xfer x = {.op = "get"};
	sftp_read_xfer_opts(L, &x, t);
	o->max_bytes = x.max_bytes;
	o->stall_ms = x.stall_ms;
	o->mode = x.mode;
	o->uid = x.uid;
	o->gid = x.gid;
	size_t n = strlen(o->dst);
	struct stat st;
	int into =
	    n == 0 || o->dst[n - 1] == '/' || (lstat(o->dst, &st) == 0 && S_ISDIR(st.st_mode));
	char dir[PATH_MAX];
	const char *name = into ? o->src : o->dst;
	const char *slash = strrchr(name, '/');
	snprintf(o->base, sizeof o->base, "%.255s", slash ? slash + 1 : name);
	if (!o->base[0] || !strcmp(o->base, ".") || !strcmp(o->base, ".."))
		agent_fail(L, NULL, 0, "get %s: no file name to write to %s", o->src, o->dst);
	if (into)
		snprintf(dir, sizeof dir, "%s", n ? o->dst : ".");
	else if (!slash)
		snprintf(dir, sizeof dir, ".");
	else
		snprintf(dir, sizeof dir, "%.*s", slash == o->dst ? 1 : (int)(slash - o->dst),
			 o->dst);
	o->dirfd = open(dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
	if (o->dirfd < 0)
		agent_fail(L, NULL, 0, "get %s: local directory %s: %s", o->src, dir,
			   strerror(errno));
	snprintf(o->result, sizeof o->result, "%s%s%s", into ? dir : "",
		 into && dir[strlen(dir) - 1] != '/' ? "/" : "", into ? o->base : o->dst);
	size_t sl = strlen(o->src);
	o->reqlen = 8 + sl + 1;
	o->req = malloc(o->reqlen);
	if (!o->req)
		fc_error(L, "agent: out of memory");
	agp_put64(o->req, o->max_bytes);
	memcpy(o->req + 8, o->src, sl + 1);
}

static void get_open_temp(lua_State *L, struct batch *b, struct op *o)
{
	for (int i = 0; i < 16 && o->fd < 0; i++) {
		unsigned char r[6];
		if (getrandom(r, sizeof r, 0) != (ssize_t)sizeof r)
			agent_op_fail(L, b, o, "getrandom: %s", strerror(errno));
		snprintf(o->tmp, sizeof o->tmp, ".fctmp-%02x%02x%02x%02x%02x%02x", r[0], r[1], r[2],
			 r[3], r[4], r[5]);
		o->fd = openat(o->dirfd, o->tmp,
			       O_WRONLY | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC, 0600);
		if (o->fd < 0 && errno != EEXIST)
			agent_op_fail(L, b, o, "%.300s: %s", o->result, strerror(errno));
	}
	if (o->fd < 0)
		agent_op_fail(L, b, o, "%.300s: no temporary name", o->result);
	o->tmp_live = 1;
}

void agent_get_finish(lua_State *L, struct batch *b, struct op *o)
{
	mode_t mask = umask(0);
	umask(mask);
	mode_t mode = o->mode >= 0 ? (mode_t)o->mode : (mode_t)o->remote_mode & 0777 & ~mask;
	if (o->uid >= 0 && fchown(o->fd, (uid_t)o->uid, (gid_t)o->gid) != 0)
		agent_op_fail(L, b, o, "chown %.300s: %s", o->result, strerror(errno));
	if (fchmod(o->fd, mode) != 0)
		agent_op_fail(L, b, o, "chmod %.300s: %s", o->result, strerror(errno));
	int rc = close(o->fd);
	o->fd = -1;
	if (rc != 0 || renameat(o->dirfd, o->tmp, o->dirfd, o->base) != 0)
		agent_op_fail(L, b, o, "%.300s: %s", o->result, strerror(errno));
	o->tmp_live = 0;
	o->done = 1;
}

void agent_on_get_frame(lua_State *L, struct batch *b, struct op *o, struct agent_frame *f)
{
	if (f->h.type == AGP_T_FILE && !o->got_file && f->h.len == 12) {
		o->remote_mode = agp_u32(f->p);
		o->size = agp_u64(f->p + 4);
		if (o->size > o->max_bytes)
			agent_op_fail(L, b, o,
				      "the guest's file is %llu bytes, over the cap of %llu "
				      "(max_bytes / --max-transfer)",
				      o->size, o->max_bytes);
		o->got_file = 1;
		get_open_temp(L, b, o);
		return;
	}
	if (f->h.type != AGP_T_DATA || !o->got_file || o->data_end)
		agent_fail(L, b->c, 1, "the guest sent an unexpected frame (type %u) in a get",
			   f->h.type);
	if (f->h.len == 0) {
		o->data_end = 1;
		return;
	}
	if (f->h.len > o->max_bytes - o->moved)
		agent_op_fail(L, b, o, "the guest sent more than the cap of %llu bytes (max_bytes)",
			      o->max_bytes);
	for (size_t off = 0; off < f->h.len;) {
		ssize_t w = write(o->fd, f->p + off, f->h.len - off);
		if (w < 0 && errno == EINTR)
			continue;
		if (w <= 0)
			agent_op_fail(L, b, o, "%.300s: %s", o->result,
				      strerror(w < 0 ? errno : EIO));
		off += (size_t)w;
	}
	o->moved += f->h.len;
	o->last_ms = fc_now_ms();
}

/* A directory entry from the guest: its name must be one plain name (the host joins it to
 * paths), at most NAME_MAX bytes, without '/' or NUL, not "." or "..". */
void agent_on_entry(lua_State *L, struct batch *b, struct op *o, struct agent_frame *f)
{
	if (f->h.type != AGP_T_ENTRY || f->h.len <= AGP_ENTRY_FIXED ||
	    f->h.len > AGP_ENTRY_FIXED + NAME_MAX)
		agent_fail(L, b->c, 1, "the guest sent an unexpected frame (type %u) in a list",
			   f->h.type);
	const char *name = (const char *)f->p + AGP_ENTRY_FIXED;
	size_t n = f->h.len - AGP_ENTRY_FIXED;
	if (memchr(name, '/', n) || memchr(name, 0, n) || (n == 1 && name[0] == '.') ||
	    (n == 2 && name[0] == '.' && name[1] == '.'))
		agent_fail(L, b->c, 1, "the guest sent a directory entry that is not a plain name");
	if (f->p[0] < AGP_KIND_FILE || f->p[0] > AGP_KIND_OTHER)
		agent_fail(L, b->c, 1, "the guest sent an entry of an unknown kind");
	if (++o->nentries > AGP_MAX_ENTRIES)
		agent_fail(L, b->c, 1, "the guest listed more than %d entries", AGP_MAX_ENTRIES);
	static const char *const kinds[] = {"", "file", "directory", "link", "other"};
	lua_rawgeti(L, LUA_REGISTRYINDEX, o->entries_ref);
	lua_createtable(L, 0, 4);
	lua_pushlstring(L, name, n);
	lua_setfield(L, -2, "name");
	lua_pushstring(L, kinds[f->p[0]]);
	lua_setfield(L, -2, "kind");
	lua_pushinteger(L, (lua_Integer)(agp_u32(f->p + 1) & 07777));
	lua_setfield(L, -2, "mode");
	lua_pushnumber(L, (lua_Number)agp_u64(f->p + 5));
	lua_setfield(L, -2, "size");
	lua_rawseti(L, -2, (int)o->nentries);
	lua_pop(L, 1);
}

static int xfer(lua_State *L, enum op_kind kind)
{
	agent_check(L, 1);
	lua_settop(L, 4); /* the options (or nil) at 4, the batch above */
	struct batch *b = agent_new_batch(L, 1);
	int bi = lua_gettop(L);
	struct op *o = agent_add_op(L, b, kind);
	agent_set_paths(L, o, 2, 3);
	if (kind == OP_PUT)
		agent_build_put(L, o, 4);
	else
		agent_build_get(L, o, 4);
	agent_run(L, bi);
	agent_push_result(L, o);
	agent_release_ops(L, b);
	return 1;
}

/* conn:mkdir(path [, mode]) -> path; conn:list(path) -> {{name =, kind =, mode =, size =}…}
 * (kind: "file", "directory", "link", "other"; names are plain: checked here) */
static int dir_op(lua_State *L, enum op_kind kind)
{
	agent_check(L, 1);
	const char *path = luaL_checkstring(L, 2);
	lua_Integer mode = luaL_optinteger(L, 3, 0755);
	if (!*path || strlen(path) >= PATH_MAX)
		fc_error(L, "agent: %s: empty or too long path",
			 kind == OP_MKDIR ? "mkdir" : "list");
	if (mode < 0 || mode > 07777)
		fc_error(L, "agent: mkdir: bad mode");
	lua_settop(L, 3);
	struct batch *b = agent_new_batch(L, 1);
	int bi = lua_gettop(L);
	struct op *o = agent_add_op(L, b, kind);
	snprintf(o->src, sizeof o->src, "%s", path);
	size_t pl = strlen(path), off = kind == OP_MKDIR ? 4 : 0;
	o->reqlen = off + pl + 1;
	o->req = malloc(o->reqlen);
	if (!o->req)
		fc_error(L, "agent: out of memory");
	if (kind == OP_MKDIR)
		agp_put32(o->req, (uint32_t)mode);
	memcpy(o->req + off, path, pl + 1);
	if (kind == OP_LIST) {
		lua_newtable(L);
		o->entries_ref = luaL_ref(L, LUA_REGISTRYINDEX);
	}
	agent_run(L, bi);
	agent_push_result(L, o);
	agent_release_ops(L, b);
	return 1;
}

int agent_l_mkdir(lua_State *L)
{
	return dir_op(L, OP_MKDIR);
}
int agent_l_list(lua_State *L)
{
	return dir_op(L, OP_LIST);
}

int agent_l_put(lua_State *L)
{
	return xfer(L, OP_PUT);
}

int agent_l_get(lua_State *L)
{
	return xfer(L, OP_GET);
}
