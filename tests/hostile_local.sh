# Lua code is loaded from disk only where the user put it on purpose: never from the
# working directory (a cloned repo, a CI workspace), and never from a file or directory
# that someone else could have written (group/other-writable, or owned by another user).
set -u
source "$FIRECLAW_TESTS/lib/tap.sh"
fc=$FIRECLAW
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
chmod 755 "$tmp"
# nothing here may build an image, boot a VM or touch the user's run dir
export FIRECLAW_STATE=$tmp/state FIRECLAW_RUN=$tmp/run HOME=$tmp/home
unset FIRECLAW_PATH SUDO_UID
mkdir -p "$tmp/home"

# a hostile checkout: recipes/run.lua, a module override and a plain module, each leaving
# a marker when loaded
work=$tmp/work
mkdir -p "$work/recipes/fireclaw"
for f in recipes/run.lua recipes/fireclaw/cli.lua recipes/fireclaw/image.lua foo.lua recipes/foo.lua; do
	printf 'io.open("%s/loaded", "a"):write("%s\\n") return 0\n' "$tmp" "$f" >"$work/$f"
done
loaded() { cat "$tmp/loaded" 2>/dev/null; }

out=$(cd "$work" && "$fc" run --image fct-lt-nosuch -- true 2>&1); rc=$?
is "$(loaded)" "" "run in a directory with recipes/run.lua loads nothing from it"
is "$rc" 1 "... the built-in run recipe ran (and failed on the missing image)"
like "$out" "no image named 'fct-lt-nosuch'" "... with the built-in recipe's message"
out=$(cd "$work" && "$fc" run --help 2>&1)
like "$out" "usage: fireclaw run" "run --help is the built-in recipe's"
is "$(loaded)" "" "... and no module override from ./recipes/fireclaw/ was loaded"
out=$(cd "$work" && "$fc" -e 'local ok = pcall(require, "foo") print(ok)' 2>&1)
is "$out:$(loaded)" "false:" "require never looks in the working directory (./foo.lua, ./recipes/foo.lua)"
out=$(cd "$work" && "$fc" -e 'print(package.path) print(package.cpath)' 2>&1)
unlike "$out" "(^|;)(\./)?\?" "package.path and package.cpath have no working-directory entry"
out=$(cd "$work" && "$fc" --help 2>&1)
unlike "$out" "\./recipes" "--help lists no ./recipes"

# FIRECLAW_PATH: a safe directory works, an unsafe one is refused with one line
safe=$tmp/safe
mkdir -p "$safe/fireclaw"
printf -- '-- Say hello\nprint("hello from " .. (...) ) return 0\n' >"$safe/hello.lua"
printf 'return { encode = function() return "overridden" end }\n' >"$safe/fireclaw/json.lua"
out=$(FIRECLAW_PATH=$safe "$fc" hello x 2>&1)
is "$out" "hello from x" "a recipe from a safe FIRECLAW_PATH directory runs"
out=$(FIRECLAW_PATH=$safe "$fc" -e 'print(require("fireclaw.json").encode{})' 2>&1)
is "$out" "overridden" "a module from a safe FIRECLAW_PATH directory overrides"

# refused: one line on stderr, exit 1, nothing run
refused() { # refused NAME REGEX CMD…: one line, exit 1, nothing on stdout
	local name=$1 re=$2
	shift 2
	local err out rc
	out=$("$@" 2>"$tmp/err"); rc=$?
	err=$(cat "$tmp/err")
	is "$rc:$out" "1:" "$name: exit 1, nothing ran"
	like "$err" "$re" "$name: says why and what to do"
	is "$(printf '%s\n' "$err" | wc -l)" 1 "$name: in one line"
}

chmod o+w "$safe"
refused "FIRECLAW_PATH dir writable by others" \
	"^fireclaw: refusing $safe: writable by group/other \(chmod go-w $safe\)$" \
	env FIRECLAW_PATH="$safe" "$fc" hello
refused "... even for code that loads no recipe" "refusing $safe" env FIRECLAW_PATH="$safe" "$fc" -e 'print(1)'
chmod o-w "$safe"
chmod g+w "$safe/hello.lua"
refused "recipe file writable by group" "^fireclaw: refusing $safe/hello\.lua: writable by group/other \(chmod go-w" \
	env FIRECLAW_PATH="$safe" "$fc" hello
chmod g-w "$safe/hello.lua"
chmod g+w "$safe/fireclaw"
refused "module directory writable by group" "^fireclaw: refusing $safe/fireclaw: writable by group/other" \
	env FIRECLAW_PATH="$safe" "$fc" -e 'require "fireclaw.json"'
