/* main.c - the fireclaw command: runs a recipe, a script, -e code, or the REPL.
 *
 *   fireclaw [-v|-q] [--recipes DIR] NAME [ARGS…]  run recipe NAME (DIR/NAME.lua, or
 *                                                   the search path, or built in)
 *   fireclaw [-v|-q] SCRIPT.lua [ARGS…]  run a script; `arg` is set as lua(1) does
 *   fireclaw [-v|-q] -e CODE …           run code
 *   fireclaw                              REPL on a terminal, else the script on stdin
 *
 * Exit status: what the recipe or script returns (a number; true/nil = 0, false = 1);
 * 1 for an error (one line on stderr; traceback with -v); 2 for usage errors; 128+N when
 * interrupted by signal N. Every entry into Lua goes through lua_pcall with a traceback
 * handler, so a Lua error never aborts the process.
 */
#include "fc.h"

#include <errno.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include <editline/readline.h>
#include <luajit.h>

#define TRACEBACK_KEY "fireclaw.traceback"

struct options {
	int verbose, quiet;
	int ncode;
	const char **code; /* -e chunks, in order */
	int nrecipes;
	const char **recipes; /* --recipes DIRs, in order */
	int target;            /* index in argv of the script or recipe, or argc if none */
};

/* Message handler: keep the error value as it is (tables stay tables), remember the
 * traceback for -v. */
static int msghandler(lua_State *L)
{
	const char *msg = lua_tostring(L, 1);
	luaL_traceback(L, L, msg ? msg : "(error object)", 1);
	lua_setfield(L, LUA_REGISTRYINDEX, TRACEBACK_KEY);
	lua_settop(L, 1);
	return 1;
}

/* Call the function below nargs arguments with the handler; 0 on success. */
static int docall(lua_State *L, int nargs, int nresults)
{
	int base = lua_gettop(L) - nargs;
	lua_pushcfunction(L, msghandler);
	lua_insert(L, base);
	int rc = lua_pcall(L, nargs, nresults, base);
	lua_remove(L, base);
	return rc;
}

/* Exit status for the error on top of the stack, after printing it as one line.
 * An error table {message=, exit=} carries its own status (2 for usage errors). */
static int report_error(lua_State *L, const struct options *o)
{
	int status = 1;
	const char *msg = NULL;
	int is_table = lua_istable(L, -1);
	int exit_given = 0;
	if (is_table) {
		lua_getfield(L, -1, "exit");
		exit_given = lua_isnumber(L, -1);
		if (exit_given)
			status = (int)lua_tointeger(L, -1);
		lua_getfield(L, -2, "message");
		msg = lua_tostring(L, -1);
	} else {
		msg = lua_tostring(L, -1);
	}
	if (fc_signal_received())
		status = 128 + fc_signal_received();
	if (is_table && !msg && exit_given)
		return status; /* e.g. --help: a clean exit with a status, nothing to say */
	/* what the script printed comes before the error, also when both go to one file */
	fflush(stdout);
	fprintf(stderr, "fireclaw: %s\n", msg ? msg : "error (the error object is not a string)");
	if (o->verbose) {
		lua_getfield(L, LUA_REGISTRYINDEX, TRACEBACK_KEY);
		if (lua_isstring(L, -1))
			fprintf(stderr, "%s\n", lua_tostring(L, -1));
		lua_pop(L, 1);
	}
	return status;
}

/* Exit status from the values a script or recipe returned (nres of them on top). */
static int result_status(lua_State *L, int nres)
{
	if (nres == 0 || lua_isnil(L, -nres))
		return 0;
	if (lua_isnumber(L, -nres))
		return (int)lua_tointeger(L, -nres) & 0xff;
	if (lua_isboolean(L, -nres))
		return lua_toboolean(L, -nres) ? 0 : 1;
	return 0;
}

static void usage_error(const char *fmt, const char *what)
{
	fprintf(stderr, "fireclaw: ");
	fprintf(stderr, fmt, what);
	fprintf(stderr, " (see 'fireclaw --help')\n");
	exit(2);
}

