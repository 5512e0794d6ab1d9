# tap.sh: TAP helpers for bash tests.  source "$FIRECLAW_TESTS/lib/tap.sh"
_tap_n=0
_tap_failed=0
ok() { # ok COND_STATUS NAME [DIAG]
	_tap_n=$((_tap_n + 1))
	if [ "$1" = 0 ]; then
		echo "ok $_tap_n - $2"
	else
		_tap_failed=$((_tap_failed + 1))
		echo "not ok $_tap_n - $2"
		[ -n "${3:-}" ] && printf '%s\n' "$3" | sed 's/^/#   /'
	fi
	return 0
}
is() { # is GOT WANT NAME
	[ "$1" = "$2" ]
	ok $? "$3" "got:  $1
want: $2"
}
like() { # like GOT REGEX NAME
	printf '%s' "$1" | grep -qE -- "$2"
	ok $? "$3" "got:  $1
like: $2"
}
unlike() { # unlike GOT REGEX NAME
	! printf '%s' "$1" | grep -qE -- "$2"
	ok $? "$3" "got:  $1
unlike: $2"
}
skip() { _tap_n=$((_tap_n + 1)); echo "ok $_tap_n # skip $1"; }
done_testing() { echo "1..$_tap_n"; [ "$_tap_failed" = 0 ]; }
