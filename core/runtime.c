/* runtime.c - fireclaw.runtime: the embedded Lua library and recipes, and the search path
 * that lets a file on disk override them.
 *
 * Search path (first match wins): each --recipes DIR, each directory of $FIRECLAW_PATH
 * (colon-separated), ~/.config/fireclaw/recipes; then what is compiled into the binary.
 * A recipe NAME is DIR/NAME.lua; a module x.y is DIR/x/y.lua. The working directory is
 * never searched (fireclaw runs as root: a cloned repository's recipes/run.lua must not
 * run just because it is there), and LuaJIT's default "./?.lua" and "./?.so" are removed
 * from package.path and package.cpath.
 *
 * Code is loaded from disk only if nobody but root and the invoking user could have
 * written it: every search directory, the directories below it on the way to the file,
 * and the file itself must be owned by root, the real uid or $SUDO_UID, and not be
 * writable by group or others. Anything else is refused with one line saying what to do.
 * The file is checked and read through one descriptor, so what is checked is what runs.
 *
 *   runtime.load_recipe(name) -> function | nil     runtime.load_script(path) -> function
 *   runtime.embedded("module" | "recipe") -> {name = chunkname}
 *   runtime.description(name) -> a built-in recipe's one-line description | nil
 *   runtime.search_dirs() -> {dir...}
 *   runtime.signal() -> the SIGINT/SIGTERM that interrupted the run, or 0
 *   runtime.check_interrupt()   runtime.interrupt_note(text | nil)
 *   runtime.sleep(s)   runtime.now() -> monotonic seconds
 *   runtime.listdir(path) -> {names} | nil, err   runtime.stat(path) -> {...} | nil, err
 *   runtime.exit_unclosed()  -- at the end of a command whose resources are all released:
 *       the process may end without freeing its Lua state (see fc_exit_unclosed in fc.h)
 *   runtime.verbose, runtime.quiet, runtime.version
 */
#include "fc.h"

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#define SEARCH_DIRS_KEY "fireclaw.search_dirs"
#define MAX_SOURCE (64 << 20) /* a Lua file larger than this is not a recipe */

/* Why a file or directory with this stat may not hold code fireclaw runs, or NULL.
 * `sticky_ok`: a sticky directory (/tmp) is fine for an explicitly named script — others
 * can add files there but not replace the user's. */
static const char *untrusted(const struct stat *st, int sticky_ok, char *buf, size_t n)
{
	uid_t uid = st->st_uid;
	const char *sudo = getenv("SUDO_UID");
	char *end = NULL;
	unsigned long sudo_uid = sudo && *sudo ? strtoul(sudo, &end, 10) : 0;
	int sudo_match = end && !*end && sudo_uid == (unsigned long)uid;
	if (uid != 0 && uid != getuid() && !sudo_match) {
		snprintf(buf, n, "owned by uid %u, not by root or you (chown it to yourself)",
			 (unsigned)uid);
		return buf;
	}
	int sticky = S_ISDIR(st->st_mode) && (st->st_mode & S_ISVTX);
	if ((st->st_mode & (S_IWGRP | S_IWOTH)) && !(sticky_ok && sticky))
		return "writable by group/other";
	return NULL;
}

/* Raise "refusing PATH: why (what to do)" unless st is trusted. */
static void check_trusted(lua_State *L, const char *path, const struct stat *st, int sticky_ok)
{
	char buf[128];
	const char *why = untrusted(st, sticky_ok, buf, sizeof buf);
	if (!why)
		return;
	if (why == buf)
		fc_error(L, "refusing %s: %s", path, why);
	fc_error(L, "refusing %s: %s (chmod go-w %s)", path, why, path);
}

/* stat + check_trusted for a directory; 0 if it does not exist and `missing_ok` (2: or
 * we may not look, e.g. HOME=/root in a process that is not root). */
