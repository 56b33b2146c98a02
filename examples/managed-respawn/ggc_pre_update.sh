#!/bin/sh
# ggc-ota runs this before a core update, and before a rollback puts the old core back: stop
# the Greengrass core, with whatever starts it on this device: a systemd unit greengrass.service,
# an init script /etc/init.d/greengrass (OpenWrt's procd, sysvinit), else its own daemon,
# <root>/ggc/core/greengrassd.
#
# ggc-ota sets GGC_ROOT, GGC_OTA_JOB_ID, GGC_OTA_COMPONENT, GGC_OTA_ACTION (update, rollback,
# recovery, postponed-retry), GGC_OTA_FROM_VERSION and GGC_OTA_TO_VERSION. To postpone the
# update ("not now": a line running, a vehicle moving), exit 75 before changing anything, e.g.
#   [ -e /run/production-line-busy ] && exit 75
# Install as <root>/usr/scripts/ggc_pre_update.sh, owned by root, mode 0700.
set -eu
root=${GGC_ROOT:-$(cd "$(dirname "$0")/../.." && pwd)}  # run by hand: <root>/usr/scripts/<this>
init=${GREENGRASS_INIT_SCRIPT:-/etc/init.d/greengrass}
if command -v systemctl >/dev/null 2>&1 && systemctl cat greengrass.service >/dev/null 2>&1; then
	exec systemctl stop greengrass.service
elif [ -x "$init" ]; then
	exec "$init" stop
else
	exec "$root/ggc/core/greengrassd" stop
fi