static void parse_options(int argc, char **argv, struct options *o)
{
	o->code = calloc((size_t)argc, sizeof *o->code);
	o->recipes = calloc((size_t)argc, sizeof *o->recipes);
	if (!o->code || !o->recipes) {
		perror("fireclaw");
		exit(1);
	}
	int i = 1;
	for (; i < argc; i++) {
		const char *a = argv[i];
		if (a[0] != '-' || a[1] == '\0')
			break;
		if (strcmp(a, "--") == 0) {
			i++;
			break;
		} else if (strcmp(a, "-v") == 0 || strcmp(a, "--verbose") == 0) {
			o->verbose = 1;
		} else if (strcmp(a, "-q") == 0 || strcmp(a, "--quiet") == 0) {
			o->quiet = 1;
		} else if (strcmp(a, "-e") == 0) {
			if (i + 1 >= argc)
				usage_error("%s needs an argument", "-e");
			o->code[o->ncode++] = argv[++i];
		} else if (strcmp(a, "--recipes") == 0) {
			if (i + 1 >= argc || !*argv[i + 1])
				usage_error("%s needs an argument (a directory)", "--recipes");
			o->recipes[o->nrecipes++] = argv[++i];
		} else if (strncmp(a, "--recipes=", 10) == 0) {
			if (!a[10])
				usage_error("%s needs an argument (a directory)", "--recipes");
			o->recipes[o->nrecipes++] = a + 10;
		} else if (strcmp(a, "-h") == 0 || strcmp(a, "--help") == 0) {
			o->target = -1;
			return;
		} else if (strcmp(a, "--version") == 0) {
			printf("fireclaw %s (%s)\n", FC_VERSION, LUAJIT_VERSION);
			exit(0);
		} else {
			usage_error("unknown option '%s'", a);
		}
	}
	o->target = i;
}

/* Build the global `arg` as lua(1) does: arg[0] = script, arg[1..] = its arguments,
 * negative indices for what came before. Pushes the arguments too; returns their count. */
static int push_args(lua_State *L, int argc, char **argv, int target)
{
	lua_createtable(L, argc - target, target + 1);
	for (int i = 0; i < argc; i++) {
		lua_pushstring(L, argv[i]);
		lua_rawseti(L, -2, i - target);
	}
	lua_setglobal(L, "arg");
	for (int i = target + 1; i < argc; i++)
		lua_pushstring(L, argv[i]);
	return argc - target - 1;
}

static int is_script_path(const char *s)
{
	size_t n = strlen(s);
	return strchr(s, '/') != NULL || (n > 4 && strcmp(s + n - 4, ".lua") == 0);
}

/* Load the script or recipe argv[target]; pushes its function or an error. */
static int load_target(lua_State *L, const char *name)
{
	lua_getglobal(L, "require");
	lua_pushliteral(L, "fireclaw.runtime");
	if (docall(L, 1, 1) != 0)
		return 1;
	/* a path is a script the user named; anything else a recipe on the search path */
	lua_getfield(L, -1, is_script_path(name) ? "load_script" : "load_recipe");
	lua_remove(L, -2);
	lua_pushstring(L, name);
	if (docall(L, 1, 1) != 0)
		return 1;
	if (lua_isnil(L, -1)) {
		lua_pop(L, 1);
		lua_createtable(L, 0, 2);
		lua_pushfstring(L,
				"no recipe named '%s' (run 'fireclaw --help' for the list, or give "
				"a path to a script)",
				name);
		lua_setfield(L, -2, "message");
		lua_pushinteger(L, 2);
		lua_setfield(L, -2, "exit");
		return 1;
	}
	return 0;
}

/* Call require(module)[fn](...) with nargs arguments on the stack; 0 on success. */
static int call_lua(lua_State *L, const char *module, const char *fn, int nargs, int nres)
{
	lua_getglobal(L, "require");
	lua_pushstring(L, module);
	if (docall(L, 1, 1) != 0) {
		lua_insert(L, -1 - nargs);
		lua_pop(L, nargs);
		return 1;
	}
	lua_getfield(L, -1, fn);
	lua_remove(L, -2);
	lua_insert(L, -1 - nargs);
	return docall(L, nargs, nres);
}

/* `fireclaw NAME --help` for a recipe that does not parse its options: cli.recipe_help
 * prints its description instead of running it. 0 if it did, -1 to run the recipe. */
static int recipe_help(lua_State *L, const char *target, const struct options *o)
{
	lua_pushstring(L, target);
	lua_pushboolean(L, is_script_path(target));
	if (call_lua(L, "fireclaw.cli", "recipe_help", 2, 1) != 0) {
		report_error(L, o);
		lua_pop(L, 1);
		return -1;
	}
	int done = lua_toboolean(L, -1);
	lua_pop(L, 1);
	return done ? 0 : -1;
}

/* ---- REPL ---- */