static int check_dir(lua_State *L, const char *path, int missing_ok, int sticky_ok,
		     const char *what)
{
	struct stat st;
	if (stat(path, &st) != 0) {
		int skip = errno == ENOENT || (missing_ok == 2 && (errno == EACCES || errno == ENOTDIR));
		if (missing_ok && skip)
			return 0;
		fc_errno_error(L, errno, "%s%s", what, path);
	}
	if (!S_ISDIR(st.st_mode))
		fc_error(L, "%s%s: not a directory", what, path);
	check_trusted(L, path, &st, sticky_ok);
	return 1;
}

/* Add dir to the array on top of the stack (n entries) if it exists and is trusted. */
static void add_dir(lua_State *L, int *n, const char *dir, int missing_ok, const char *what)
{
	if (check_dir(L, dir, missing_ok, 0, what)) {
		lua_pushstring(L, dir);
		lua_rawseti(L, -2, ++*n);
	}
}

/* Push the search directories as a Lua array (computed and checked once, kept in the
 * registry). Raises if one of them is not trusted. */
static void push_search_dirs(lua_State *L)
{
	lua_getfield(L, LUA_REGISTRYINDEX, SEARCH_DIRS_KEY);
	if (!lua_isnil(L, -1))
		return;
	lua_pop(L, 1);
	/* --recipes DIR…, set by main; the strings stay anchored by that table */
	lua_getfield(L, LUA_REGISTRYINDEX, FC_RECIPES_DIRS_KEY);
	int given = lua_istable(L, -1) ? (int)lua_objlen(L, -1) : 0, base = lua_gettop(L);
	lua_newtable(L);
	int n = 0;
	for (int i = 1; i <= given; i++) {
		lua_rawgeti(L, base, i);
		const char *dir = lua_tostring(L, -1);
		lua_pop(L, 1);
		add_dir(L, &n, dir, 0, "--recipes ");
	}
	char dir[PATH_MAX];
	const char *env = getenv("FIRECLAW_PATH");
	while (env && *env) {
		const char *colon = strchr(env, ':');
		size_t len = colon ? (size_t)(colon - env) : strlen(env);
		if (len >= sizeof dir)
			fc_error(L, "FIRECLAW_PATH: an entry is longer than %zu bytes",
				 sizeof dir - 1);
		if (len > 0) {
			memcpy(dir, env, len);
			dir[len] = '\0';
			add_dir(L, &n, dir, 1, "FIRECLAW_PATH entry ");
		}
		env = colon ? colon + 1 : NULL;
	}
	const char *home = getenv("HOME");
	if (home && *home &&
	    (size_t)snprintf(dir, sizeof dir, "%s/.config/fireclaw/recipes", home) < sizeof dir)
		add_dir(L, &n, dir, 2, "");
	lua_remove(L, base);
	lua_pushvalue(L, -1);
	lua_setfield(L, LUA_REGISTRYINDEX, SEARCH_DIRS_KEY);
}

/* Open path for reading as code. Returns 0 (nothing pushed) if it is missing or not a
 * regular file and missing_ok; else pushes a guard owning the fd, fills st, returns 1. */
static int open_source(lua_State *L, const char *path, int missing_ok, struct stat *st)
{
	/* O_NONBLOCK: a FIFO planted under the name must not hang the open */
	int fd = open(path, O_RDONLY | O_CLOEXEC | O_NOCTTY | O_NONBLOCK);
	if (fd < 0) {
		if (missing_ok && (errno == ENOENT || errno == ENOTDIR))
			return 0;
		fc_errno_error(L, errno, "cannot open %s", path);
	}
	int *guard = fc_fd_guard(L, fd);
	if (fstat(fd, st) != 0)
		fc_errno_error(L, errno, "cannot open %s", path);
	if (!S_ISREG(st->st_mode)) {
		if (missing_ok) {
			close(fc_fd_release(guard));
			lua_pop(L, 1);
			return 0;
		}
		fc_error(L, "cannot open %s: not a regular file", path);
	}
	return 1;
}

/* Check the file whose guard is on top, read it through that fd and replace the guard by
 * the loaded chunk (named "@path", so errors say path:line). Raises on a syntax error. */