chmod g-w "$safe/fireclaw"
chown 12345 "$safe/hello.lua"
refused "recipe file owned by another user" \
	"^fireclaw: refusing $safe/hello\.lua: owned by uid 12345, not by root or you" \
	env FIRECLAW_PATH="$safe" "$fc" hello
out=$(SUDO_UID=12345 FIRECLAW_PATH=$safe "$fc" hello y 2>&1)
is "$out" "hello from y" "... accepted when that user runs fireclaw through sudo (SUDO_UID)"
chown 0 "$safe/hello.lua"
chown 12345 "$safe"
refused "FIRECLAW_PATH dir owned by another user" "refusing $safe: owned by uid 12345" \
	env FIRECLAW_PATH="$safe" "$fc" hello
out=$(SUDO_UID=12345 FIRECLAW_PATH=$safe "$fc" hello z 2>&1)
is "$out" "hello from z" "... accepted with SUDO_UID=12345"
chown 0 "$safe"

# --recipes DIR: before the recipe name, ahead of FIRECLAW_PATH, same checks
other=$tmp/other
mkdir -p "$other"
printf -- '-- Say hello\nprint("other") return 0\n' >"$other/hello.lua"
out=$("$fc" --recipes "$safe" hello w 2>&1)
is "$out" "hello from w" "--recipes DIR runs a recipe from DIR"
out=$(FIRECLAW_PATH=$other "$fc" --recipes="$safe" hello v 2>&1)
is "$out" "hello from v" "--recipes=DIR comes before FIRECLAW_PATH"
like "$("$fc" --recipes "$safe" --help)" "hello +Say hello \[$safe\]" "--help lists the recipes of --recipes DIR"
like "$("$fc" --help)" "--recipes DIR" "--help documents --recipes"
chmod o+w "$other"
refused "--recipes DIR writable by others" "^fireclaw: refusing $other: writable by group/other" \
	"$fc" --recipes "$other" hello
chmod o-w "$other"
refused "--recipes with a missing DIR" "^fireclaw: --recipes $tmp/nosuch: " "$fc" --recipes "$tmp/nosuch" hello
err=$("$fc" --recipes 2>&1); rc=$?
like "$rc:$err" "^2:fireclaw: --recipes needs an argument" "--recipes without DIR is a usage error"

# ~/.config/fireclaw/recipes: the user's own directory, same checks
mkdir -p "$tmp/home/.config/fireclaw/recipes"
printf -- '-- Home\nprint("home") return 0\n' >"$tmp/home/.config/fireclaw/recipes/homeonly.lua"
is "$("$fc" homeonly 2>&1)" "home" "a recipe from ~/.config/fireclaw/recipes runs"
chmod g+w "$tmp/home/.config/fireclaw/recipes"
refused "~/.config/fireclaw/recipes writable by group" "refusing $tmp/home/\.config/fireclaw/recipes: writable" \
	"$fc" homeonly
chmod g-w "$tmp/home/.config/fireclaw/recipes"

# not root, with a HOME it may not look into: no search directory there, no error
if command -v setpriv >/dev/null; then
	out=$(cd / && setpriv --reuid=65534 --regid=65534 --clear-groups env HOME=/root "$fc" -e 'print("ran")' 2>&1)
	is "$out" "ran" "a HOME whose recipes directory cannot be looked at is skipped"
else
	skip "no setpriv"
fi

# an explicit script path: the user named it; the file and its directory are checked
printf 'print("script", ...) return 0\n' >"$work/my.lua"
out=$(cd "$work" && "$fc" ./my.lua a 2>&1)
is "$out" "$(printf 'script\ta')" "an explicit ./file.lua runs"
out=$("$fc" "$work/my.lua" b 2>&1)
is "$out" "$(printf 'script\tb')" "an explicit /path/file.lua runs"
chmod o+w "$work/my.lua"
refused "script writable by others" "^fireclaw: refusing \./my\.lua: writable by group/other \(chmod go-w \./my\.lua\)$" \
	bash -c 'cd "$1" && "$2" ./my.lua' - "$work" "$fc"
chmod o-w "$work/my.lua"
chmod g+w "$work"
refused "script in a group-writable directory" "^fireclaw: refusing $work: writable by group/other" "$fc" "$work/my.lua"
chmod g-w "$work"
sticky=$tmp/sticky
mkdir -m 1777 "$sticky"
printf 'print("sticky") return 0\n' >"$sticky/s.lua"
is "$("$fc" "$sticky/s.lua" 2>&1)" "sticky" "a script of yours in a sticky shared directory (/tmp) runs"
chown 12345 "$sticky/s.lua"
refused "someone else's script in a sticky directory" "refusing $sticky/s\.lua: owned by uid 12345" "$fc" "$sticky/s.lua"
is "$(loaded)" "" "no hostile file was ever loaded"

done_testing
