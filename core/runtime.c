/* runtime.c - fireclaw.runtime: the embedded Lua library and recipes, and the search path
 * that lets a file on disk override them.
 *
 * Search path (first match wins): each directory of $FIRECLAW_PATH (colon-separated),
 * ./recipes, ~/.config/fireclaw/recipes; then what is compiled into the binary.
 * A recipe NAME is DIR/NAME.lua; a module fireclaw.x is DIR/fireclaw/x.lua.
 */
#include "fc.h"

#include <dirent.h>
#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#define SEARCH_DIRS_KEY "fireclaw.search_dirs"

/* Push the search directories as a Lua array (computed once, kept in the registry). */
static void push_search_dirs(lua_State *L)
{
	lua_getfield(L, LUA_REGISTRYINDEX, SEARCH_DIRS_KEY);
	if (!lua_isnil(L, -1))
		return;
	lua_pop(L, 1);
	lua_newtable(L);
	int n = 0;
	const char *env = getenv("FIRECLAW_PATH");
	while (env && *env) {
		const char *colon = strchr(env, ':');
		size_t len = colon ? (size_t)(colon - env) : strlen(env);
		if (len > 0) {
			lua_pushlstring(L, env, len);
			lua_rawseti(L, -2, ++n);
		}
		env = colon ? colon + 1 : NULL;
	}
	lua_pushliteral(L, "./recipes");
	lua_rawseti(L, -2, ++n);
	const char *home = getenv("HOME");
	if (home && *home) {
		lua_pushfstring(L, "%s/.config/fireclaw/recipes", home);
		lua_rawseti(L, -2, ++n);
	}
	lua_pushvalue(L, -1);
	lua_setfield(L, LUA_REGISTRYINDEX, SEARCH_DIRS_KEY);
}

/* Push the path of the first existing DIR/relpath on the search path, or nothing (0). */
static int push_override(lua_State *L, const char *relpath)
{
	push_search_dirs(L);
	int n = (int)lua_objlen(L, -1);
	for (int i = 1; i <= n; i++) {
		lua_rawgeti(L, -1, i);
		lua_pushfstring(L, "%s/%s", lua_tostring(L, -1), relpath);
		struct stat st;
		if (stat(lua_tostring(L, -1), &st) == 0 && S_ISREG(st.st_mode)) {
			lua_replace(L, -3);
			lua_pop(L, 1);
			return 1;
		}
		lua_pop(L, 2);
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
 * function and returns 1 (raises on a syntax error), or returns 0. */
static int load_override(lua_State *L, int kind, const char *name)
{
	char rel[512];
	snprintf(rel, sizeof rel, "%s.lua", name);
	if (kind == FC_EMBED_MODULE) /* fireclaw.vm -> fireclaw/vm.lua */
		for (char *p = rel; *p && strcmp(p, ".lua") != 0; p++)
			if (*p == '.')
				*p = '/';
	if (!push_override(L, rel))
		return 0;
	int rc = luaL_loadfile(L, lua_tostring(L, -1));
	lua_remove(L, -2);
	if (rc != 0)
		lua_error(L);
	return 1;
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

int luaopen_fireclaw_runtime(lua_State *L)
{
	static const luaL_Reg fns[] = {
		{"load_recipe", l_load_recipe},
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

	push_search_dirs(L);
	int dirs = lua_gettop(L), n = (int)lua_objlen(L, dirs);
	for (int i = 1; i <= n; i++) {
		lua_rawgeti(L, dirs, i);
		lua_pushliteral(L, "/?.lua;");
	}
	lua_getfield(L, dirs - 1, "path");
	lua_concat(L, 2 * n + 1);
	lua_setfield(L, dirs - 1, "path");
	lua_pop(L, 1); /* dirs */
	lua_pop(L, 1); /* package */
}