static void load_source(lua_State *L, const char *path, const struct stat *st)
{
	int *guard = lua_touserdata(L, -1);
	check_trusted(L, path, st, 0);
	if (st->st_size > MAX_SOURCE)
		fc_error(L, "refusing %s: larger than %d MiB", path, MAX_SOURCE >> 20);
	size_t cap = (size_t)st->st_size, len = 0;
	char *buf = lua_newuserdata(L, cap + 1);
	for (;;) {
		ssize_t r = read(*guard, buf + len, cap + 1 - len);
		if (r < 0 && errno == EINTR)
			continue;
		if (r < 0)
			fc_errno_error(L, errno, "cannot read %s", path);
		if (r == 0)
			break;
		len += (size_t)r;
		if (len > cap) /* grew since fstat: only root or the owner could do that */
			fc_error(L, "cannot read %s: it changed while being read", path);
	}
	close(fc_fd_release(guard));
	/* a first line starting with '#' (#!) is skipped, as lua(1) does; its newline stays
	 * so that line numbers are right */
	size_t skip = 0;
	if (len > 0 && buf[0] == '#')
		while (skip < len && buf[skip] != '\n')
			skip++;
	lua_pushfstring(L, "@%s", path);
	if (luaL_loadbuffer(L, buf + skip, len - skip, lua_tostring(L, -1)) != 0)
		lua_error(L);
	lua_replace(L, -4); /* guard */
	lua_pop(L, 2);	    /* chunk name, buffer */
}

/* Check the directories between dir and the file rel inside it (dir/a for a/b.lua). */
static void check_between(lua_State *L, const char *dir, const char *rel)
{
	char path[PATH_MAX];
	for (const char *slash = strchr(rel, '/'); slash; slash = strchr(slash + 1, '/')) {
		if ((size_t)snprintf(path, sizeof path, "%s/%.*s", dir, (int)(slash - rel), rel) >=
		    sizeof path)
			fc_error(L, "path too long: %s/%s", dir, rel);
		check_dir(L, path, 0, 0, "");
	}
}

/* Load DIR/rel from the first search directory that has it: pushes the chunk and returns
 * 1, or returns 0. Raises if the file or a directory on the way is not trusted. */
static int load_from_path(lua_State *L, const char *rel)
{
	push_search_dirs(L);
	int dirs = lua_gettop(L), n = (int)lua_objlen(L, dirs);
	char path[PATH_MAX];
	for (int i = 1; i <= n; i++) {
		lua_rawgeti(L, dirs, i);
		const char *dir = lua_tostring(L, -1); /* anchored by the dirs table */
		lua_pop(L, 1);
		if ((size_t)snprintf(path, sizeof path, "%s/%s", dir, rel) >= sizeof path)
			continue;
		struct stat st;
		if (!open_source(L, path, 1, &st))
			continue;
		check_between(L, dir, rel);
		load_source(L, path, &st);
		lua_remove(L, dirs);
		return 1;
	}
	lua_pop(L, 1);
	return 0;
}

static const struct fc_embedded *find_embedded(int kind, const char *name)
{
	for (const struct fc_embedded *e = fc_embedded; e->name; e++)
		if (e->kind == kind && strcmp(e->name, name) == 0)
			return e;
	return NULL;
}

/* Load an override file for a module or recipe if one is on the search path: pushes its
 * function and returns 1 (raises on a syntax error or an untrusted file), or returns 0. */
static int load_override(lua_State *L, int kind, const char *name)
{
	char rel[512];
	snprintf(rel, sizeof rel, "%s.lua", name);
	if (kind == FC_EMBED_MODULE) /* fireclaw.vm -> fireclaw/vm.lua */
		for (char *p = rel; *p && strcmp(p, ".lua") != 0; p++)
			if (*p == '.')
				*p = '/';
	return load_from_path(L, rel);
}

/* Load (not run) the chunk for a module or recipe: an override file if one exists, else
 * the embedded source. Pushes the function, or raises with a message naming the file. */