static char *history_path(void)
{
	const char *home = getenv("HOME");
	if (!home || !*home)
		return NULL;
	char *path = NULL;
	if (asprintf(&path, "%s/.local/state/fireclaw", home) < 0)
		return NULL;
	/* best effort: no history is not worth failing the REPL for */
	char *p = path;
	while ((p = strchr(p + 1, '/')) != NULL) {
		*p = '\0';
		mkdir(path, 0700);
		*p = '/';
	}
	mkdir(path, 0700);
	/* the history is written as root: only into a real directory (a symlink here is not
	 * followed) that nobody else may write to */
	struct stat st;
	int usable = lstat(path, &st) == 0 && S_ISDIR(st.st_mode) &&
		     !(st.st_mode & (S_IWGRP | S_IWOTH));
	free(path);
	if (!usable || asprintf(&path, "%s/.local/state/fireclaw/history", home) < 0)
		return NULL;
	return path;
}

/* Load the history unless its file is a symlink (never read through one). */
static void load_history(const char *hist)
{
	struct stat st;
	if (lstat(hist, &st) == 0 && S_ISREG(st.st_mode))
		read_history(hist);
}

/* Save the history through a new 0600 file renamed over the old one: never written
 * through a symlink planted at its name (the rename replaces the link itself). */
static void save_history(const char *hist)
{
	char *tmp = NULL;
	if (asprintf(&tmp, "%s.XXXXXX", hist) < 0)
		return;
	int fd = mkstemp(tmp);
	if (fd >= 0) {
		close(fd);
		if (write_history(tmp) != 0 || rename(tmp, hist) != 0)
			unlink(tmp);
	}
	free(tmp);
}

/* Is the compile error on top of the stack "chunk ended too soon"? */
static int incomplete(lua_State *L)
{
	size_t len;
	const char *msg = lua_tolstring(L, -1, &len);
	return msg && len >= 7 && strstr(msg, "'<eof>'") == msg + len - 7;
}

/* Compile a REPL chunk: an expression first ("=x" or "x" prints x), then a statement.
 * Returns 0 (function pushed), 1 (error pushed) or -1 (needs more lines). */
static int repl_compile(lua_State *L, const char *chunk)
{
	const char *expr = chunk[0] == '=' ? chunk + 1 : chunk;
	lua_pushfstring(L, "return %s", expr);
	int rc = luaL_loadbuffer(L, lua_tostring(L, -1), lua_objlen(L, -1), "=stdin");
	lua_remove(L, -2);
	if (rc == 0)
		return 0;
	lua_pop(L, 1);
	rc = luaL_loadbuffer(L, chunk, strlen(chunk), "=stdin");
	if (rc == 0)
		return 0;
	if (incomplete(L)) {
		lua_pop(L, 1);
		return -1;
	}
	return 1;
}

static void repl(lua_State *L, const struct options *o)
{
	char *hist = history_path();
	if (hist)
		load_history(hist);
	const char *globals = "(none: fireclaw.repl failed to load)";
	if (call_lua(L, "fireclaw.repl", "setup", 0, 1) != 0)
		report_error(L, o);
	else if (lua_isstring(L, -1))
		globals = lua_tostring(L, -1);
	printf("fireclaw %s — Lua REPL (%s). Globals: %s.\n", FC_VERSION, LUAJIT_VERSION, globals);
	lua_pop(L, 1);
	char *chunk = NULL;
	for (;;) {
		char *line = readline(chunk ? ">> " : "fireclaw> ");
		if (!line)
			break;
		char *joined = NULL;
		if (asprintf(&joined, "%s%s%s", chunk ? chunk : "", chunk ? "\n" : "", line) < 0)
			break;
		free(line);
		free(chunk);
		chunk = joined;
		int rc = repl_compile(L, chunk);
		if (rc < 0)
			continue;
		if (*chunk)
			add_history(chunk);
		free(chunk);
		chunk = NULL;
		if (rc == 0) {
			int base = lua_gettop(L);
			rc = docall(L, 0, LUA_MULTRET);
			if (rc == 0 && lua_gettop(L) >= base) {
				int n = lua_gettop(L) - base + 1;
				if (call_lua(L, "fireclaw.repl", "show", n, 0) != 0)
					rc = 1;
			}
		}
		if (rc != 0) {
			report_error(L, o);
			lua_pop(L, 1);
		}
		lua_settop(L, 0);
		fc_signals_reset();
	}
	free(chunk);
	printf("\n");
	if (hist) {
		save_history(hist);
		free(hist);
	}
}

