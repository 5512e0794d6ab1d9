#!/bin/bash
# The repository stands alone: no file points at notes kept outside it, every relative
# link in its Markdown files reaches a file, every docs/NAME.md it names exists, and every
# section cited as (docs/NAME.md, "Section") is a heading there. vendor/ is third-party
# text and is not checked; tests/fc_api_server.py may name the directory beside the
# repository that it optionally compares the vendored specs with.
set -u
root=$(cd "$(dirname "$0")/.." && pwd)
source "$root/tests/lib/tap.sh"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

# What must not be referenced, spelled so that this file does not match itself.
outside_dir='../'"shared"
outside_notes='GUEST'"-NOTES"
outside_design='DESIGN'".md"

# file:line:text of every reference to the notes outside the repository in the given files.
outside_refs() {
	[ $# -gt 0 ] || return 0
	grep -nIF -e "$outside_dir" -e "$outside_notes" -e "$outside_design" -- "$@"
}

# "FILE: TARGET" for every relative Markdown link [text](TARGET) in the given files
# that does not reach an existing file or directory (anchors and titles ignored).
bad_links() {
	local f target path
	for f in "$@"; do
		while IFS= read -r target; do
			target=${target#](}
			target=${target%)}
			target=${target%% *}
			case "$target" in
			'' | '#'* | http://* | https://* | mailto:*) continue ;;
			esac
			path=${target%%#*}
			[ -n "$path" ] || continue
			case "$path" in
			/*) ;;
			*) path=$(dirname "$f")/$path ;;
			esac
			[ -e "$path" ] || echo "$f: $target"
		done < <(grep -oE '\]\([^)]+\)' -- "$f")
	done
}

# "FILE: docs/NAME.md" for every docs/NAME.md named in the given files that does not exist.
bad_doc_names() {
	local f name
	for f in "$@"; do
		while IFS= read -r name; do
			[ -e "$root/$name" ] || echo "$f: $name"
		done < <(grep -IoE '(^|[^A-Za-z0-9_/.-])docs/[A-Za-z0-9_.-]+\.md' -- "$f" | grep -oE 'docs/.*')
	done
}

# Every citation (docs/NAME.md, "Section"), one per line: FILE<TAB>docs/NAME.md<TAB>Section
citations() {
	local f
	for f in "$@"; do
		grep -IoE 'docs/[A-Za-z0-9_.-]+\.md, "[^"]+"' -- "$f" |
			sed -E "s|^(docs/[^,]+), \"(.*)\"\$|$f\t\1\t\2|"
	done
}

# "FILE: docs/NAME.md, "Section"" for every citation whose section is not a heading there.
bad_sections() {
	local f doc section
	while IFS=$'\t' read -r f doc section; do
		if ! { [ -f "$root/$doc" ] && grep -E '^#{1,6} ' "$root/$doc" | sed -E 's/^#+ +//' | grep -qxF -- "$section"; }; then
			echo "$f: $doc, \"$section\""
		fi
	done < <(citations "$@")
}

# none OUTPUT NAME: ok when a check printed nothing; what it printed is the diagnosis
none() {
	[ -z "$1" ]
	ok $? "$2" "$1"
}

# ---- the checkers catch what they are for (else the checks below prove nothing) ----

mkdir -p "$tmp/docs"
printf '# A\n\nsee %s\n' "$outside_dir/notes.md" >"$tmp/docs/a.md"
printf 'x = 1 -- (%s)\n' "$outside_notes" >"$tmp/b.lua"
printf 'the map: %s\n' "$outside_design" >"$tmp/c.txt"
printf 'clean text, docs/design.md\n' >"$tmp/d.txt"
out=$(cd "$tmp" && outside_refs docs/a.md b.lua c.txt d.txt | cut -d: -f1 | tr '\n' ' ')
is "$out" "docs/a.md b.lua c.txt " "the reference check finds each of the three outside names, and only those"

printf '# Doc\n\n## Good one\n\n[ok](b.md) [anchor](b.md#x) [dir](.) [web](https://example.org) [top](#doc)\n[gone](missing.md) [gone too](../nowhere/x.md "title")\n' >"$tmp/docs/b.md"
out=$(cd "$tmp" && bad_links docs/b.md | tr '\n' ' ')
is "$out" "docs/b.md: missing.md docs/b.md: ../nowhere/x.md " "the link check reports exactly the broken links"

printf -- '-- (docs/b.md, "Good one") (docs/b.md, "Bad one") (docs/zz.md, "Any")\n' >"$tmp/e.lua"
out=$(cd "$tmp" && root=$tmp bad_sections e.lua | tr '\n' ' ')
is "$out" 'e.lua: docs/b.md, "Bad one" e.lua: docs/zz.md, "Any" ' \
	"the section check reports a missing section and a missing file"
out=$(cd "$tmp" && root=$tmp bad_doc_names e.lua | tr '\n' ' ')
is "$out" "e.lua: docs/zz.md " "the docs/NAME.md check reports a missing file"

# ---- the repository ----

cd "$root" || exit 1
# tracked files and new ones not ignored (a tree without git: every file but build output)
if git rev-parse --is-inside-work-tree >/dev/null 2>&1; then
	mapfile -t all < <(git ls-files --cached --others --exclude-standard)
else
	mapfile -t all < <(find . \( -path ./build -o -path ./.git \) -prune -o -type f -print | sed 's|^\./||' | sort)
fi
files=() md=()
for f in "${all[@]}"; do
	[ -f "$f" ] || continue # deleted in the working tree
	case "$f" in vendor/*) continue ;; esac
	files+=("$f")
	case "$f" in *.md) md+=("$f") ;; esac
done
ok $(( ${#files[@]} > 50 ? 0 : 1 )) "the repository's files are found (${#files[@]})"

others=()
for f in "${files[@]}"; do [ "$f" = tests/fc_api_server.py ] || others+=("$f"); done
out=$(outside_refs "${others[@]}")
none "$out" "no file refers to $outside_dir, $outside_notes or $outside_design"
out=$(outside_refs tests/fc_api_server.py | grep -F -e "$outside_notes" -e "$outside_design")
none "$out" "tests/fc_api_server.py names no outside notes"

nlinks=$(cat "${md[@]}" | grep -oE '\]\([^)]+\)' | grep -vcE '\]\((https?:|mailto:|#)')
ok $(( nlinks >= 5 ? 0 : 1 )) "the Markdown files have relative links to check ($nlinks)"
out=$(bad_links "${md[@]}")
none "$out" "every relative link in README.md and docs/*.md reaches a file"

# this file names made-up docs/NAME.md files and sections for the checks above
cited=()
for f in "${files[@]}"; do [ "$f" = tests/docs.sh ] || cited+=("$f"); done
out=$(bad_doc_names "${cited[@]}")
none "$out" "every docs/NAME.md named in the repository exists"

ncites=$(citations "${cited[@]}" | wc -l)
ok $(( ncites >= 1 ? 0 : 1 )) "code cites sections of docs/ ($ncites citations)"
out=$(bad_sections "${cited[@]}")
none "$out" "every cited (docs/NAME.md, \"Section\") is a heading of that file"

done_testing