static int load_chunk(lua_State *L, int kind, const char *name, int required)
{
	if (load_override(L, kind, name))
		return 1;
	const struct fc_embedded *e = find_embedded(kind, name);
	if (!e) {
		if (required)
			fc_error(L, "no %s named '%s'", kind == FC_EMBED_MODULE ? "module" : "recipe",
				 name);
		return 0;
	}
	if (luaL_loadbuffer(L, e->src, e->len, e->chunk) != 0)
		lua_error(L);
	return 1;
}

/* package.preload loader for an embedded module (upvalue 1: its name). */
static int embedded_loader(lua_State *L)
{
	const char *name = lua_tostring(L, lua_upvalueindex(1));
	load_chunk(L, FC_EMBED_MODULE, name, 1);
	lua_pushstring(L, name);
	lua_call(L, 1, 1);
	return 1;
}

/* package.preload loader aliasing fireclaw.X to the C module fireclaw.core.X, unless a
 * file on the search path overrides fireclaw.X (arg 1: the name being required). */
static int alias_loader(lua_State *L)
{
	const char *name = luaL_checkstring(L, 1);
	if (load_override(L, FC_EMBED_MODULE, name)) {
		lua_pushstring(L, name);
		lua_call(L, 1, 1);
		return 1;
	}
	lua_getglobal(L, "require");
	lua_pushvalue(L, lua_upvalueindex(1));
	lua_call(L, 1, 1);
	return 1;
}

/* runtime.load_recipe(name) -> function or nil: the recipe's chunk (override or embedded). */
static int l_load_recipe(lua_State *L)
{
	const char *name = luaL_checkstring(L, 1);
	if (!load_chunk(L, FC_EMBED_RECIPE, name, 0))
		return 0;
	return 1;
}

/* runtime.embedded(kind) -> {name = chunkname, …} for "module" or "recipe". */
static int l_embedded(lua_State *L)
{
	const char *k = luaL_checkstring(L, 1);
	int kind = strcmp(k, "recipe") == 0 ? FC_EMBED_RECIPE : FC_EMBED_MODULE;
	lua_newtable(L);
	for (const struct fc_embedded *e = fc_embedded; e->name; e++) {
		if (e->kind != kind)
			continue;
		lua_pushstring(L, e->chunk);
		lua_setfield(L, -2, e->name);
	}
	return 1;
}

/* runtime.description(name) -> the built-in recipe's one-line description, or nil. */
static int l_description(lua_State *L)
{
	const struct fc_embedded *e = find_embedded(FC_EMBED_RECIPE, luaL_checkstring(L, 1));
	if (!e)
		return 0;
	lua_pushstring(L, e->description);
	return 1;
}

/* runtime.load_script(path) -> function: a script named on the command line. The file
 * and the directory holding it are checked like the search path (a sticky directory such
 * as /tmp is fine: others cannot replace a file of yours there). */
static int l_load_script(lua_State *L)
{
	const char *path = luaL_checkstring(L, 1);
	struct stat st;
	open_source(L, path, 0, &st);
	char dir[PATH_MAX];
	const char *slash = strrchr(path, '/');
	if (!slash)
		snprintf(dir, sizeof dir, ".");
	else if (slash == path)
		snprintf(dir, sizeof dir, "/");
	else if ((size_t)snprintf(dir, sizeof dir, "%.*s", (int)(slash - path), path) >= sizeof dir)
		fc_error(L, "cannot open %s: path too long", path);
	check_dir(L, dir, 0, 1, "");
	load_source(L, path, &st);
	return 1;
}

/* runtime.search_dirs() -> array of directories, in order. */
static int l_search_dirs(lua_State *L)
{
	push_search_dirs(L);
	return 1;
}

/* runtime.signal() -> number of the SIGINT/SIGTERM that interrupted the run, or 0. */
static int l_signal(lua_State *L)
{
	lua_pushinteger(L, fc_signal_received());
	return 1;
}