/* ---- main ---- */

static int run(lua_State *L, int argc, char **argv, struct options *o)
{
	lua_getglobal(L, "require");
	lua_pushliteral(L, "fireclaw.runtime");
	if (docall(L, 1, 1) != 0)
		return report_error(L, o);
	lua_pushboolean(L, o->verbose);
	lua_setfield(L, -2, "verbose");
	lua_pushboolean(L, o->quiet);
	lua_setfield(L, -2, "quiet");
	lua_pop(L, 1);

	if (o->target < 0)
		return call_lua(L, "fireclaw.cli", "help", 0, 0) ? report_error(L, o) : 0;
	for (int i = 0; i < o->ncode; i++) {
		if (luaL_loadbuffer(L, o->code[i], strlen(o->code[i]), "=(command line)") != 0 ||
		    docall(L, 0, 0) != 0)
			return report_error(L, o);
	}
	if (o->target < argc) {
		const char *first = o->target + 1 < argc ? argv[o->target + 1] : "";
		if ((strcmp(first, "-h") == 0 || strcmp(first, "--help") == 0) &&
		    recipe_help(L, argv[o->target], o) == 0)
			return 0;
		int base = lua_gettop(L);
		if (load_target(L, argv[o->target]) != 0)
			return report_error(L, o);
		int nargs = push_args(L, argc, argv, o->target);
		if (docall(L, nargs, LUA_MULTRET) != 0)
			return report_error(L, o);
		return result_status(L, lua_gettop(L) - base);
	}
	if (o->ncode > 0)
		return 0;
	if (isatty(STDIN_FILENO)) {
		repl(L, o);
		return 0;
	}
	/* a script piped in gets what the REPL has: the module globals */
	if (call_lua(L, "fireclaw.repl", "setup", 0, 0) != 0)
		return report_error(L, o);
	if (luaL_loadfile(L, NULL) != 0 || docall(L, 0, LUA_MULTRET) != 0)
		return report_error(L, o);
	return result_status(L, lua_gettop(L));
}

/* A run is short and its Lua is glue: its loops run a few times, not thousands. The JIT
 * compiled traces it never paid back (off: ~1 ms less CPU per restored run), and the
 * collector, started at a few hundred KiB, ran whole cycles while the modules loaded (a
 * pause of 400%: a cycle when the heap has grown 4x, not 2x; memory stays bounded). */
static void tune_vm(lua_State *L)
{
	luaJIT_setmode(L, 0, LUAJIT_MODE_ENGINE | LUAJIT_MODE_OFF);
	lua_gc(L, LUA_GCSETPAUSE, 400);
}

/* A sanitizer build frees everything at exit: its leak check reports what is not freed
 * (an agent connection a kept VM's run leaves to its __gc, say) */
#ifdef __SANITIZE_ADDRESS__
#define SANITIZED 1
#else
#define SANITIZED 0
#endif

int main(int argc, char **argv)
{
	struct options o = {0};
	if (argc > 1 && strcmp(argv[1], "--log-sink") == 0)
		return fc_log_sink_main(argc, argv); /* internal: see core/proc.c */
	if (argc > 1 && strcmp(argv[1], "--port-forward") == 0)
		return fc_port_forward_main(argc, argv); /* internal: see core/fc_forward.c */
	parse_options(argc, argv, &o);
	lua_State *L = luaL_newstate();
	if (!L) {
		fprintf(stderr, "fireclaw: cannot create the Lua state (out of memory)\n");
		return 1;
	}
	luaL_openlibs(L);
	tune_vm(L);
	fc_runtime_install(L);
	lua_createtable(L, o.nrecipes, 0);
	for (int i = 0; i < o.nrecipes; i++) {
		lua_pushstring(L, o.recipes[i]);
		lua_rawseti(L, -2, i + 1);
	}
	lua_setfield(L, LUA_REGISTRYINDEX, FC_RECIPES_DIRS_KEY);
	fc_signals_init(L);
	int status = run(L, argc, argv, &o);
	fflush(stdout);
	/* close the state so every userdata's __gc runs: VMs, namespaces and sessions
	 * still open at this point are torn down, not leaked; unless the command said it left
	 * nothing (runtime.exit_unclosed) and no finalizer has work: then the kernel frees the
	 * memory and descriptors at once (fc.h) */
	if (!fc_exit_unclosed || fc_proc_pending() || fc_rootfs_open_images() || SANITIZED)
		lua_close(L);
	free(o.code);
	free(o.recipes);
	return status;
}
