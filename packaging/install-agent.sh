#!/bin/sh
# install-agent ROOT: puts the packaged agent (/usr/lib/ggc-ota/ggc-ota) where it runs,
# ROOT/ota/ota_agent/ggc-ota, as the packages' postinst does at install and upgrade. The
# package's version wins there: an agent of another version (older, or newer from a self-update)
# is replaced, atomically (a copy beside it, synced, renamed over it). Never while an update is
# in flight (`ggc-ota --status` names it): the journal of that update belongs to the agent that
# runs it, so this says so, changes nothing and exits 1; run it again once the update has ended.
# The packaged copy itself is never run: the copy beside the target is, which unpacks the
# binary's libraries where the installed agent finds them (.ggc-ota-<id>), and nowhere else.
# The service is restarted by the caller. GGC_OTA_PACKAGED names another packaged binary (tests).
set -u
old=""
inflight=""
root=${1:?usage: install-agent ROOT (the Greengrass root, such as /greengrass)}
packaged=${GGC_OTA_PACKAGED:-/usr/lib/ggc-ota/ggc-ota}
dir="$root/ota/ota_agent"
target="$dir/ggc-ota"

if [ -e "$target" ]; then
	old=$("$target" --version 2>/dev/null || echo "an agent that does not run")
	# in flight: the installed agent's --status names it; when it cannot tell (it does not run,
	# or no readable config), a journal in the default state directory says so
	if status=$("$target" --root "$root" --status --json 2>/dev/null); then
		printf '%s\n' "$status" | grep -q '"updateInFlight": null' || inflight=yes
	elif [ -e "$root/ota-state/journal.json" ]; then
		inflight=yes
	fi
	if [ -n "$inflight" ]; then
		echo "install-agent: an update is in flight in $root ($target --root $root --status); $target ($old) is left as it is: run $0 $root again once it has ended" >&2
		exit 1
	fi
fi
mkdir -p "$dir" || exit 1
tmp="$dir/.ggc-ota.install-$$"
if ! cp "$packaged" "$tmp" || ! chmod 755 "$tmp"; then
	rm -f "$tmp"
	echo "install-agent: could not write $tmp (see above); nothing was changed" >&2
	exit 1
fi
if ! new=$("$tmp" --version 2>/dev/null); then
	rm -f "$tmp"
	echo "install-agent: $packaged does not run on this machine ($(uname -m)): a package for another architecture?" >&2
	exit 1
fi
if [ "$old" = "$new" ]; then
	rm -f "$tmp"
	echo "install-agent: $target is $new already"
	exit 0
fi
if ! sync || ! mv -f "$tmp" "$target"; then
	rm -f "$tmp"
	echo "install-agent: could not write $target (see above); nothing was changed" >&2
	exit 1
fi
sync
echo "install-agent: $target is $new${old:+ (it was $old)}"