/* runtime.interrupt_note(text|nil): what a second Ctrl-C would leave behind (it says so). */
static int l_interrupt_note(lua_State *L)
{
	fc_signals_note(luaL_optstring(L, 1, NULL));
	return 0;
}

/* runtime.check_interrupt(): raise "interrupted" if Ctrl-C/SIGTERM arrived. */
static int l_check_interrupt(lua_State *L)
{
	fc_check_interrupt(L);
	return 0;
}

/* runtime.sleep(seconds): an interruptible sleep. */
static int l_sleep(lua_State *L)
{
	double s = luaL_checknumber(L, 1);
	fc_poll(L, NULL, 0, s <= 0 ? 0 : (int)(s * 1000));
	return 0;
}

/* runtime.now() -> monotonic time in seconds (sub-millisecond resolution). */
static int l_now(lua_State *L)
{
	lua_pushnumber(L, fc_now_ms() / 1e3);
	return 1;
}

/* runtime.stat(path) -> {size=, mtime=, ino=, dev=, mode=, uid=}, or nil, err. Enough to
 * tell whether a file changed (e.g. a VMM binary whose probed version is cached). */
static int l_stat(lua_State *L)
{
	const char *path = luaL_checkstring(L, 1);
	struct stat st;
	if (stat(path, &st) != 0) {
		lua_pushnil(L);
		lua_pushfstring(L, "%s: %s", path, strerror(errno));
		return 2;
	}
	lua_createtable(L, 0, 6);
	lua_pushnumber(L, (lua_Number)st.st_size);
	lua_setfield(L, -2, "size");
	lua_pushnumber(L, (lua_Number)st.st_mtim.tv_sec + st.st_mtim.tv_nsec / 1e9);
	lua_setfield(L, -2, "mtime");
	lua_pushnumber(L, (lua_Number)st.st_ino);
	lua_setfield(L, -2, "ino");
	lua_pushnumber(L, (lua_Number)st.st_dev);
	lua_setfield(L, -2, "dev");
	lua_pushinteger(L, (lua_Integer)st.st_mode);
	lua_setfield(L, -2, "mode");
	lua_pushinteger(L, (lua_Integer)st.st_uid);
	lua_setfield(L, -2, "uid");
	return 1;
}

/* runtime.listdir(path) -> sorted array of entry names (no . and ..), or nil, err. */
static int l_listdir(lua_State *L)
{
	const char *path = luaL_checkstring(L, 1);
	DIR *d = opendir(path);
	if (!d) {
		lua_pushnil(L);
		lua_pushfstring(L, "%s: %s", path, strerror(errno));
		return 2;
	}
	lua_newtable(L);
	int n = 0;
	struct dirent *e;
	while ((e = readdir(d)) != NULL) {
		if (strcmp(e->d_name, ".") == 0 || strcmp(e->d_name, "..") == 0)
			continue;
		lua_pushstring(L, e->d_name);
		lua_rawseti(L, -2, ++n);
	}
	closedir(d);
	lua_getglobal(L, "table");
	lua_getfield(L, -1, "sort");
	lua_pushvalue(L, -3);
	lua_call(L, 1, 0);
	lua_pop(L, 1);
	return 1;
}

int fc_exit_unclosed;

static int l_exit_unclosed(lua_State *L)
{
	(void)L;
	fc_exit_unclosed = 1;
	return 0;
}

int luaopen_fireclaw_runtime(lua_State *L)
{
	static const luaL_Reg fns[] = {
		{"load_recipe", l_load_recipe},
		{"load_script", l_load_script},
		{"embedded", l_embedded},
		{"description", l_description},
		{"search_dirs", l_search_dirs},
		{"signal", l_signal},
		{"check_interrupt", l_check_interrupt},
		{"interrupt_note", l_interrupt_note},
		{"sleep", l_sleep},
		{"now", l_now},
		{"listdir", l_listdir},
		{"stat", l_stat},
		{"exit_unclosed", l_exit_unclosed},
		{NULL, NULL},
	};
	lua_newtable(L);
	luaL_register(L, NULL, fns);
	lua_pushliteral(L, FC_VERSION);
	lua_setfield(L, -2, "version");
	lua_pushboolean(L, 0);
	lua_setfield(L, -2, "verbose");
	lua_pushboolean(L, 0);
	lua_setfield(L, -2, "quiet");
	return 1;
}

