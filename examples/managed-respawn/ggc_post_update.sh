#!/bin/sh
# ggc-ota runs this after a core update's swap, and after a rollback put the old core back:
# start the Greengrass core that is now installed, with whatever starts it on this device (see
# ggc_pre_update.sh). ggc-ota then checks that the core is healthy before it commits.
# Install as <root>/usr/scripts/ggc_post_update.sh, owned by root, mode 0700.
set -eu
root=${GGC_ROOT:-$(cd "$(dirname "$0")/../.." && pwd)}  # run by hand: <root>/usr/scripts/<this>
init=${GREENGRASS_INIT_SCRIPT:-/etc/init.d/greengrass}
if command -v systemctl >/dev/null 2>&1 && systemctl cat greengrass.service >/dev/null 2>&1; then
	exec systemctl start greengrass.service
elif [ -x "$init" ]; then
	exec "$init" start
else
	exec "$root/ggc/core/greengrassd" start
fi
