# seed.sh: a test state dir seeded from another one, read only.
#   seed_state DIR   DIR/images/default and DIR/keys as hard links (or copies) of
#                    $FIRECLAW_TEST_SEED's (default /var/lib/fireclaw) when DIR has no
#                    default image yet and the seed has one; otherwise nothing (the first
#                    test that needs the image builds it in DIR, as a first run would).
#   private_state SHARED DIR
#                    a state of a suite's own at DIR: SHARED's default image (built there
#                    first if it has none, as a first run would) and keys as hard links (or
#                    copies); 0 if DIR has the image. The caller exports FIRECLAW_STATE=DIR.
# Never writes to the seed. Snapshots are not seeded: the tests make their own.

# link (or copy) the files of directory $1 into new directory $2; small files are copied
link_dir() {
	mkdir -p "$2" || return 1
	local f
	for f in "$1"/*; do
		[ -f "$f" ] || continue
		if [ "$(stat -c %s "$f")" -gt 1048576 ]; then
			ln "$f" "$2/" 2>/dev/null || cp --sparse=always -p "$f" "$2/" || return 1
		else
			cp -p "$f" "$2/" || return 1
		fi
	done
}

seed_state() {
	local dir=$1 seed=${FIRECLAW_TEST_SEED:-/var/lib/fireclaw} img
	mkdir -p "$dir" && chmod 755 "$dir" || return 1
	[ -f "$dir/images/default/manifest.json" ] && return 0
	[ -f "$seed/images/default/manifest.json" ] && [ -d "$seed/keys" ] || return 0
	img=$(readlink -f "$seed/images/default") || return 0
	rm -rf "$dir/images" "$dir/keys"
	mkdir -p "$dir/images"
	# the same layout as a build makes: images/default -> .img~default~… (tests check it)
	local real=default
	[ -L "$seed/images/default" ] && real=${img##*/}
	if link_dir "$img" "$dir/images/$real" && link_dir "$seed/keys" "$dir/keys"; then
		chmod 700 "$dir/keys"
		[ "$real" = default ] || ln -s "$real" "$dir/images/default"
	else
		rm -rf "$dir/images" "$dir/keys"
	fi
	return 0
}

private_state() {
	local shared=$1 dir=$2 img
	[ -f "$shared/images/default/manifest.json" ] ||
		FIRECLAW_STATE=$shared "$fc" -q image build >/dev/null 2>&1
	mkdir -p "$dir/images" || return 1
	img=$(readlink -f "$shared/images/default") || return 1
	link_dir "$img" "$dir/images/default" || return 1
	link_dir "$shared/keys" "$dir/keys" && chmod 700 "$dir/keys" || return 1
	[ -f "$dir/images/default/manifest.json" ]
}