/* package.loaders entry: module x.y as DIR/x/y.lua from the search path, with the same
 * checks as recipes (DIR used to be on package.path, which checks nothing). */
static int path_searcher(lua_State *L)
{
	const char *name = luaL_checkstring(L, 1);
	char rel[512];
	if ((size_t)snprintf(rel, sizeof rel, "%s.lua", name) >= sizeof rel)
		return 0;
	for (char *p = rel; *p && strcmp(p, ".lua") != 0; p++)
		if (*p == '.')
			*p = '/';
	if (load_from_path(L, rel))
		return 1;
	lua_pushfstring(L, "\n\tno file '%s' in the fireclaw search path", rel);
	return 1;
}

/* Drop the working-directory templates ("./?.lua", "?.so", …) from package[field]: a
 * require must never pick up a file from wherever fireclaw happens to be started. Other
 * entries (LuaJIT's system directories, what LUA_PATH adds) stay. */
static void strip_cwd(lua_State *L, const char *field)
{
	lua_getfield(L, -1, field);
	const char *s = lua_tostring(L, -1);
	luaL_Buffer b;
	luaL_buffinit(L, &b);
	int first = 1;
	while (s && *s) {
		const char *semi = strchr(s, ';');
		size_t len = semi ? (size_t)(semi - s) : strlen(s);
		int cwd = (len >= 1 && s[0] == '?') || (len >= 3 && strncmp(s, "./?", 3) == 0);
		if (len > 0 && !cwd) {
			if (!first)
				luaL_addchar(&b, ';');
			luaL_addlstring(&b, s, len);
			first = 0;
		}
		s = semi ? semi + 1 : NULL;
	}
	luaL_pushresult(&b);
	lua_setfield(L, -3, field);
	lua_pop(L, 1);
}

/* Register every embedded module and C module in package.preload and put the search
 * directories in front of package.path. Called once by main. */
void fc_runtime_install(lua_State *L)
{
	lua_getglobal(L, "package");
	lua_getfield(L, -1, "preload");
	for (const luaL_Reg *m = fc_cmodules; m->name; m++) {
		lua_pushcfunction(L, m->func);
		lua_pushfstring(L, "fireclaw.core.%s", m->name);
		lua_insert(L, -2);
		lua_settable(L, -3);
		lua_pushfstring(L, "fireclaw.%s", m->name);
		if (!find_embedded(FC_EMBED_MODULE, lua_tostring(L, -1))) {
			lua_pushfstring(L, "fireclaw.core.%s", m->name);
			lua_pushcclosure(L, alias_loader, 1);
			lua_settable(L, -3);
		} else {
			lua_pop(L, 1);
		}
	}
	for (const struct fc_embedded *e = fc_embedded; e->name; e++) {
		if (e->kind != FC_EMBED_MODULE)
			continue;
		lua_pushstring(L, e->name);
		lua_pushvalue(L, -1);
		lua_pushcclosure(L, embedded_loader, 1);
		lua_settable(L, -3);
	}
	lua_pop(L, 1); /* preload */

	/* the search path for other modules, after preload, before LuaJIT's own path */
	lua_getfield(L, -1, "loaders");
	for (int i = (int)lua_objlen(L, -1); i >= 2; i--) {
		lua_rawgeti(L, -1, i);
		lua_rawseti(L, -2, i + 1);
	}
	lua_pushcfunction(L, path_searcher);
	lua_rawseti(L, -2, 2);
	lua_pop(L, 1); /* loaders */
	strip_cwd(L, "path");
	strip_cwd(L, "cpath");
	lua_pop(L, 1); /* package */
}
